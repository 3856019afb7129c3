"""The evaluation callback under FSDP (full shard, gloo on CPU): ranks with unequal shares of the clips sample together
(an FSDP forward gathers from every rank, so a rank that stops sampling early would hang the others), and the
scores equal those of one unsharded process on the same clips, each seeded by its key."""

from __future__ import annotations

import types

import torch
from fsdp_helpers import spawn_or_fail, tiny_module, wrap

from mardini.evaluation.callbacks import InterpolationEval

CLIPS = 3  # over 2 ranks: shares of 2 and 1
FRAMES = 5


def _clips() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(CLIPS + 1, FRAMES, 3, 32, 32, generator=g) * 2 - 1  # (N, T, 3, H, W), one spare clip


def _callback() -> InterpolationEval:
    return InterpolationEval(num_clips=CLIPS, frames=FRAMES, metrics=["midf"], steps=2, cache_dir=None)


def _evaluate(module, trainer, batches: list[dict]) -> dict[str, float]:
    """The callback's hooks as Lightning calls them in one validation epoch."""
    module.log = lambda *args, **kwargs: None  # no Trainer to log to
    callback = _callback()
    callback.on_validation_epoch_start(trainer, module)
    for i, batch in enumerate(batches):
        callback.on_validation_batch_end(trainer, module, None, batch, i)
    callback.on_validation_epoch_end(trainer, module)
    return callback.last_results


def _trainer(rank: int, world: int, strategy=None):
    return types.SimpleNamespace(global_rank=rank, world_size=world, is_global_zero=rank == 0, sanity_checking=False,
                                 current_epoch=0, datamodule=None, strategy=strategy,
                                 precision_plugin=getattr(strategy, "precision_plugin", None))


def _worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        module = tiny_module()
        wrap(module, world)
        trainer = _trainer(rank, world, module._trainer.strategy)
        module._trainer = trainer
        # batches of one keyed clip, two per rank, interleaved over the ranks as the stream and a DistributedSampler
        # give them: rank 0 scores clips 0 and 2, rank 1 clip 1 (then has its share; clip 3 is past it)
        clips = _clips()
        batches = [{"video": clips[i : i + 1], "key": [f"clip{i}"]} for i in (rank, rank + world)]
        torch.save(_evaluate(module, trainer, batches), f"{out}.{rank}")
        dist.barrier()  # neither rank tears its gloo group down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_evaluation_under_fsdp_with_unequal_shares_matches_one_process(tmp_path):
    out = tmp_path / "rank"
    spawn_or_fail(_worker, (2, str(tmp_path / "rendezvous"), str(out)), 2, timeout=180)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]

    module = tiny_module()  # the same weights, one process, no FSDP
    ref = _evaluate(module, _trainer(0, 1), [{"video": _clips()[:CLIPS], "key": [f"clip{i}" for i in range(CLIPS)]}])
    assert ref["clips"] == CLIPS
    for got in ranks:
        assert got.keys() == ref.keys()
        for name, value in ref.items():
            assert abs(got[name] - value) <= 1e-4 * max(1.0, abs(value)), (name, got[name], value)

"""val/loss is a per-clip quantity: each validation clip draws its crop, mask, t and noise from its own generator
(seeded by its key), so the same clips batched differently give the same val/loss (mardini.lit.clip_draws)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mardini.lit import MarDiniModule
from mardini.lit.clip_draws import ClipGenerators, draw_rows


def _clips(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(5)
    return {"video": torch.rand(n, 6, 3, 32, 32, generator=g) * 2 - 1,  # (N, T, 3, H, W): 6 frames, cropped to 5
            "key": [f"val-{i:07d}" for i in range(n)]}


def _batches(clips: dict, size: int) -> list[dict]:
    n = clips["video"].shape[0]
    return [{"video": clips["video"][i : i + size], "key": clips["key"][i : i + size]} for i in range(0, n, size)]


def _val_loss(module: MarDiniModule, batches: list[dict], monkeypatch) -> dict[str, float]:
    """What one validation epoch over ``batches`` logs."""
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    module.on_validation_epoch_start()
    for i, batch in enumerate(batches):
        module.validation_step(dict(batch), i)
    module.on_validation_epoch_end()
    return logged


def test_val_loss_does_not_depend_on_the_validation_batch_size(monkeypatch):
    """The same 4 clips in batches of 2, of 4 and of 1 + 3 (another worker count's grouping) give the same val/loss
    and per-template losses. Before, each batch drew its clips' crop, mask, t and noise from one generator seeded by
    the batch index, so batches of 2 and 4 gave different values."""
    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16,
                           templates={"random": 1.0, "interpolation": 1.0})
    clips = _clips()
    by_two = _val_loss(module, _batches(clips, 2), monkeypatch)
    by_four = _val_loss(module, _batches(clips, 4), monkeypatch)
    uneven = _val_loss(module, [_batches(clips, 1)[0], _batches({k: v[1:] for k, v in clips.items()}, 3)[0]],
                       monkeypatch)
    assert {k for k in by_two if k.startswith("val/")} >= {"val/loss", "val/diffusion_loss"}
    assert by_four == pytest.approx(by_two, rel=1e-5) and uneven == pytest.approx(by_two, rel=1e-5)
    renamed = dict(clips, key=[f"other-{i}" for i in range(4)])  # other clips' identities: other draws
    assert _val_loss(module, _batches(renamed, 2), monkeypatch)["val/loss"] != pytest.approx(by_two["val/loss"])


def test_clip_generators_draw_each_clip_alone_and_one_generator_draws_as_before():
    """draw_rows with one generator is the plain draw (training's draws unchanged); with ClipGenerators, row i is
    what clip i's generator draws alone, wherever the clip sits in the batch."""
    shape = (3, 2, 4)
    assert torch.equal(draw_rows(lambda n, g: torch.randn((n, *shape[1:]), generator=g), 3,
                                 torch.Generator().manual_seed(1)),
                       torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    batch = {"key": ["a", "b", "c"]}
    together = draw_rows(lambda n, g: torch.randn((n, 4), generator=g), 3, ClipGenerators.for_batch(0, batch, 3, 0))
    alone = draw_rows(lambda n, g: torch.randn((n, 4), generator=g), 1,
                      ClipGenerators.for_batch(0, {"key": ["c"]}, 1, 7))
    assert torch.equal(together[2:], alone)
    with pytest.raises(ValueError, match="one per clip"):
        draw_rows(lambda n, g: torch.rand(n, generator=g), 2, ClipGenerators.for_batch(0, batch, 3, 0))


class _KeylessClips(torch.utils.data.Dataset):
    """The clips of :func:`_clips` without their keys (a datamodule of one's own)."""

    def __init__(self, n: int = 4) -> None:
        self.video = _clips(n)["video"]

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i]}


def _validate(module: MarDiniModule, loader) -> float:
    return _validate_all(module, loader)["val/loss"]


def _validate_all(module: MarDiniModule, loader) -> dict[str, float]:
    """Every metric one validation over ``loader`` logs."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, loader, verbose=False)[0]


def test_clips_without_keys_draw_by_their_dataset_index_on_any_number_of_ranks():
    """Key-less clips are seeded by their index in the dataset, as the validation loader's sampler reads them: the 4
    clips in batches of 2 or 3, or split over 2 ranks by the DistributedSampler Lightning gives each rank under DDP
    (each rank faked here by its sampler), give one val/loss. Before, each rank numbered its clips from 0 (rank 1
    drew rank 0's crops, masks, t and noise) and a last, smaller batch restarted at batch index x its own size."""
    from torch.utils.data import DataLoader, DistributedSampler

    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16,
                           templates={"random": 1.0, "interpolation": 1.0})
    clips = _KeylessClips()
    by_two = _validate(module, DataLoader(clips, batch_size=2))
    assert _validate(module, DataLoader(clips, batch_size=3)) == pytest.approx(by_two, rel=1e-5)
    ranks = [_validate(module, DataLoader(clips, batch_size=1, sampler=DistributedSampler(
        clips, num_replicas=2, rank=rank, shuffle=False))) for rank in (0, 1)]
    assert sum(ranks) / 2 == pytest.approx(by_two, rel=1e-5)  # 2 clips each: the mean of the ranks' means


def test_clips_without_keys_from_an_unreadable_order_warn_once_under_ddp(monkeypatch):
    """An iterable dataset's key-less clips are numbered by their position on each rank, which under DDP draws
    alike on every rank: the module says so once, naming the fix; one process does not warn."""
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(_KeylessClips())

    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16)
    with warnings.catch_warnings(record=True) as alone:
        warnings.simplefilter("always")
        _validate(module, DataLoader(Stream(), batch_size=2))
    assert not [w for w in alone if "without a 'key'" in str(w.message)]  # one process: no warning
    monkeypatch.setattr(MarDiniModule, "_world_size", lambda self: 2)
    with pytest.warns(UserWarning, match=r"without a 'key' on 2 ranks.*collate a 'key' per clip") as caught:
        _validate(module, DataLoader(Stream(), batch_size=2))
        _validate(module, DataLoader(Stream(), batch_size=2))
    assert len([w for w in caught if "without a 'key'" in str(w.message)]) == 1


class _KeyedClips(_KeylessClips):
    """The clips of :func:`_clips` with their keys, from a map-style dataset (a datamodule of one's own)."""

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i], "key": f"val-{i:07d}"}


def _validate_as_rank(module: MarDiniModule, clips, rank: int, others: list[torch.Tensor], monkeypatch,
                      record: list[torch.Tensor] | None = None, wrapped: bool = False) -> dict[str, float]:
    """What rank ``rank`` of 2 logs when validating its ``DistributedSampler`` share of ``clips`` (``wrapped``: its
    share of a sampler of one's own, as Lightning's ``DistributedSamplerWrapper`` gives it), the ranks faked in one
    process: each all-reduce of the epoch's sums (``_reduce_over_ranks``, a sum) adds the other rank's sums of the
    same call (``others``, recorded by running that rank with ``record``)."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from torch.utils.data import DataLoader, DistributedSampler

    def reduce(value: torch.Tensor, op: str) -> torch.Tensor:
        if record is not None:
            record.append(value.clone())
        return value + others.pop(0) if others else value

    monkeypatch.setattr(module, "_reduce_over_ranks", reduce)
    sampler = (DistributedSamplerWrapper(_OwnSampler(len(clips)), num_replicas=2, rank=rank, shuffle=False) if wrapped
               else DistributedSampler(clips, num_replicas=2, rank=rank, shuffle=False))
    logged = _validate_all(module, DataLoader(clips, batch_size=2, sampler=sampler))
    monkeypatch.undo()
    return logged


class _OwnSampler(torch.utils.data.Sampler):
    """A sampler of one's own: the clips backwards, or the ``share`` of them given."""

    def __init__(self, n: int, share: list[int] | None = None) -> None:
        self.indices = share if share is not None else list(range(n))[::-1]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@pytest.mark.parametrize("clips, keyed", [(3, False), (5, False), (3, True)], ids=["3-keyless", "5-keyless", "3-keyed"])
def test_clips_the_distributed_sampler_repeats_to_pad_the_ranks_weigh_nothing(clips, keyed, monkeypatch):
    """3 or 5 clips on 2 ranks: the DistributedSampler pads rank 1's share with clip 0 again. What the ranks log
    after reducing their sums (faked in one process: rank 1's sums are recorded and added to rank 0's) is what one
    process logs over the clips: val/loss, per template and per part. Before, the repeat counted twice (3 clips:
    val/loss the mean of 4 losses, clip 0's twice), so every val metric depended on the world size."""
    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16, plan_recon_weight=1.0,
                           templates={"random": 1.0, "interpolation": 1.0})
    data = (_KeyedClips if keyed else _KeylessClips)(clips)
    one = _validate_all(module, torch.utils.data.DataLoader(data, batch_size=2))
    rank1: list[torch.Tensor] = []
    _validate_as_rank(module, data, 1, [], monkeypatch, record=rank1)
    assert len(rank1) == 2  # the template sums and the joint module's part sums: one all-reduce each
    both = _validate_as_rank(module, data, 0, rank1, monkeypatch)
    assert {"val/loss", "val/diffusion_loss", "val/plan_recon_loss"} <= set(one)
    assert both == pytest.approx(one, rel=1e-5)


@pytest.mark.parametrize("drop_last", [False, True])
def test_validation_order_counts_each_clip_once_over_the_ranks(drop_last):
    """Over every rank's DistributedSampler share (shuffled or not), the clips validation_order's ``distinct`` and
    clip_weights count are each clip of the dataset once (drop_last: those the sampler keeps); one process counts
    all its clips."""
    from torch.utils.data import DataLoader, DistributedSampler

    from mardini.lit.clip_draws import clip_weights, validation_order

    for n in range(1, 8):
        data = _KeylessClips(n)
        for world in range(1, 5):
            if drop_last and n < world:
                continue
            counted = []
            for rank in range(world):
                sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=n,
                                             drop_last=drop_last)
                order = validation_order(DataLoader(data, batch_size=2, sampler=sampler))
                weights = torch.cat([clip_weights(order, first, min(2, len(order.indices) - first))
                                     for first in range(0, len(order.indices), 2)])
                counted += [i for i, w in zip(order.indices, weights.tolist(), strict=True) if w == 1]
            expected = n - n % world if drop_last else n
            assert len(counted) == len(set(counted)) == expected, (n, world)
        order = validation_order(DataLoader(data, batch_size=3))
        assert order.distinct == n and clip_weights(order, 0, min(3, n)).tolist() == [1.0] * min(3, n)


def test_the_repeats_lightning_s_wrapper_of_a_sampler_of_one_s_own_pads_in_weigh_nothing(monkeypatch):
    """A sampler of one's own under DDP: Lightning shards it with its DistributedSamplerWrapper, which pads rank 1's
    share of 3 keyed clips with the sampler's first clip again. Its repeats weigh 0 as the DistributedSampler's do: the
    two ranks log (faked in one process) what one process logs. Before, validation_order read only a plain
    DistributedSampler, and the repeat counted twice in val/loss."""
    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16, templates={"random": 1.0})
    data = _KeyedClips(3)
    one = _validate_all(module, torch.utils.data.DataLoader(data, batch_size=2))
    rank1: list[torch.Tensor] = []
    _validate_as_rank(module, data, 1, [], monkeypatch, record=rank1, wrapped=True)
    assert _validate_as_rank(module, data, 0, rank1, monkeypatch, wrapped=True) == pytest.approx(one, rel=1e-5)


def test_a_sampler_of_one_s_own_that_repeats_clips_over_the_ranks_warns_once_naming_the_fix(monkeypatch):
    """Under DDP (2 ranks, faked) a sampler of one's own, not wrapped by Lightning (use_distributed_sampler: false),
    gives each rank 2 of 3 clips: one is validated twice and counts twice, which the module cannot tell apart; it says
    so once, naming what it does to the means (val/loss, the evaluation callbacks' scores) and the fix. Shares that
    fit the set (2 of 4 clips each) give no warning. Before, nothing said it; then it said "count twice in val/loss",
    nothing of the weighting nor of the evaluation callbacks."""
    from torch.utils.data import DataLoader

    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16)
    monkeypatch.setattr(MarDiniModule, "_world_size", lambda self: 2)
    with warnings.catch_warnings(record=True) as fits:
        warnings.simplefilter("always")
        _validate(module, DataLoader(_KeyedClips(4), batch_size=2, sampler=_OwnSampler(4, [1, 3])))
    assert not [w for w in fits if "more than the set holds" in str(w.message)]
    with pytest.warns(UserWarning, match=r"each of the 2 ranks 2 clips of its 3 \(4 in all, 1 more than the set "
                                         r"holds\): its sampler \(_OwnSampler\) is not split.*at least 1 validations "
                                         r"repeat a clip, and each counts once more: val/loss.*evaluation callbacks' "
                                         r"scores are means weighted toward the repeated clips.*"
                                         r"use_distributed_sampler: true") as caught:
        for _ in range(2):
            _validate(module, DataLoader(_KeyedClips(3), batch_size=2, sampler=_OwnSampler(3, [1, 0])))
    assert len([w for w in caught if "more than the set holds" in str(w.message)]) == 1


def test_a_padding_batch_runs_but_weighs_nothing_in_val_loss(monkeypatch):
    """A rank whose stream ran short of the steps every rank runs under FSDP runs zero-weight copies of its last
    batch (mardini.data.batching.padding_of): val/loss and its parts are those of the real batches alone. Before,
    the copy counted its clips again."""
    from mardini.data.batching import padding_of

    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16, templates={"random": 1.0})
    batches = _batches(_clips(3), 2)
    alone = _val_loss(module, batches, monkeypatch)
    padded = _val_loss(module, [*batches, padding_of(batches[1])], monkeypatch)
    assert {"val/loss", "val/diffusion_loss"} <= set(alone) and padded == pytest.approx(alone, rel=1e-6)

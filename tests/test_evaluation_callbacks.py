"""The evaluation callbacks inside a real ``lightning.Trainer`` fit: results, EMA, checkpoints, cache, DDP."""

from __future__ import annotations

import contextlib
import os
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.evaluation import EvalProtocol, EvalSuite, ImageToVideoEval, InterpolationEval, LinearBlend
from mardini.metrics.stand_ins import FramePool, VideoPool

FRAMES, SIZE, CLIPS = 9, 16, 8


class TinyModule(L.LightningModule):
    """The pieces the callbacks touch: ``networks``, ``ema_weights()``, training and validation steps."""

    def __init__(self) -> None:
        super().__init__()
        self.networks = nn.ModuleDict({"net": nn.Linear(4, 4)})
        self.ema_entered = 0

    @contextlib.contextmanager
    def ema_weights(self):
        self.ema_entered += 1
        yield self

    def training_step(self, batch, batch_idx):
        return self.networks["net"](batch["video"].mean((1, 2, 3))[:, :4]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CountingBlend(LinearBlend):
    """The linear-blend baseline that records the seeds and whether the module's EMA was in."""

    def __init__(self, module: TinyModule | None = None) -> None:
        self.module, self.seeds, self.under_ema = module, [], []

    def __call__(self, video, mask, seed=0):
        self.seeds.append(seed)
        return super().__call__(video, mask, seed)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("synth"), train=12, val=CLIPS, frames=12, size=SIZE)


def datamodule(shards, **kw):
    return VideoDataModule(
        train_shards=str(shards / "train"), val_shards=str(shards / "val"), frames=FRAMES, fps=None,
        resolution=SIZE, batch_size=4, num_workers=0, shuffle_buffer=0, epoch_size=8, val_clips=CLIPS, **kw,
    )


def trainer(tmp_path, callbacks, steps=2, **kw):
    kw.setdefault("num_sanity_val_steps", 0)
    kw.setdefault("devices", 1)
    return L.Trainer(
        max_steps=steps, limit_train_batches=steps, val_check_interval=steps,
        callbacks=callbacks, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", **kw,
    )


def evals(cache_dir, sampler="linear_blend", **kw):
    common = dict(num_clips=CLIPS, frames=FRAMES, cache_dir=str(cache_dir) if cache_dir else None, sampler=sampler,
                  networks={"fvd": VideoPool(), "fid": FramePool()}, **kw)
    return InterpolationEval(**common), ImageToVideoEval(**common)


def expected_results(shards, protocol: EvalProtocol) -> dict[str, float]:
    """The same protocol scored directly over the validation loader (the callback must agree)."""
    dm = datamodule(shards)
    dm.setup("validate")
    suite = EvalSuite(protocol, {"fvd": VideoPool(), "fid": FramePool()})
    for batch in dm.val_dataloader():
        mask = protocol.mask(batch["video"].shape[0])
        suite.update(batch["video"], LinearBlend()(batch["video"], mask, 0), mask, batch["positions"])
    return suite.compute()


def test_callbacks_in_fit_log_results_use_ema_and_stay_out_of_checkpoints(shards, tmp_path):
    interp, i2v = evals(tmp_path / "stats")
    module = TinyModule()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, [interp, i2v, ckpt])
    t.fit(module, datamodule=datamodule(shards))

    logged = {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("eval/")}
    for cb in (interp, i2v):
        want = expected_results(shards, cb.protocol)
        for name, value in want.items():
            assert logged[f"{cb.prefix}/{name}"] == pytest.approx(value, rel=1e-5, abs=1e-8), name
        assert logged[f"{cb.prefix}/clips"] == CLIPS
    assert "eval/interpolation/midf_psnr" in logged and "eval/image_to_video/midf_psnr" not in logged
    assert logged["eval/interpolation/traj_err_px"] < logged["eval/image_to_video/traj_err_px"]  # blend beats hold
    assert module.ema_entered >= 2  # the sampler ran under the module's EMA weights (2 batches x 2 callbacks)

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(k.startswith("networks.") for k in saved["state_dict"]), sorted(saved["state_dict"])
    assert not any(isinstance(v, dict) and v for v in saved.get("callbacks", {}).values() if "Eval" in str(v))
    for name, state in saved.get("callbacks", {}).items():
        if "Eval" in name:
            assert state == {}, name
    assert not any(isinstance(m, nn.Module) and m is not module.networks for m in module.children()
                   if m.__class__.__name__ in ("VideoPool", "FramePool"))
    assert len(list(module.parameters())) == 2  # the Linear only: no metric network joined the module


def test_callback_real_stats_cache_hit_miss_and_invalidation(shards, tmp_path):
    cache_dir = tmp_path / "stats"
    interp, _ = evals(cache_dir)
    trainer(tmp_path, [interp]).fit(TinyModule(), datamodule=datamodule(shards))
    files = sorted(os.listdir(cache_dir))
    assert len(files) == 2 and all(f.endswith(".pt") for f in files)  # fvd + fid
    first = dict(interp.last_results)

    # same data and protocol: hit (no real update), same numbers
    interp2, _ = evals(cache_dir)
    trainer(tmp_path, [interp2]).fit(TinyModule(), datamodule=datamodule(shards))
    assert interp2._cache_paths and sorted(os.listdir(cache_dir)) == files
    assert int(interp2.suite.metrics["fvd"].real_features_num_samples) == 0
    for k, v in first.items():
        assert interp2.last_results[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k

    # another protocol (resolution) and other data (fewer clips): misses, new files
    interp3, _ = evals(cache_dir, resolution=8)
    trainer(tmp_path, [interp3]).fit(TinyModule(), datamodule=datamodule(shards))
    assert interp3._cache_paths is None and len(os.listdir(cache_dir)) == 4
    interp4, _ = evals(cache_dir)
    dm = datamodule(shards)
    dm.hparams.val_clips = dm.val_clips = 4  # the loader serves other clips, fewer than the protocols name
    with (pytest.warns(UserWarning, match="fvd8_9f: computed on 4 generated videos, the protocol names 8"),
          pytest.warns(UserWarning, match="fid8_9f: computed on 4 generated videos, the protocol names 8")):
        trainer(tmp_path, [interp4]).fit(TinyModule(), datamodule=dm)
    assert interp4._cache_paths is None and len(os.listdir(cache_dir)) == 6


def test_callback_drops_a_cache_computed_on_other_clips(shards, tmp_path):
    cache_dir = tmp_path / "stats"
    interp, _ = evals(cache_dir)
    trainer(tmp_path, [interp]).fit(TinyModule(), datamodule=datamodule(shards))
    for f in os.listdir(cache_dir):  # pretend the files were computed on other clips
        stats = torch.load(cache_dir / f, weights_only=True)
        torch.save({**stats, "keys_digest": stats["keys_digest"] + 1}, cache_dir / f)
    again, _ = evals(cache_dir)
    with pytest.warns(UserWarning, match="computed on other clips"):
        trainer(tmp_path, [again]).fit(TinyModule(), datamodule=datamodule(shards))
    assert os.listdir(cache_dir) == [] and "fvd8_9f" not in again.last_results and "midf_psnr" in again.last_results


def test_callback_skips_missing_weights_and_sanity_check(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("MARDINI_WEIGHTS", str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match="fid is off"), pytest.warns(UserWarning, match="fvd is off"):
        cb = InterpolationEval(sampler="nearest_frame", num_clips=4, cache_dir=None, missing_weights="skip")
        t = trainer(tmp_path, [cb], num_sanity_val_steps=1)
        t.fit(TinyModule(), datamodule=datamodule(shards))
    assert set(cb.suite.metrics) == {"midf", "traj"} and "fvd" in cb.suite.skipped
    assert cb.last_results["clips"] == 4  # the sanity check did not count


def _ddp_run(shards, tmp_path):
    interp, _ = evals(tmp_path / "stats")
    t = trainer(tmp_path, [interp], strategy="ddp_spawn", devices=2)
    t.fit(TinyModule(), datamodule=datamodule(shards))
    return {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("eval/")}


@pytest.mark.slow
def test_callbacks_under_two_process_cpu_ddp(shards, tmp_path):
    """2 ranks (gloo): each scores its half of the clips, the synced results equal one process on all of them."""
    logged = _ddp_run(shards, tmp_path)
    want = expected_results(shards, InterpolationEval(num_clips=CLIPS, frames=FRAMES, metrics=["midf", "traj"]).protocol)
    assert logged["eval/interpolation/clips"] == CLIPS
    for name in ("midf_psnr", "midf_ssim", "traj_err_px", "traj_detected"):
        assert logged[f"eval/interpolation/{name}"] == pytest.approx(want[name], rel=1e-5), name
    assert len(os.listdir(tmp_path / "stats")) == 2  # rank zero wrote the cache once


@pytest.mark.slow
def test_callback_samples_with_the_pipeline_of_a_training_module(shards, tmp_path):
    """sampler='pipeline': MarDiniPipeline over the live (EMA) networks of a tiny joint module, inside fit (~20 s)."""
    pytest.importorskip("mardini.pipeline")
    from mardini.lit import MarDiniModule

    module = MarDiniModule(size="tiny", planner_resolution=8)
    cb = InterpolationEval(sampler="pipeline", num_clips=4, frames=FRAMES, metrics=["midf", "traj"], steps=2,
                           cache_dir=None)
    trainer(tmp_path, [cb]).fit(module, datamodule=datamodule(shards))
    assert cb.last_results["clips"] == 4 and 0 < cb.last_results["midf_ssim"] < 1
    assert all(k.startswith(("networks.", "ema.")) for k in module.state_dict())


@pytest.mark.slow
def test_the_pipeline_samples_at_the_data_size_and_is_scored_at_the_callbacks(shards, tmp_path, monkeypatch):
    """resolution=8 on 16-px validation data: the model samples the 16-px clips (its training size), the metrics
    get its output downscaled to 8 px with the real given frames, as evaluate.py scores it (~20 s)."""
    pytest.importorskip("mardini.pipeline")
    from pipeline_helpers import record_sampled_and_scored

    from mardini.lit import MarDiniModule

    sampled, scored = record_sampled_and_scored(monkeypatch)
    module = MarDiniModule(size="tiny", planner_resolution=8)
    cb = InterpolationEval(sampler="pipeline", num_clips=4, frames=FRAMES, resolution=8, metrics=["midf"], steps=1,
                           cache_dir=None)
    trainer(tmp_path, [cb]).fit(module, datamodule=datamodule(shards))
    print("sampled at", sampled, "scored (real, fake, given frames real):", scored)
    assert sampled == [(SIZE, SIZE)] and scored == [((8, 8), (8, 8), True)]
    assert cb.last_results["clips"] == 4


class _MapClips(torch.utils.data.Dataset):
    """``n`` random clips of a map-style dataset (a datamodule of one's own), no positions; a ``key`` each with
    ``keys``."""

    def __init__(self, n: int, keys: bool = False) -> None:
        self.video = torch.rand(n, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n)) * 2 - 1
        self.keys = keys

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i], **({"key": f"clip{i:03d}"} if self.keys else {})}

    def index(self, clip: torch.Tensor) -> int:
        """The dataset index of ``clip (T, 3, H, W)``."""
        return next(i for i, v in enumerate(self.video) if torch.equal(v, clip))


class NoisyBlend(LinearBlend):
    """The linear blend plus noise drawn from each clip's seed (its scores depend on the seeds); records
    ``(clip, seed)`` of every clip it samples."""

    def __init__(self) -> None:
        self.sampled = []

    def __call__(self, video, mask, seed=0):
        self.sampled += list(zip(video, seed))
        noise = torch.stack([torch.randn(video.shape[1:], generator=torch.Generator().manual_seed(s))
                             for s in seed])  # (B, T, 3, H, W)
        return (super().__call__(video, mask) + 0.3 * noise * mask[..., None, None, None]).clamp(-1, 1)


def _run_hooks(batches, rank: int, world: int, loader=None, sampler="linear_blend", num_clips: int = 8):
    """The callback's hooks over rank ``rank``'s validation ``batches`` (``loader``: the trainer's
    ``val_dataloaders``), the ranks faked in one process: the results and the metrics' updates, which torchmetrics
    would gather from every rank."""
    import types

    trainer = types.SimpleNamespace(global_rank=rank, world_size=world, is_global_zero=rank == 0, sanity_checking=False,
                                    current_epoch=0, datamodule=None, strategy=None, val_dataloaders=loader)
    module = TinyModule()
    module.log = lambda *args, **kwargs: None  # no Trainer to log to
    cb = InterpolationEval(sampler=sampler, num_clips=num_clips, frames=FRAMES, metrics=["midf"], cache_dir=None)
    cb.on_validation_epoch_start(trainer, module)
    updates = []
    update = cb.suite.update

    def recorded(real, fake, mask, positions=None):
        updates.append((real, fake, mask))
        update(real, fake, mask, positions)

    cb.suite.update = recorded
    for i, batch in enumerate(batches):
        cb.on_validation_batch_end(trainer, module, None, batch, i)
    cb.on_validation_epoch_end(trainer, module)
    return cb.last_results, updates


def _score_as_rank(data: _MapClips, rank: int, world: int, sampler="linear_blend"):
    """:func:`_run_hooks` over rank ``rank``'s ``DistributedSampler`` share of ``data`` (Lightning's under DDP):
    the results, the clips its metrics were updated with (by index) and those updates."""
    from torch.utils.data import DataLoader, DistributedSampler

    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=world, rank=rank,
                                                                       shuffle=False))
    results, updates = _run_hooks(loader, rank, world, loader, sampler)
    return results, [data.index(row) for real, _, _ in updates for row in real], updates


def _gathered(ranks: list[list]) -> dict[str, float]:
    """The MidF results over every rank's updates (what torchmetrics' sync computes)."""
    suite = EvalSuite(InterpolationEval(num_clips=8, frames=FRAMES, metrics=["midf"]).protocol)
    for updates in ranks:
        for real, fake, mask in updates:
            suite.update(real, fake, mask)
    return suite.compute()


@pytest.mark.parametrize("clips, world", [(3, 2), (5, 2), (5, 4), (4, 2)])
def test_the_clips_a_distributed_sampler_repeats_to_pad_the_ranks_are_not_scored(clips, world):
    """num_clips=8 on a map-style set of fewer clips, its shares padded by Lightning's DistributedSampler (3 clips on
    2 ranks: rank 1 reads clips 1, 0): every clip is scored once over the ranks, and the metrics over every rank's
    updates (what torchmetrics gathers) equal one process's. Before, rank 1 scored clip 0 again: 4 clips scored,
    clip 0's PSNR twice in the mean."""
    data = _MapClips(clips)
    one, scored, _ = _score_as_rank(data, 0, 1)
    assert one["clips"] == clips and scored == list(range(clips))
    ranks = [_score_as_rank(data, rank, world) for rank in range(world)]
    assert sorted(i for _, s, _ in ranks for i in s) == list(range(clips))
    assert sum(results["clips"] for results, _, _ in ranks) == clips
    want = {k: v for k, v in one.items() if k != "clips"}
    assert _gathered([updates for _, _, updates in ranks]) == pytest.approx(want, rel=1e-6)


def _seeds_by_clip(data: _MapClips, sampler: NoisyBlend) -> dict[int, int]:
    return {data.index(clip): seed for clip, seed in sampler.sampled}


@pytest.mark.parametrize("keys", [False, True])
@pytest.mark.parametrize("clips, world", [(5, 2), (8, 3)])
def test_a_map_style_clip_gets_the_same_seed_and_scores_on_one_rank_or_several(keys, clips, world):
    """Each clip's sampling seed comes from its identity (its key, else its dataset index read from Lightning's
    DistributedSampler), not from its position in the rank-by-rank order: the clips' seeds, and the metrics of a
    sampler whose output depends on them, are the same on 1 rank and on ``world`` interleaved ones. Key-less clips
    keep the one-process seeds the callbacks always gave them (evaluate.py's ``clip_seeds`` of their index).
    Before, 5 clips on 2 ranks: rank 1's clip 1 was seeded as clip 3 of the order, and the MidF figures moved."""
    from mardini.evaluation.protocol import clip_seeds

    data = _MapClips(clips, keys=keys)
    one_sampler = NoisyBlend()
    one, _, _ = _score_as_rank(data, 0, 1, one_sampler)
    one_seeds = _seeds_by_clip(data, one_sampler)
    assert sorted(one_seeds) == list(range(clips))
    if not keys:
        assert [one_seeds[i] for i in range(clips)] == clip_seeds(0, 0, clips)
    samplers = [NoisyBlend() for _ in range(world)]
    ranks = [_score_as_rank(data, rank, world, samplers[rank])[2] for rank in range(world)]
    assert {i: s for sampler in samplers for i, s in _seeds_by_clip(data, sampler).items()} == one_seeds
    want = {k: v for k, v in one.items() if k != "clips"}
    assert _gathered(ranks) == pytest.approx(want, rel=1e-6)


def _stream_batches(data: _MapClips, rank: int, world: int, keys: bool) -> list[dict]:
    """Rank ``rank``'s batches of 2 as ``VideoDataModule``'s stream gives them: the clips interleaved over the ranks
    (``rank, rank + world, ...``), from a loader whose order cannot be read back."""
    share = list(range(rank, len(data), world))
    return [{"video": data.video[share[i : i + 2]], **({"key": [f"clip{j:03d}" for j in share[i : i + 2]]}
                                                       if keys else {})} for i in range(0, len(share), 2)]


def test_clips_from_a_stream_are_seeded_by_their_key_on_one_rank_or_several():
    """A stream's batches (keyed, their order unreadable) interleaved over 3 ranks: every clip gets the seed it gets
    in one process (by its key), and the metrics agree. Before, clip 1 on rank 1 was seeded as clip 3."""
    data = _MapClips(7, keys=True)
    one_sampler = NoisyBlend()
    one, _ = _run_hooks(_stream_batches(data, 0, 1, keys=True), 0, 1, sampler=one_sampler)
    samplers = [NoisyBlend() for _ in range(3)]
    ranks = [_run_hooks(_stream_batches(data, r, 3, keys=True), r, 3, sampler=samplers[r])[1] for r in range(3)]
    assert {i: s for sampler in samplers for i, s in _seeds_by_clip(data, sampler).items()} == _seeds_by_clip(
        data, one_sampler)
    assert _gathered(ranks) == pytest.approx({k: v for k, v in one.items() if k != "clips"}, rel=1e-6)


def test_clips_without_a_key_or_a_readable_order_are_seeded_by_position_and_warn_once_under_ddp(recwarn):
    """Where neither a key nor the loader's order names a clip, the positional rule stays (earlier ranks' shares,
    then this rank's), and under DDP the callback warns once, naming the fix; one process does not warn."""
    from mardini.evaluation.protocol import clip_seeds

    data = _MapClips(5)
    sampler = NoisyBlend()
    _run_hooks(_stream_batches(data, 0, 1, keys=False), 0, 1, sampler=sampler, num_clips=5)
    assert [s for _, s in sampler.sampled] == clip_seeds(0, 0, 5)
    assert not [w for w in recwarn if "without a 'key'" in str(w.message)]
    sampler = NoisyBlend()
    _run_hooks(_stream_batches(data, 1, 2, keys=False), 1, 2, sampler=sampler, num_clips=5)
    assert [s for _, s in sampler.sampled] == clip_seeds(0, 3, 2)  # rank 0's share is 3 clips
    warned = [str(w.message) for w in recwarn if "without a 'key'" in str(w.message)]
    assert len(warned) == 1 and "collate a 'key' per clip" in warned[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_hooks(_stream_batches(data, 0, 2, keys=False), 0, 2, num_clips=5)  # two batches, one warning
    assert len([w for w in caught if "without a 'key'" in str(w.message)]) == 1


@pytest.mark.parametrize("total, world, shares", [(5, 2, [3, 2]), (8, 3, [3, 3, 2]), (2, 4, [1, 1, 0, 0]),
                                                  (6, 3, [2, 2, 2])])
def test_the_clips_are_shared_over_the_ranks_the_first_ranks_taking_the_remainder(total, world, shares):
    """Every clip of ``num_clips`` is scored by exactly one rank; the earlier ranks take one more where they do not
    divide evenly (the order DistributedSampler deals them in)."""
    from mardini.evaluation.callbacks import clips_for_rank

    assert [clips_for_rank(total, rank, world) for rank in range(world)] == shares


def test_a_batch_with_fewer_keys_than_clips_is_refused():
    """A collate that drops keys would seed clips by the wrong key, or some by none: refused, naming the fix."""
    from mardini.evaluation.callbacks import identity_seeds

    batch = {"video": torch.zeros(2, FRAMES, 3, SIZE, SIZE), "key": ["clip000"]}
    with pytest.raises(ValueError, match="1 keys for 2 clips; collate one key per clip"):
        identity_seeds(0, batch, [0, 1], None, 0)
    assert len(identity_seeds(0, batch, [0], None, 0)) == 1


def test_a_padding_batch_is_not_scored():
    """A rank whose validation stream ran short under FSDP runs zero-weight copies of its last batch
    (mardini.data.batching.padding_of): the callback scores none of its clips (its results are the real batches'
    alone). Before, it scored the copy's clips again (6 clips of 4, two of them twice)."""
    from torch.utils.data import DataLoader

    from mardini.data.batching import padding_of

    batches = list(DataLoader(_MapClips(4), batch_size=2))
    alone, _ = _run_hooks(batches, 0, 1)
    padded, _ = _run_hooks([*batches, padding_of(batches[-1])], 0, 1)
    assert alone["clips"] == 4 and padded == pytest.approx(alone, rel=1e-6)


@pytest.mark.parametrize("keys", [False, True])
@pytest.mark.parametrize("clips, world, num_clips", [(8, 2, 8), (8, 2, 5), (7, 3, 6)])
def test_a_sequential_sampler_on_every_rank_scores_each_clip_once(keys, clips, world, num_clips):
    """``trainer.use_distributed_sampler: false`` with the loader's plain ``SequentialSampler`` under DDP: every rank
    reads the whole set. The ranks score the clips Lightning's ``DistributedSampler`` would have given them (rank r:
    dataset indices r, r + R, ... below ``num_clips``), so the scored set and the metrics are one process's. Before,
    every rank scored the first clips of its pass: 8 clips on 2 ranks, clips 0-3 twice and 4-7 never."""
    from torch.utils.data import DataLoader

    data = _MapClips(clips, keys=keys)
    one, scored, _ = _score_as_rank(data, 0, 1)
    ranks = []
    for rank in range(world):
        loader = DataLoader(data, batch_size=2)  # a SequentialSampler: the whole set on every rank
        results, updates = _run_hooks(loader, rank, world, loader, num_clips=num_clips)
        ranks.append((results, [data.index(row) for real, _, _ in updates for row in real], updates))
    assert sorted(i for _, s, _ in ranks for i in s) == list(range(num_clips))
    assert [s for _, s, _ in ranks] == [list(range(r, num_clips, world)) for r in range(world)]
    alone, _ = _run_hooks(DataLoader(data, batch_size=2), 0, 1, DataLoader(data, batch_size=2), num_clips=num_clips)
    want = {k: v for k, v in alone.items() if k != "clips"}
    assert _gathered([updates for _, _, updates in ranks]) == pytest.approx(want, rel=1e-6)

"""The evaluation callbacks inside a real ``lightning.Trainer`` fit: results, EMA, checkpoints, cache, DDP."""

from __future__ import annotations

import contextlib
import os

import lightning as L
import pytest
import torch
from torch import nn

from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.evaluation import EvalProtocol, EvalSuite, ImageToVideoEval, InterpolationEval, LinearBlend

FRAMES, SIZE, CLIPS = 9, 16, 8


class VideoPool(nn.Module):
    num_features = 12

    def forward(self, x):  # (B, 3, T, 224, 224) -> (B, 12)
        return nn.functional.adaptive_avg_pool3d(x, (1, 2, 2)).flatten(1)


class FramePool(nn.Module):
    num_features = 12

    def forward(self, x):  # (N, 3, H, W) -> (N, 12)
        return nn.functional.adaptive_avg_pool2d(x, (2, 2)).flatten(1)


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
    """``n`` random clips of a map-style dataset (a datamodule of one's own), no keys, no positions."""

    def __init__(self, n: int) -> None:
        self.video = torch.rand(n, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n)) * 2 - 1

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i]}


def _score_as_rank(data: _MapClips, rank: int, world: int) -> tuple[dict[str, float], list[int], list]:
    """The callback's hooks over rank ``rank``'s ``DistributedSampler`` share of ``data`` (Lightning's under DDP),
    the ranks faked in one process: the results, the clips its metrics were updated with (by index) and those
    updates, which torchmetrics would gather from every rank."""
    import types

    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=2, sampler=sampler)
    trainer = types.SimpleNamespace(global_rank=rank, world_size=world, is_global_zero=rank == 0, sanity_checking=False,
                                    current_epoch=0, datamodule=None, strategy=None, val_dataloaders=loader)
    module = TinyModule()
    module.log = lambda *args, **kwargs: None  # no Trainer to log to
    cb = InterpolationEval(sampler="linear_blend", num_clips=8, frames=FRAMES, metrics=["midf"], cache_dir=None)
    cb.on_validation_epoch_start(trainer, module)
    updates, scored = [], []
    update = cb.suite.update

    def recorded(real, fake, mask, positions=None):
        updates.append((real, fake, mask))
        scored.extend(next(i for i, v in enumerate(data.video) if torch.equal(v, row)) for row in real)
        update(real, fake, mask, positions)

    cb.suite.update = recorded
    for i, batch in enumerate(loader):
        cb.on_validation_batch_end(trainer, module, None, batch, i)
    cb.on_validation_epoch_end(trainer, module)
    return cb.last_results, scored, updates


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
    gathered = EvalSuite(InterpolationEval(num_clips=8, frames=FRAMES, metrics=["midf"]).protocol)
    for _, _, updates in ranks:
        for real, fake, mask in updates:
            gathered.update(real, fake, mask)
    want = {k: v for k, v in one.items() if k != "clips"}
    assert gathered.compute() == pytest.approx(want, rel=1e-6)

"""Gradient accumulation (``trainer.accumulate_grad_batches``): what the optimiser step and the logs cover."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler

from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.lit import GenerationModule, MarDiniModule
from mardini.lit.schedules import warmup_cosine

TINY = dict(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("synth"), train=12, val=2, frames=12, size=16)


def _dm(root: Path, **kw) -> VideoDataModule:
    args = dict(train_shards=str(root / "train"), val_shards=None, frames=4, fps=8, resolution=16, batch_size=2,
                num_workers=0, shuffle_buffer=4, epoch_size=100)
    return VideoDataModule(**{**args, **kw})


def _logged_and_drawn(synth: Path, tmp: Path, accumulate: int, model=None,
                      drawn_by=lambda model, per_sample: (per_sample, model._last_template)
                      ) -> tuple[dict[int, dict], list[list[tuple]]]:
    """A 2-step fit logging every step to a CSV file: its rows by step, and per step what ``drawn_by`` takes from
    each micro-batch (default: its per-clip losses (B,) and templates (B,))."""
    model = model or GenerationModule(**TINY, templates={"random": 0.5, "interpolation": 0.5})
    drawn: list[tuple[torch.Tensor, ...]] = []
    compute_loss = model.compute_loss

    def recording(batch, generator, train):
        per_sample = compute_loss(batch, generator, train)  # (B,)
        drawn.append(tuple(t.detach().clone() for t in drawn_by(model, per_sample)))
        return per_sample

    model.compute_loss = recording
    trainer = L.Trainer(max_steps=2, accelerator="cpu", accumulate_grad_batches=accumulate, log_every_n_steps=1,
                        logger=L.pytorch.loggers.CSVLogger(tmp), enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    trainer.fit(model, datamodule=_dm(synth))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f) if r.get("train/loss")}
    return rows, [drawn[s * accumulate : (s + 1) * accumulate] for s in range(2)]


def test_the_logged_training_losses_are_means_over_every_clip_of_the_accumulation_window(synth, tmp_path):
    rows, windows = _logged_and_drawn(synth, tmp_path, 2)
    assert sorted(rows) == [0, 1]  # one row per optimiser step
    for step, window in enumerate(windows):
        losses = torch.cat([loss for loss, _ in window])  # (2 micro-batches x 2 clips,)
        templates = torch.cat([t for _, t in window])
        logged = rows[step]
        assert float(logged["train/loss"]) == pytest.approx(float(losses.mean()), rel=1e-6)
        assert float(logged["train/loss"]) != pytest.approx(float(window[-1][0].mean()), rel=1e-6)  # not the last's
        for i, name in enumerate(("random", "interpolation")):
            sel = templates == i
            if sel.any():
                assert float(logged[f"train/loss_{name}"]) == pytest.approx(float(losses[sel].mean()), rel=1e-6)
            else:
                assert logged[f"train/loss_{name}"] == ""


def test_without_accumulation_the_logged_training_losses_are_the_batch_s_means_bit_for_bit(synth, tmp_path):
    rows, windows = _logged_and_drawn(synth, tmp_path, 1)
    for step, ((loss, templates),) in enumerate(windows):
        assert float(rows[step]["train/loss"]) == float(loss.mean())  # the demo's loss curves, as before
        for i, name in enumerate(("random", "interpolation")):
            if (templates == i).any():
                assert float(rows[step][f"train/loss_{name}"]) == float(loss[templates == i].mean())


def _joint_parts(synth: Path, tmp: Path, accumulate: int) -> tuple[dict[int, dict], list[list[tuple]]]:
    """:func:`_logged_and_drawn` of a joint stage with the reconstruction loss on: each micro-batch's loss parts
    ``(B, [diffusion, plan recon])``."""
    model = MarDiniModule(**TINY, planner={"depth": 1}, plan_recon_weight=0.5)
    return _logged_and_drawn(synth, tmp, accumulate, model, lambda model, per_sample: (model._last_parts,))


def test_the_logged_loss_parts_of_a_joint_stage_are_means_over_the_accumulation_window(synth, tmp_path):
    rows, windows = _joint_parts(synth, tmp_path, 2)
    assert sorted(rows) == [0, 1]
    for step, window in enumerate(windows):
        parts = torch.cat([p for (p,) in window])  # (2 micro-batches x 2 clips, [diffusion, plan recon])
        for i, name in enumerate(("train/diffusion_loss", "train/plan_recon_loss")):
            logged = float(rows[step][name])
            # before: the last micro-batch's mean
            assert logged != pytest.approx(float(window[-1][0][:, i].mean()), rel=1e-6), name
            assert logged == pytest.approx(float(parts[:, i].mean()), rel=1e-6), name


def test_without_accumulation_the_logged_loss_parts_of_a_joint_stage_are_the_batch_s_means_bit_for_bit(synth,
                                                                                                         tmp_path):
    rows, windows = _joint_parts(synth, tmp_path, 1)
    for step, ((parts,),) in enumerate(windows):
        assert float(rows[step]["train/diffusion_loss"]) == float(parts[:, 0].mean())
        assert float(rows[step]["train/plan_recon_loss"]) == float(parts[:, 1].mean())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_every_optimiser_step_of_an_epoch_takes_a_full_accumulation_window(synth, tmp_path, accumulate):
    steps: list[int] = []  # the global step of each micro-batch trained

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append(trainer.global_step)

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Record()])
    dm = _dm(synth, batch_size=4, epoch_size=12)  # 3 batches of 4 clips
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(GenerationModule(**TINY), datamodule=dm)
    windows = [steps.count(s) for s in sorted(set(steps))]  # micro-batches per optimiser step
    print(f"accumulate {accumulate}: micro-batches per step {windows}")
    # without accumulation the epoch's 3 batches as always; with 2, before: [2, 1], the last step on one micro-batch
    # with its gradient halved
    assert windows == ([1, 1, 1] if accumulate == 1 else [2])
    said = [str(w.message) for w in caught if "data.epoch_size" in str(w.message)]
    assert said == ([] if accumulate == 1 else [
        "data.epoch_size=12 makes 3 batches of 4 clips per rank, not a multiple of the 2 accumulated per optimiser "
        "step: an epoch trains 2 (its last step would take 1, its gradient still divided by 2); set data.epoch_size "
        "to a multiple of 8"])


def test_an_epoch_shorter_than_one_accumulation_window_is_refused_and_a_scheduler_s_windows_count(synth):
    dm = _dm(synth, batch_size=4, epoch_size=12)  # 3 batches of 4 clips
    dm.trainer = L.Trainer(accelerator="cpu", accumulate_grad_batches=4, logger=False)
    with pytest.raises(ValueError, match=r"data.epoch_size=12 is smaller than one optimiser step's clips per rank \(4 "
                                         r"accumulated batches of 4\); raise data.epoch_size to a multiple of 16$"):
        dm.setup("fit")
    dm = _dm(synth, batch_size=4, epoch_size=20)  # 5 batches
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[GradientAccumulationScheduler({0: 1, 1: 2})])
    with pytest.warns(UserWarning, match="makes 5 batches .* an epoch trains 4"):
        dm.setup("fit")
    assert len(dm.train_set) == 4  # a multiple of every window the scheduler sets


def _schedules(synth: Path, tmp: Path, batch_size: int, accumulate: int) -> tuple[list[tuple], list[int], dict]:
    """A 4-step joint fit with an interpolating Curriculum, the LR from ``blr`` (warm-up then cosine) and the EMA:
    per micro-batch (global step, keep ratio, LR) as it trains, the global step of each EMA update, and the CSV
    rows by step."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from mardini.lit.curriculum import Curriculum, Milestone

    seen: list[tuple] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            seen.append((trainer.global_step, pl_module.mask_sampler.keep_ratio, lr))

    model = MarDiniModule(**{**TINY, "lr": None, "blr": 0.1}, planner={"depth": 1}, warmup_steps=2, ema_decay=0.9)
    updates: list[int] = []
    update_ema = model.update_ema
    model.update_ema = lambda: (updates.append(model.global_step), update_ema())
    curriculum = Curriculum([Milestone(0, keep_ratio=(0.5, 1.0)), Milestone(4, keep_ratio=(0.2, 0.6))],
                            interpolate=True)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", accumulate_grad_batches=accumulate, log_every_n_steps=1,
                        logger=L.pytorch.loggers.CSVLogger(tmp), enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
                        callbacks=[curriculum, Record(), LearningRateMonitor("step")])
    trainer.fit(model, datamodule=_dm(synth, batch_size=batch_size))
    rows: dict[int, dict] = {}  # the LR monitor writes rows of its own: merged by step
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        for r in csv.DictReader(f):
            rows.setdefault(int(r["step"]), {}).update({k: v for k, v in r.items() if v != ""})
    return seen, updates, rows


def test_curriculum_lr_ema_and_logged_steps_count_optimiser_steps_under_accumulation(synth, tmp_path):
    """Batches of 2 clips accumulated 2 at a time against batches of 4: the same 4 optimiser steps, each window's
    micro-batches under one step's keep ratio and LR (the LR rule reading 4 clips per step in both), 4 EMA updates,
    one logged row per optimiser step with the same LR, keep ratio and EMA decay."""
    one, one_updates, one_rows = _schedules(synth, tmp_path / "one", 4, 1)
    two, two_updates, two_rows = _schedules(synth, tmp_path / "two", 2, 2)
    assert len(one) == 4 and len(two) == 8
    assert two[0::2] == two[1::2] == one  # (global step, keep ratio, LR) per micro-batch of each window
    assert [step for step, _, _ in one] == [0, 1, 2, 3]
    assert len({ratio for _, ratio, _ in one}) == 4  # moves every optimiser step
    peak = 0.1 * 4 / 256  # blr x clips per optimiser step / 256: 4 clips in both
    assert [lr for _, _, lr in one] == pytest.approx([peak * warmup_cosine(s, 2, 4, 0.1) for s in range(4)], rel=1e-12)
    assert one_updates == two_updates == [0, 1, 2, 3]  # one EMA update per optimiser step, at its step
    assert sorted(one_rows) == sorted(two_rows) == [0, 1, 2, 3]
    for step in one_rows:
        for key in ("lr-AdamW/pg1", "lr-AdamW/pg2", "curriculum/keep_ratio_min", "curriculum/keep_ratio_max",
                    "ema/decay"):
            assert one_rows[step][key] == two_rows[step][key], (step, key)

"""Gradient accumulation (``trainer.accumulate_grad_batches``): what the optimiser step and the logs cover."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.lit import GenerationModule

TINY = dict(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("synth"), train=12, val=2, frames=12, size=16)


def _dm(root: Path, **kw) -> VideoDataModule:
    args = dict(train_shards=str(root / "train"), val_shards=None, frames=4, fps=8, resolution=16, batch_size=2,
                num_workers=0, shuffle_buffer=4, epoch_size=100)
    return VideoDataModule(**{**args, **kw})


def _logged_and_drawn(synth: Path, tmp: Path, accumulate: int) -> tuple[dict[int, dict], list[list[tuple]]]:
    """A 2-step fit logging every step to a CSV file: its rows by step, and per step the (per-clip losses (B,),
    templates (B,)) of each micro-batch."""
    model = GenerationModule(**TINY, templates={"random": 0.5, "interpolation": 0.5})
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    compute_loss = model.compute_loss

    def recording(batch, generator, train):
        per_sample = compute_loss(batch, generator, train)  # (B,)
        drawn.append((per_sample.detach().clone(), model._last_template.clone()))
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

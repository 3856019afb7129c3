"""Resumes at edges the CLI tests leave out: a fit that stops at an epoch's last batch and saves at its end,
with and without gradient accumulation and the epoch's validation; a fit that max_time or an early stop ends inside an
epoch; a resume under another LR schedule length."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.lit import GenerationModule


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("synth"), train=12, val=2, frames=12, size=16)


class _Record(L.Callback):
    """Each training batch's (global step, batch index, clip keys), and each validation's global step."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch_idx, tuple(batch["key"])))

    def on_validation_end(self, trainer, pl_module):
        self.seen.append(("validation", trainer.global_step))


def _fit(synth: Path, steps: int, accumulate: int, validate: bool, ckpt_path=None) -> tuple[L.Trainer, list]:
    torch.manual_seed(0)
    model = GenerationModule(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3, warmup_steps=1,
                             decay_steps=10)  # a schedule whose length is not the fit's max_steps
    data = VideoDataModule(train_shards=str(synth / "train"), val_shards=str(synth / "val") if validate else None,
                           frames=4, fps=8, resolution=16, batch_size=2, num_workers=0, shuffle_buffer=4,
                           epoch_size=4 * 2 * accumulate, val_clips=2)  # 4 optimiser steps per epoch
    record = _Record()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, limit_val_batches=1 if validate else 0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, record.seen


@pytest.mark.parametrize(("accumulate", "validate"), [(1, False), (2, False), (1, True)])
def test_a_fit_saved_at_its_end_on_an_epoch_s_last_batch_resumes_as_one_run(synth, tmp_path, accumulate, validate):
    """6 steps at once vs 4 (the epoch's last batch), saved at the fit's end as StepCheckpoint saves it, resumed to 6.
    Before, where the epoch ended without a validation (limit_val_batches 0, or validation every n epochs), the
    resume ran one batch more in the finished epoch (batch index 4 x accumulate: under accumulation a step of one
    micro-batch), read from the next data epoch, then started another: other clips and weights from step 4 on (88 of
    94 tensors differed). The validated case was right already and must stay so (no validation run twice)."""
    one, seen = _fit(synth, 6, accumulate, validate)
    first, _ = _fit(synth, 4, accumulate, validate)
    first.save_checkpoint(tmp_path / "end.ckpt")
    resumed, resumed_seen = _fit(synth, 6, accumulate, validate, ckpt_path=tmp_path / "end.ckpt")
    at_step_4 = next(i for i, s in enumerate(seen) if s[0] == 4)
    assert resumed_seen == seen[at_step_4:]  # the same batch indices, clips and validations (none repeated)
    want, got = one.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_a_resume_under_another_max_steps_says_the_lr_schedule_changes(synth, tmp_path):
    """decay_steps unset: the schedule's length is trainer.max_steps. A run of 4 resumed with max_steps 6 went on under
    a 6-step cosine without a word (the LR at step 4 jumped from the floor, 0.1, to 0.41 of its peak); now it warns
    naming both lengths and the setting that keeps the run's. The plain rerun and a fixed decay_steps do not."""
    import warnings

    def fit(steps: int, ckpt_path=None, **model) -> list[str]:
        module = GenerationModule(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3, warmup_steps=1,
                                  **model)
        data = VideoDataModule(train_shards=str(synth / "train"), val_shards=None, frames=4, fps=8, resolution=16,
                               batch_size=2, num_workers=0, shuffle_buffer=4, epoch_size=100)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(tmp_path / f"{steps}.ckpt")
        return [str(w.message) for w in caught if "LR schedule" in str(w.message)]

    assert fit(4) == []
    said = fit(6, tmp_path / "4.ckpt")
    assert len(said) == 1 and "an LR schedule of 6 steps where it was trained with one of 4" in said[0], said
    assert "LR at step 4 moves from 0.1 to 0.4109 x its peak" in said[0] and "decay_steps: 4" in said[0], said
    assert fit(4, tmp_path / "4.ckpt") == []  # the same command again: the same schedule
    assert fit(3, decay_steps=8) == [] and fit(6, tmp_path / "3.ckpt", decay_steps=8) == []


class _RecordLR(L.Callback):
    """The LR each optimiser step trains with, by global step."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def _fit_lr(synth: Path, tmp_path: Path, steps: int, batch_size: int, ckpt_path=None) -> tuple[dict, list[str]]:
    """A fit of ``batch_size`` clips under model.blr's rule (saved as ``<steps>.ckpt`` where it starts from scratch):
    the LR of each step, checked against this fit's peak on the run's schedule, and the 'another LR peak' warnings."""
    import warnings

    from mardini.lit.schedules import scaled_lr, warmup_cosine

    module = GenerationModule(size="tiny", generator={"depth": 1}, planner_resolution=8, blr=7e-4,
                              warmup_steps=1, decay_steps=10)
    data = VideoDataModule(train_shards=str(synth / "train"), val_shards=None, frames=4, fps=8, resolution=16,
                           batch_size=batch_size, num_workers=0, shuffle_buffer=4, epoch_size=100)
    record = _RecordLR()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if ckpt_path is None:
        trainer.save_checkpoint(tmp_path / f"{steps}.ckpt")
    ratio = module.hparams.min_lr_ratio
    want = {s: scaled_lr(7e-4, batch_size) * warmup_cosine(s, 1, 10, ratio) for s in record.lr}
    assert record.lr == pytest.approx(want, rel=1e-12)  # this fit's peak on the run's schedule, every step
    return record.lr, [str(w.message) for w in caught if "another LR peak" in str(w.message)]


def test_a_resume_with_another_lr_peak_trains_with_it_and_says_so(synth, tmp_path):
    """Lightning's restore put the checkpoint's peak LR back (the optimiser's initial_lr, the schedule's base_lrs): a
    resume with another data.batch_size under blr's rule (or another model.lr) trained on at the old peak without a
    word, while the settings warning said the run went on under the new ones. Now the resumed steps train with the
    LR of the new peak on the run's schedule, and one warning gives both peaks; a resume of the same peak is left
    alone."""
    _fit_lr(synth, tmp_path, 2, batch_size=2)
    lr, said = _fit_lr(synth, tmp_path, 3, batch_size=4, ckpt_path=tmp_path / "2.ckpt")
    assert sorted(lr) == [2] and len(said) == 1, said
    assert "5.469e-06 -> 1.094e-05 (model.blr 0.0007 x this fit's global batch of 4 clips" in said[0], said
    assert "from step 2" in said[0] and "model.init_args.lr: 5.46875e-06" in said[0], said
    assert _fit_lr(synth, tmp_path, 3, batch_size=2, ckpt_path=tmp_path / "2.ckpt")[1] == []  # the same peak


def test_the_lr_a_moved_peak_s_warning_names_keeps_the_run_s_peak_exactly(synth, tmp_path):
    """The warning's way to keep the run's peak (``model.init_args.lr: X``) gave X to 6 digits: for a peak of more
    (blr 7e-4 x 6 clips / 256 = 1.640625e-05) X was another float, so a resume with it moved the LR again and warned
    of 'another LR peak' once more. X is the peak's exact float now."""
    from mardini.lit.schedules import scaled_lr

    _fit_lr(synth, tmp_path, 2, batch_size=6)
    said = _fit_lr(synth, tmp_path, 3, batch_size=4, ckpt_path=tmp_path / "2.ckpt")[1]
    assert len(said) == 1, said
    advised = float(said[0].rsplit("model.init_args.lr: ", 1)[1].split()[0])
    assert advised == scaled_lr(7e-4, 6), said[0]


class _RecordEpochs(_Record):
    """As :class:`_Record`, each training batch with the epoch Lightning counts it in."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, trainer.current_epoch, batch_idx, tuple(batch["key"])))


class _StopAfter(L.Callback):
    """Sets ``trainer.should_stop`` at the end of step ``step``'s batch, as Lightning's Timer does there once
    ``max_time`` has passed (a real Timer stops where the clock says, not at a chosen step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.should_stop or trainer.global_step == self.step


def _stopping_fit(synth: Path, folder: Path, stop: str | None, ckpt_path=None) -> tuple[L.Trainer, list]:
    """Up to 6 steps, 4 per epoch, a validation every 2 batches, StepCheckpoint saving into ``folder`` as train.py's
    (every 100 steps: here only where a fit ends); ``stop``: ``max_time`` (stopped at step 1's end, as the Timer
    does), ``early_stop`` (EarlyStopping at the first validation, step 2's) or None."""
    from lightning.pytorch.callbacks import EarlyStopping

    from mardini.lit.step_checkpoint import StepCheckpoint

    torch.manual_seed(0)
    model = GenerationModule(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3, warmup_steps=1,
                             decay_steps=10)
    data = VideoDataModule(train_shards=str(synth / "train"), val_shards=str(synth / "val"), frames=4, fps=8,
                           resolution=16, batch_size=2, num_workers=0, shuffle_buffer=4, epoch_size=8, val_clips=2)
    record = _RecordEpochs()
    callbacks = [record, StepCheckpoint(dirpath=folder, filename="step{step}", save_last=True, save_top_k=1,
                                        every_n_train_steps=100)]
    if stop == "max_time":
        callbacks.append(_StopAfter(1))
    if stop == "early_stop":
        callbacks.append(EarlyStopping(monitor="val/loss", stopping_threshold=1e9, check_on_train_epoch_end=False))
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, val_check_interval=2, limit_val_batches=1,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, record.seen


@pytest.mark.parametrize(("stop", "at_step"), [("max_time", 1), ("early_stop", 2)])
def test_a_fit_stopped_mid_epoch_by_max_time_or_an_early_stop_resumes_as_one_run(synth, tmp_path, stop, at_step):
    """6 steps at once vs a fit that max_time (Lightning's Timer) or EarlyStopping ends inside its first epoch,
    resumed from its last.ckpt to 6: the same epochs, batches, clips, validations and weights. Before, StepCheckpoint
    saved such a stop at the fit's end, where Lightning had counted the cut epoch as completed: the resume went on in
    that epoch's batches counting it as epoch 1."""
    one, seen = _stopping_fit(synth, tmp_path / "one", None)
    stopped, _ = _stopping_fit(synth, tmp_path / "cut", stop)
    assert stopped.global_step == at_step
    resumed, resumed_seen = _stopping_fit(synth, tmp_path / "cut", None, ckpt_path=tmp_path / "cut" / "last.ckpt")
    from_stop = next(i for i, s in enumerate(seen) if s[0] == at_step)
    assert resumed_seen == seen[from_stop:]
    want, got = one.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_the_checkpoint_records_each_lr_schedule_length_the_run_trained_with(synth, tmp_path):
    """``python -m mardini.demo --final-steps 650`` then a plain demo resumed the last stage to 1300 steps under
    another LR schedule, and its checkpoint said only the final ``lr_schedule_steps`` (1300, the demo's): the
    reproduction scored it as the demo's chain. ``lr_schedule_history`` now lists each length from the step it took
    over; a resume at the same length (a preemption, a requeue) adds nothing."""
    from mardini.lit.checkpoints import read_checkpoint

    def fit(steps: int, name: str, ckpt_path=None, stop: int | None = None) -> list:
        module = GenerationModule(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3, warmup_steps=1)
        data = VideoDataModule(train_shards=str(synth / "train"), val_shards=None, frames=4, fps=8, resolution=16,
                               batch_size=2, num_workers=0, shuffle_buffer=4, epoch_size=100)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[_StopAfter(stop)] if stop else [])
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        trainer.save_checkpoint(tmp_path / name)
        return read_checkpoint(tmp_path / name)["mardini"]["lr_schedule_history"]

    assert fit(4, "stopped.ckpt", stop=2) == [[0, 4]]  # preempted at step 2 of 4
    assert fit(4, "requeued.ckpt", tmp_path / "stopped.ckpt") == [[0, 4]]  # the same length: one schedule
    assert fit(2, "short.ckpt") == [[0, 2]]  # --final-steps 2
    assert fit(4, "longer.ckpt", tmp_path / "short.ckpt") == [[0, 2], [2, 4]]  # then resumed to the full length

"""The validation pass's loader workers end with the pass (``mardini.lit.loop_state.end_validation_workers``)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import lightning as L
import pytest

from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.lit import GenerationModule, base


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("synth"), train=8, val=8, frames=12, size=16)


class WorkerWatch(L.Callback):
    """Per validation pass: its clip keys, its ``val/loss``, and the validation workers (child processes that
    appeared during it) still alive at the next training batch."""

    def __init__(self) -> None:
        self.before: set[int] = set()  # child processes at the last training batch (the training loader's workers)
        self.val_workers: set[int] = set()
        self.keys: list[list[str]] = []
        self.losses: list[float] = []
        self.alive_in_training: list[set[int]] = []

    @staticmethod
    def children() -> set[int]:
        return {p.pid for p in mp.active_children()}  # (joins the children that ended)

    def on_fit_start(self, trainer, pl_module):
        self.before = self.children()  # processes from before the fit (another test's, a spawn resource tracker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.val_workers:
            self.alive_in_training.append(self.val_workers & self.children())
            self.val_workers = set()
        self.before = self.children()

    def on_validation_epoch_start(self, trainer, pl_module):
        self.keys.append([])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.keys[-1] += list(batch["key"])
        self.val_workers |= self.children() - self.before

    def on_validation_end(self, trainer, pl_module):
        self.losses.append(float(trainer.callback_metrics["val/loss"]))


def _fit(synth: Path, tmp_path: Path) -> WorkerWatch:
    """A sanity check and a validation after each of 3 steps, each cut to 1 of the 4 batches of 2 clips by
    ``limit_val_batches``, with 2 workers per loader."""
    L.seed_everything(0, verbose=False)  # the same training draws in every fit
    watch = WorkerWatch()
    dm = VideoDataModule(train_shards=str(synth / "train"), val_shards=str(synth / "val"), frames=4, fps=8,
                         resolution=16, batch_size=2, num_workers=2, shuffle_buffer=4, epoch_size=100)
    model = GenerationModule(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=1, val_check_interval=1, num_sanity_val_steps=1, callbacks=[watch])
    trainer.fit(model, datamodule=dm)
    return watch


def test_validation_workers_end_with_the_pass_and_the_validation_is_unchanged(synth, tmp_path, monkeypatch):
    """Before, Lightning kept the unfinished iterator of a pass ``limit_val_batches`` cut short until the next pass:
    its 2 workers stayed alive through the training that followed (seen at the next training batch; the sanity
    check's at the first one).
    Now none is, and every pass still reads the same first clips and logs the same ``val/loss`` as then."""
    now = _fit(synth, tmp_path / "now")
    with monkeypatch.context() as m:
        m.setattr(base, "end_validation_workers", lambda trainer: None, raising=False)  # as before
        then = _fit(synth, tmp_path / "then")
    assert len(then.alive_in_training) == 3 and all(len(alive) == 2 for alive in then.alive_in_training), (
        f"the check did not see the lingering workers: {then.alive_in_training}")
    assert now.alive_in_training == [set()] * 3, (
        f"validation workers alive during the training that followed their pass: {now.alive_in_training}")
    assert (now.keys, now.losses) == (then.keys, then.losses)
    assert now.keys == [now.keys[0]] * 4  # the sanity check and 3 validations: the stream restarts each pass

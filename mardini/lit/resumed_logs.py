"""A resumed fit logs on from where its checkpoint stopped, on the same x-axis as one uninterrupted run, continues
a CSV logger's ``metrics.csv`` and rewrites a TensorBoard logger's ``hparams.yaml``."""

from __future__ import annotations

import csv
import os

import lightning as L
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class ResumedLogs(L.Callback):
    """Puts the step a resumed fit logs at back on the global step, and tells each :class:`ContinuedCSVLogger` the step
    the fit goes on from.

    Lightning logs every scalar at ``fit_loop.epoch_loop._batches_that_stepped`` (the optimiser steps taken: the
    scalars of step ``k`` at ``k - 1``). A checkpoint saved at the end of a fit (``StepCheckpoint.on_train_end``: one
    that a stop at an epoch's end ended; before 2026-12-07 one that ``max_steps``, ``max_time`` or an early stop ended)
    records it after Lightning has counted the last step, and a resume from it whose first batch is due a validation
    (the one the last step ran) counts that step again: each such resume logged one step further on, checkpoints
    already written included. At the first training batch after a restore this sets it to the global step, as an
    uninterrupted run has it there, before any callback logs (``MarDiniCLI`` puts this callback first).

    A resumed fit's TensorBoard loggers rewrite their ``hparams.yaml`` (:func:`rewrite_hparams`)."""

    _restored = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restored = trainer.ckpt_path is not None
        for logger in trainer.loggers:
            if isinstance(logger, ContinuedCSVLogger):
                logger.continue_from(trainer.global_step if self._restored else None)
            elif isinstance(logger, TensorBoardLogger) and self._restored:
                rewrite_hparams(logger)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._restored and pl_module.automatic_optimization:  # one optimiser step per stepped batch
            set_logged_step(trainer, trainer.global_step)
        self._restored = False


@rank_zero_only
def rewrite_hparams(logger: TensorBoardLogger) -> None:
    """Write the hyper-parameters the resumed fit logged (its code and the run's code history among them) over the
    ``hparams.yaml`` of ``logger``'s folder. Lightning's TensorBoardLogger writes that file only where there is none,
    so it kept the first start's code and settings whatever the resumes ran (a CSV logger's is rewritten)."""
    if logger.hparams:
        save_hparams_to_yaml(os.path.join(logger.log_dir, logger.NAME_HPARAMS_FILE), logger.hparams)


def set_logged_step(trainer: L.Trainer, step: int) -> None:
    """Make ``step`` the step Lightning logs the next scalars at: ``fit_loop.epoch_loop._batches_that_stepped``
    (private; Lightning has no public setter). Assigning to a Lightning without that attribute would change nothing
    and say nothing, so that is an error naming the fix."""
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "_batches_that_stepped"):
        raise RuntimeError(
            "ResumedLogs (mardini/lit/resumed_logs.py): this Lightning's training epoch loop has no "
            "_batches_that_stepped, the step it logged scalars at; install requirements.txt's lightning, or port "
            "ResumedLogs and SampleGrids to this version (run tests/test_library_internals.py first)")
    loop._batches_that_stepped = step


class Utf8Files:
    """An fsspec filesystem whose text-mode ``open`` reads and writes UTF-8 unless told otherwise; everything else is
    the filesystem's."""

    def __init__(self, fs) -> None:
        self._fs = fs

    def open(self, path: str, mode: str = "rb", **kwargs):
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
        return self._fs.open(path, mode, **kwargs)

    def __getattr__(self, name: str):
        if name == "_fs":  # not set yet (pickle and copy build the object without __init__): no recursion
            raise AttributeError(name)
        return getattr(self._fs, name)


class Utf8Writer(ExperimentWriter):
    """Lightning's CSV writer, which reads and writes ``metrics.csv`` in UTF-8 whatever the locale (Lightning's uses
    the locale's encoding: a non-ASCII metric name failed in an ASCII locale, "'ascii' codec can't encode character",
    and came out garbled under cp1252)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._fs = Utf8Files(self._fs)  # metrics.csv in UTF-8 (hparams.yaml escapes non-ASCII itself)


class Utf8CSVLogger(CSVLogger):
    """Lightning's CSVLogger writing ``metrics.csv`` in UTF-8 (:class:`Utf8Writer`); ``train.py validate`` logs to one
    in place of a configured ``lightning.pytorch.loggers.CSVLogger`` (a fit: :class:`ContinuedCSVLogger`)."""

    writer_class = Utf8Writer  # the writer class experiment builds (ContinuedCSVLogger's: ContinuedWriter)

    @property
    @rank_zero_experiment
    def experiment(self) -> Utf8Writer:
        if self._experiment is None:  # as CSVLogger.experiment, with the writer above
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = self.writer_class(log_dir=self.log_dir)
        return self._experiment


class ContinuedWriter(Utf8Writer):
    """:class:`Utf8Writer`, which deletes ``metrics.csv`` only at its first save of metrics, and then keeps the
    rows of steps below ``continue_at`` (None: none) instead."""

    continue_at: int | None = None
    _started = False

    def _check_log_dir_exists(self) -> None:
        """Nothing: Lightning's deletes ``metrics.csv`` here, as the logger starts (see :meth:`save`)."""

    def save(self) -> None:
        if self.metrics and not self._started:
            self._started = True
            self._continue_file()
        super().save()

    def _continue_file(self) -> None:
        """Keep the rows of ``metrics.csv`` of steps below ``continue_at``, and its columns; delete it for None."""
        path = self.metrics_file_path
        if not self._fs.isfile(path):
            return
        if self.continue_at is None:
            self._fs.rm_file(path)
            return
        with self._fs.open(path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if not row.get("step") or int(float(row["step"])) < self.continue_at]
            self.metrics_keys = sorted(reader.fieldnames or [])  # the writer's columns: it appends under them
        temp = os.path.join(self.log_dir, f".{self.NAME_METRICS_FILE}.tmp")
        with self._fs.open(temp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(temp, path)  # a rename: a kill leaves the earlier file whole


class ContinuedCSVLogger(Utf8CSVLogger):
    """Lightning's CSVLogger, whose ``metrics.csv`` a resumed fit continues.

    Lightning's deletes the ``metrics.csv`` of its folder when it starts ("Previous log files in this directory will
    be deleted"), so a fit resumed in a stage's folder (a fixed version: the stage configs' layout) kept only the
    steps logged after the resume. This one leaves the file until the fit saves its first metrics; then a fit that
    resumes at step ``S`` (:meth:`continue_from`, which :class:`ResumedLogs` calls when training starts) keeps its
    rows of steps below ``S`` (those from ``S`` on, logged after the checkpoint by a run that died, are logged again)
    and goes on in it, and any other run replaces it, as Lightning's does. ``train.py fit`` logs to one in place of a
    configured ``lightning.pytorch.loggers.CSVLogger``."""

    writer_class = ContinuedWriter

    @rank_zero_only
    def continue_from(self, step: int | None) -> None:
        """Keep the earlier rows of steps below ``step`` (None: none) at the first save of metrics."""
        self.experiment.continue_at = step

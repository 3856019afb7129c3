"""A resumed fit logs on from where its checkpoint stopped, on the same x-axis as one uninterrupted run."""

from __future__ import annotations

import lightning as L


class ResumedLogs(L.Callback):
    """Puts the step a resumed fit logs at back on the global step.

    Lightning logs every scalar at ``fit_loop.epoch_loop._batches_that_stepped`` (the optimiser steps taken: the
    scalars of step ``k`` at ``k - 1``). A checkpoint saved at the end of a fit (``StepCheckpoint.on_train_end``)
    records it after Lightning has counted the last step, and a resume from it whose first batch is due a validation
    (the one the last step ran) counts that step again: each such resume logged one step further on (the learning
    rate of step 38 at 39, a validation of step 40 at 40, not 39), checkpoints already written included. At the first
    training batch after a restore this sets it to the global step, as an uninterrupted run has it there, before any
    callback logs (``MarDiniCLI`` puts this callback first)."""

    _restored = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restored = trainer.ckpt_path is not None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._restored and pl_module.automatic_optimization:  # one optimiser step per stepped batch
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step  # Lightning has no public setter
        self._restored = False

"""ModelCheckpoint that also saves the final step of a fit, whatever ``checkpoint_every`` is."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """Saves every ``every_n_train_steps`` like ModelCheckpoint, and once more when training ends.

    Lightning's ``save_last`` writes ``last.ckpt`` at train end only if nothing was saved before, so a stage of
    650 steps saved every 100 would end with ``last.ckpt`` at step 600 and lose its last 50 steps. Here the end of
    a fit (max_steps reached, max_time, an early stop) saves the step it stopped at, unless it is already saved.
    """

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # fitting, and this step is not saved yet
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)

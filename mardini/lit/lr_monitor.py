"""Lightning's LearningRateMonitor without its record of every learning rate it logged."""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor


class LatestLearningRateMonitor(LearningRateMonitor):
    """Logs what Lightning's ``LearningRateMonitor`` logs, and keeps only the latest value per parameter group in
    ``lrs``.

    Lightning's appends every learning rate it logs to ``lrs[name]`` for the whole fit and never reads them back: a
    list per parameter group that grew by one at each logged step (a fit of 1000 steps logging every step held 1000
    floats per group; a week-long one millions). The loggers get every value as before. ``train.py`` adds this one.
    """

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        super().on_train_batch_start(trainer, *args, **kwargs)
        self._keep_latest()

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        super().on_train_epoch_start(trainer, *args, **kwargs)
        self._keep_latest()

    def _keep_latest(self) -> None:
        """Drop every recorded learning rate but the newest of each parameter group."""
        for values in self.lrs.values():
            del values[:-1]

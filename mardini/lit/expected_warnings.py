"""Two Lightning warnings that do not apply to MarDini's runs, silenced for the fits and validations of its modules.

They used to be ignored process-wide at import, which also hid them for one's own modules and datasets in the same
process. :class:`ExpectedWarnings` (every :class:`~mardini.lit.base.MarDiniBase` adds it through
``configure_callbacks``) ignores them from the trainer's ``setup`` to its ``teardown`` (or the exception that ends the
run), and only where Lightning raises them:

- ``Found N module(s) in eval mode at the start of training``: the EMA copy is kept in eval mode on purpose (it is
  never trained);
- ``Your `IterableDataset` has `__len__` defined`` (with a :class:`~mardini.data.datamodule.VideoDataModule` only):
  ``ClipStream`` splits its epoch across workers itself (``with_epoch`` per worker), so its ``__len__`` is exact.
"""

from __future__ import annotations

import warnings

import lightning as L

from mardini.data.datamodule import VideoDataModule

# (message, module that raises it): the filters match both
EVAL_MODE_WARNING = (r"Found \d+ module\(s\) in eval mode at the start of training", r"lightning\.pytorch\.loops\.fit_loop")
ITERABLE_LEN_WARNING = (r"Your `IterableDataset` has `__len__` defined", r"lightning\.pytorch\.utilities\.data")


class ExpectedWarnings(L.Callback):
    """Ignores :data:`EVAL_MODE_WARNING` (and with a ``VideoDataModule`` :data:`ITERABLE_LEN_WARNING`) during one run."""

    def __init__(self) -> None:
        self._scope: warnings.catch_warnings | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()
        self._scope = warnings.catch_warnings()
        self._scope.__enter__()
        for message, module in self._expected(trainer):
            warnings.filterwarnings("ignore", message=message, module=module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    @staticmethod
    def _expected(trainer: L.Trainer) -> list[tuple[str, str]]:
        """The warnings this run raises on purpose."""
        expected = [EVAL_MODE_WARNING]
        if isinstance(trainer.datamodule, VideoDataModule):
            expected.append(ITERABLE_LEN_WARNING)
        return expected

    def _close(self) -> None:
        """Restore the warning filters ``setup`` found (once)."""
        if self._scope is not None:
            self._scope.__exit__(None, None, None)
            self._scope = None

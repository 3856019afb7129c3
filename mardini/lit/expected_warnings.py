"""Lightning warnings that do not apply to MarDini's runs, silenced for the fits and validations of its modules.

They used to be ignored process-wide at import, which also hid them for one's own modules and datasets in the same
process. :class:`ExpectedWarnings` (every :class:`~mardini.lit.base.MarDiniBase` adds it through
``configure_callbacks``) ignores them from the trainer's ``setup`` to its ``teardown`` (or the exception that ends the
run), and only where Lightning raises them:

- ``Found N module(s) in eval mode at the start of training``: the EMA copy is kept in eval mode on purpose (it is
  never trained);
- ``Your `IterableDataset` has `__len__` defined`` (with a :class:`~mardini.data.datamodule.VideoDataModule` only):
  ``ClipStream`` splits its epoch across workers itself (``with_epoch`` per worker), so its ``__len__`` is exact;
- ``You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable`` (with a
  ``VideoDataModule`` only): the datamodule keeps the stream position in its own state (in the checkpoint) and
  continues the epoch exactly. (``train.py fit`` ignored it from its first fit to the end of the process.)

At the end it removes the filters it added, and only those: a filter added during the run by anyone else (a callback,
a library) stays.
"""

from __future__ import annotations

import warnings

import lightning as L

from mardini.data.datamodule import VideoDataModule

# (message, module that raises it): the filters match both
EVAL_MODE_WARNING = (r"Found \d+ module\(s\) in eval mode at the start of training", r"lightning\.pytorch\.loops\.fit_loop")
ITERABLE_LEN_WARNING = (r"Your `IterableDataset` has `__len__` defined", r"lightning\.pytorch\.utilities\.data")
UNRESUMABLE_LOADER_WARNING = (r"You're resuming from a checkpoint that ended before the epoch ended and your "
                              r"dataloader is not resumable", r"lightning\.pytorch\.loops\.training_epoch_loop")


class ExpectedWarnings(L.Callback):
    """Ignores :data:`EVAL_MODE_WARNING` (and with a ``VideoDataModule`` :data:`ITERABLE_LEN_WARNING` and
    :data:`UNRESUMABLE_LOADER_WARNING`) during one run."""

    def __init__(self) -> None:
        self._added: list[tuple] = []  # the entries of warnings.filters that setup added

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()
        for message, module in self._expected(trainer):
            self._added += ignore(message, module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    @staticmethod
    def _expected(trainer: L.Trainer) -> list[tuple[str, str]]:
        """The warnings this run raises on purpose."""
        expected = [EVAL_MODE_WARNING]
        if isinstance(trainer.datamodule, VideoDataModule):
            expected += [ITERABLE_LEN_WARNING, UNRESUMABLE_LOADER_WARNING]
        return expected

    def _close(self) -> None:
        """Remove the filters ``setup`` added (once)."""
        remove_filters(self._added)
        self._added = []


def ignore(message: str, module: str) -> list[tuple]:
    """``warnings.filterwarnings("ignore", message, module=module)``; the entry it put in ``warnings.filters``, or none
    where an equal one was there already (that one is left to its owner: it moved to the front, and stays)."""
    before = list(warnings.filters)
    warnings.filterwarnings("ignore", message=message, module=module)
    entry = warnings.filters[0]  # filterwarnings inserts at the front
    return [] if entry in before else [entry]


def remove_filters(entries: list[tuple]) -> None:
    """Take these very entries (by identity) out of ``warnings.filters``, leaving every other filter where it is; one
    no longer there (an equal filter added since replaced it) is skipped. ``catch_warnings`` restores the whole list
    instead, which drops the filters others added meanwhile. No cache needs resetting: ``ignore`` entries are all this
    removes, and a warning a filter ignored is never recorded in a module's ``__warningregistry__``."""
    for entry in entries:
        at = next((i for i, f in enumerate(warnings.filters) if f is entry), None)
        if at is not None:
            del warnings.filters[at]

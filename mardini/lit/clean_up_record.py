"""What the clean-up of a failed ``ddp_spawn`` fit needs, kept by its rank 0 where the main process finds it.

The clean-up (``mardini.cli_failed_fit.clean_up_failed_fit``: put back the earlier run a new run set aside, delete an
untrained run's files) runs in the worker of rank 0, which holds the fit's state. When another rank fails first, torch's
spawn launcher SIGTERMs rank 0 at once and SIGKILLs it 30 s later: rank 0 then cleans up only where its collective
with the dead rank fails fast (gloo: "Connection closed by peer"); one stuck longer (a collective that waits for its
timeout, as NCCL's do, a long step) is killed first. So each callback that holds clean-up state
(:class:`KeptForCleanUp`: ``FitStarted``, ``StepCheckpoint``, ``KeepEarlierConfig``) records it on rank 0 whenever it
changes (:func:`note`), and rank 0 marks the record done once its clean-up ran; the main process does the clean-up
from the record where it is not done.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import tempfile
from pathlib import Path

_active: CleanUpRecord | None = None  # the record of this process: set in a ddp_spawn worker (keep_in)


class KeptForCleanUp:
    """A callback whose state the clean-up of a failed fit reads (the attributes ``clean_up_state`` names); it calls
    :func:`note` when that state changes."""

    clean_up_state: tuple[str, ...] = ()

    def recorded_state(self) -> dict:
        return {name: getattr(self, name) for name in self.clean_up_state}


class CleanUpRecord:
    """A folder of its own (``folder``; None: a new temporary one) holding ``state.pkl``, the state of rank 0's
    :class:`KeptForCleanUp` callbacks as last recorded, and ``done`` once rank 0's clean-up ran."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder if folder is not None else tempfile.mkdtemp(prefix="mardini-fit-"))

    def keep(self, callbacks: list[KeptForCleanUp]) -> None:
        """Record the state of ``callbacks`` (replaced atomically: a kill mid-write leaves the previous record)."""
        part = self.folder / "state.pkl.part"
        part.write_bytes(pickle.dumps([(type(cb).__qualname__, cb.recorded_state()) for cb in callbacks]))
        os.replace(part, self.folder / "state.pkl")

    def restored(self, callbacks: list) -> list[KeptForCleanUp]:
        """Copies of the :class:`KeptForCleanUp` among ``callbacks`` (this process's, in the trainer's order, as the
        workers' were) with the state last recorded; as they are where rank 0 recorded none."""
        kept = [cb for cb in callbacks if isinstance(cb, KeptForCleanUp)]
        path = self.folder / "state.pkl"
        if not path.is_file():
            return kept
        states = pickle.loads(path.read_bytes())
        if [name for name, _ in states] != [type(cb).__qualname__ for cb in kept]:
            raise RuntimeError(f"the clean-up record {path} names the callbacks {[name for name, _ in states]}, this "
                               f"process has {[type(cb).__qualname__ for cb in kept]}: clean up by hand")
        copies = [copy.copy(cb) for cb in kept]
        for cb, (_, state) in zip(copies, states):
            vars(cb).update(state)
        return copies

    def mark_done(self) -> None:
        (self.folder / "done").touch()

    def done(self) -> bool:
        """Whether rank 0 ran its clean-up."""
        return (self.folder / "done").is_file()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def keep_in(record: CleanUpRecord | None) -> None:
    """Have :func:`note` record into ``record`` in this process (None: stop)."""
    global _active
    _active = record


def note(trainer) -> None:
    """On rank 0 of a ``ddp_spawn`` fit (after :func:`keep_in`), record the trainer's :class:`KeptForCleanUp`
    callbacks; elsewhere nothing."""
    if _active is not None and trainer.is_global_zero:
        _active.keep([cb for cb in trainer.callbacks if isinstance(cb, KeptForCleanUp)])


__all__ = ["CleanUpRecord", "KeptForCleanUp", "keep_in", "note"]

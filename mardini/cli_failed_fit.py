"""The clean-up after a ``train.py fit`` that failed or that Ctrl-C interrupted, in the process that ran its
training (under ``ddp_spawn`` the worker of rank 0, or the main process where that worker was stopped before its
clean-up ran: :func:`clean_up_after_workers`)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

from lightning.pytorch import Trainer
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities import rank_zero_info

from mardini.cli_saved_config import KeepEarlierConfig
from mardini.lit.clean_up_record import CleanUpRecord, keep_in
from mardini.lit.step_checkpoint import FitStarted, StepCheckpoint, drop_untrained_logs


def clean_up_failed_fit(trainer, folders, error: BaseException) -> None:
    """After a fit that failed, or that Ctrl-C interrupted (:func:`interrupted`), in the process that ran its
    training (rank 0 does it): a fit that failed before training leaves no empty event file or log folder behind
    (``FitStarted``, :func:`~mardini.lit.step_checkpoint.drop_untrained_logs`); one that fails later without saving a
    checkpoint puts back the earlier run a ``--ckpt_path null`` fit set aside in ``checkpoints/earlier.N/``, and
    ``config.yaml`` as it was (``StepCheckpoint.put_back_earlier_run``; one that saved keeps them aside and says so).
    Before, the folder looked empty and ``--ckpt_path last`` trained from scratch. The messages say "was
    interrupted" for an interrupt, "failed" otherwise."""
    if not trainer.is_global_zero:
        return
    ended = "was interrupted" if interrupted(error) else "failed"
    started = next((cb.started for cb in trainer.callbacks if isinstance(cb, FitStarted)), True)
    dropped = [] if started else drop_untrained_logs(folders)
    if dropped:
        rank_zero_info(f"the fit {ended} before training: {', '.join(dropped)} deleted (they recorded nothing)")
    saver = next((cb for cb in trainer.callbacks if isinstance(cb, StepCheckpoint)), None)
    if saver is None or not saver.put_back_earlier_run(ended):
        return
    for cb in trainer.callbacks:
        if isinstance(cb, KeepEarlierConfig):
            cb.put_back()


class SpawnedFit:
    """``Trainer._fit_impl`` as each ``ddp_spawn`` worker runs it: a failure or a Ctrl-C there is cleaned up in that
    worker (:func:`clean_up_failed_fit`), which holds the fit's state (what it set aside, whether it trained or saved),
    after Lightning's ``on_exception`` hooks and teardown, as ``trainer.fit`` runs them in one process. Before, the
    worker's KeyboardInterrupt ended it silently (torch's spawn wrapper swallows it), and the main process, which
    never trained, took the fit for one that failed before training: it deleted the new run's event file ("the fit
    failed before training: ... deleted (they recorded nothing)") and left the earlier run in
    ``checkpoints/earlier.N/``.

    ``record``: where rank 0 keeps its clean-up state as the fit goes, and marks its clean-up done, for the main
    process (:func:`clean_up_after_workers`)."""

    def __init__(self, trainer, folders, record: CleanUpRecord) -> None:
        self.trainer, self.folders, self.record = trainer, folders, record

    def __call__(self, *args, **kwargs):
        keep_in(self.record)
        try:
            return Trainer._fit_impl(self.trainer, *args, **kwargs)
        except BaseException as e:
            if isinstance(e, Exception) or interrupted(e):
                if interrupted(e):  # a second Ctrl-C does not stop the clean-up (Lightning's rule in one process)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                call._interrupt(self.trainer, e)
                self.trainer._teardown()
                clean_up_failed_fit(self.trainer, self.folders, e)
                if self.trainer.is_global_zero:
                    self.record.mark_done()
            raise
        finally:
            keep_in(None)


def clean_up_after_workers(record: CleanUpRecord, trainer, folders, error: BaseException, workers) -> bool:
    """In the main process of a failed ``ddp_spawn`` fit, once its ``workers`` (processes) have ended: the clean-up
    rank 0 did not mark done (:func:`clean_up_failed_fit` from the state it last recorded; where it recorded none,
    from ``trainer``'s callbacks, which never ran: nothing set aside, the training not started). Whether it ran.

    When another rank fails first, torch's spawn launcher SIGTERMs the other workers at once and SIGKILLs them 30 s
    later: rank 0 cleans up only where its pending collective fails fast (gloo's "Connection closed by peer"); one
    stuck longer (a collective that waits for its timeout, as NCCL's do, a long step, a slow clean-up) was killed
    first, and the earlier run stayed in ``checkpoints/earlier.N/`` (``--ckpt_path last`` then trained from
    scratch). A worker still running (a Ctrl-C whose clean-up outlasts ``wait_for_workers``) is left to finish its
    own."""
    if record.done() or any(process.is_alive() for process in workers):
        return False
    callbacks = record.restored(trainer.callbacks)
    for cb in callbacks:  # what rank 0's on_exception hooks would have done: the earlier config.yaml back
        if isinstance(cb, KeepEarlierConfig):
            cb.on_exception(trainer, None, error)
    clean_up_failed_fit(SimpleNamespace(is_global_zero=True, callbacks=callbacks), folders, error)
    return True


def wait_for_workers(launcher: _MultiProcessingLauncher, timeout: float = 60.0) -> None:
    """Wait up to ``timeout`` seconds for the spawned workers of ``launcher`` to end (their clean-up:
    :class:`SpawnedFit`). After a Ctrl-C Lightning's main process returns without joining them."""
    for process in getattr(launcher, "procs", None) or []:
        process.join(timeout)


def interrupted(error: BaseException) -> bool:
    """Whether ``error`` ends a fit that Ctrl-C (SIGINT) interrupted: a ``KeyboardInterrupt``, or the ``SystemExit``
    Lightning raises in its place (``trainer.fit``'s ``_call_and_handle_interrupt`` calls the ``on_exception`` hooks,
    tears down and calls ``sys.exit(1)`` while handling it). Before, only an ``Exception`` was cleaned up after: an
    interrupted new run left the earlier one in ``checkpoints/earlier.N/`` and ``--ckpt_path last`` trained from
    scratch."""
    if isinstance(error, KeyboardInterrupt):
        return True
    return isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt)

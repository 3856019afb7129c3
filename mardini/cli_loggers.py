"""The loggers ``train.py`` runs log to: a fit's (continuing its records on a resume) and a validate's (a folder
of its own in the stage folder's ``validate/``)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from fsspec.core import url_to_fs
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mardini.lit.checkpoint_io import local_path
from mardini.lit.resumed_logs import ContinuedCSVLogger, Utf8CSVLogger
from mardini.lit.run_lock import RunLock
from mardini.lit.step_checkpoint import VALIDATION_FOLDER, drop_dead_validate_locks, validate_lock


def validation_logger(logger, entry, locks: list | None = None):
    """The logger a ``validate`` run logs to, for the configured ``logger`` built from the config ``entry``
    (``class_path``/``init_args``): a TensorBoard or CSV logger of fixed version (the stage's folder
    ``<save_dir>/<name>/<version>``, whose event files, ``hparams.yaml`` and ``metrics.csv`` are the fit's) is
    rebuilt to log in a folder of its own in that folder's ``validate/``, ``validate/version_N``
    (:func:`new_validation_run`, whose lock is appended to ``locks``, for the caller to release when the validate
    ends; ``validate.yaml`` goes there too); any other is kept (it logs each run in a new ``version_N`` folder, or in
    no folder). Before, a validate added its event file to the fit's, and a CSV logger replaced the fit's
    ``metrics.csv`` and ``hparams.yaml``; later, every validate logged in ``validate/`` itself, where two at once
    mixed their records (the one's ``validate.yaml`` beside the other's ``hparams.yaml``, and TensorBoard showed both
    runs' ``val/loss`` at step 0 of one run). Lightning's CSVLogger is rebuilt as
    :class:`~mardini.lit.resumed_logs.Utf8CSVLogger` (``metrics.csv`` in UTF-8 whatever the locale, as a fit's)."""
    args = entry.get("init_args") if hasattr(entry, "get") else None
    if (not isinstance(logger, (TensorBoardLogger, CSVLogger)) or args is None or not args.get("save_dir")
            or args.get("version") is None):
        return logger
    version = args["version"] if isinstance(args["version"], str) else f"version_{args['version']}"
    run, lock = new_validation_run(os.path.join(logger.root_dir, version, VALIDATION_FOLDER))
    if lock is not None and locks is not None:
        locks.append(lock)
    given = {**args.as_dict(), **dict(entry.get("dict_kwargs") or {})}  # dict_kwargs: TensorBoard's SummaryWriter's
    cls = Utf8CSVLogger if type(logger) is CSVLogger else type(logger)  # metrics.csv in UTF-8, as the fit's
    return cls(**{**given, "version": os.path.join(version, VALIDATION_FOLDER, run)})


CLAIM_TRIES = 100  # validate/ made again after a fit removed it, at most


def new_validation_run(folder: str) -> tuple[str, RunLock | None]:
    """The name (``version_N``) of a new validate run's folder in the stage's ``validate/`` ``folder``, and the lock
    this validate holds on it (``validate/version_N.lock``: :func:`~mardini.lit.step_checkpoint.validate_lock`). On
    global rank 0 the first N from 0 whose lock it creates (``O_EXCL``: a live validate's lock there is another
    run's) and then whose folder it creates (``os.mkdir``: a folder there without a lock is a finished run's),
    the lock first, so that a new fit setting the finished validates aside sees the run as running from the moment
    its name is claimed (before, the folder came first and the lock only as the validate started: a fit in between
    moved the empty folder to ``earlier.N/validate/``); the locks of validates that are gone are deleted first
    (``drop_dead_validate_locks``), so a killed validate's name is free again where it made no folder. On another
    rank (which logs nothing: Lightning broadcasts rank 0's folder) and for a remote folder, the first N free, and no
    lock."""
    local = local_path(folder)
    if local is None or getattr(rank_zero_only, "rank", 0) != 0:
        fs, path = url_to_fs(folder)
        return next(name for n in itertools.count() if not fs.exists(os.path.join(path, name := f"version_{n}"))), None
    for _ in range(CLAIM_TRIES):
        os.makedirs(local, exist_ok=True)
        drop_dead_validate_locks(local)  # a killed validate's lock: its name is free again where it made no folder
        try:
            return next(claimed for n in itertools.count() if (claimed := _claim_run(local, f"version_{n}")))
        except FileNotFoundError:  # a new fit removed validate/ as it set the finished runs aside: make it again
            continue
    raise RuntimeError(f"{local} vanished {CLAIM_TRIES} times while this validate claimed a run folder in it: "
                       "something keeps deleting it; check what else writes to the stage's folder")


def _claim_run(folder: str, name: str) -> tuple[str, RunLock] | None:
    """``(name, its lock)`` where this validate took the lock of ``folder/name`` and then created the folder; None
    where either was there."""
    run = os.path.join(folder, name)
    lock = RunLock([folder], validate_lock(run).name)
    if not lock.claim():
        return None
    try:
        os.mkdir(run)
    except BaseException as e:
        lock.release()
        if isinstance(e, FileExistsError):
            return None
        raise
    return name, lock


def drop_empty_validation_runs(loggers) -> None:
    """Remove the local folders of ``loggers`` that a validate which failed left empty: its ``validate/version_N``
    (:func:`new_validation_run` creates it as the logger is built), and ``validate/`` where that was all it held."""
    for logger in loggers:
        folder = local_path(logger.log_dir) if getattr(logger, "log_dir", None) else None
        for empty in (Path(folder), Path(folder).parent) if folder is not None else ():
            if not empty.is_dir() or any(empty.iterdir()):
                break
            empty.rmdir()


def fit_logger(logger, entry, step: int | None = None):
    """The logger a ``fit`` logs to, for the configured ``logger`` built from the config ``entry``: Lightning's
    CSVLogger is rebuilt as :class:`~mardini.lit.resumed_logs.ContinuedCSVLogger`, so a resumed fit continues its
    ``metrics.csv`` (Lightning's deleted it: the file held the steps after the resume only); for a fit resumed at
    global step ``step`` a TensorBoard logger is rebuilt with ``purge_step=step`` (its SummaryWriter's: TensorBoard
    hides the steps from ``step`` on logged before, by a run given up after the checkpoint, which the resumed run
    logs again; before, they appeared twice); any other is kept."""
    args = entry.get("init_args") if hasattr(entry, "get") else None
    if args is None:
        return logger
    if type(logger) is CSVLogger:
        return ContinuedCSVLogger(**args.as_dict())
    if isinstance(logger, TensorBoardLogger) and step is not None:
        given = {**args.as_dict(), **dict(entry.get("dict_kwargs") or {})}  # dict_kwargs: the SummaryWriter's
        return type(logger)(**{**given, "purge_step": step})
    return logger


MOVED_CHECKPOINT_FOLDER_WARNING = r"The dirpath has changed from .* to .*, therefore"

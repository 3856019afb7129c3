"""The LightningCLI used by ``train.py``: stage YAMLs with ``class_path``/``init_args``, safe defaults."""

from __future__ import annotations

import functools
import itertools
import operator
import os
import re
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Union

from fsspec.core import url_to_fs
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.imports import compare_version

from mardini.lit.base import MarDiniBase
from mardini.lit.checkpoint_io import AtomicCheckpointIO, local_path, other_checkpoints_message
from mardini.lit.checkpoints import RESUMING, directory_message
from mardini.lit.lr_monitor import LatestLearningRateMonitor
from mardini.lit.preemption import TERMINATED, PreemptionSave
from mardini.lit.resumed_logs import ContinuedCSVLogger, ResumedLogs
from mardini.lit.run_lock import RunLock
from mardini.lit.step_checkpoint import (PREEMPTION, VALIDATION_FOLDER, FitStarted, StepCheckpoint,
                                         drop_empty_log_folders, drop_untrained_logs, earlier_logs, log_folders,
                                         preemption_checkpoints, saved_step, validate_lock)
from mardini.run_info import command_line
from mardini.user_errors import TRACEBACK_ENV, USER_ERRORS


class MarDiniCLI(LightningCLI):
    """``fit``/``validate`` over any MarDini stage module and any LightningDataModule."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's ``fit`` and ``validate``: the stage modules have no test or predict step and the datamodule no
        test split (``ShortErrorParser`` says what to use instead)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--checkpoint_every", type=int, default=500,
            help="write last.ckpt (atomically) every this many training steps, and at the end of the fit",
        )

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("fit", "validate"):
            # The same command resumes: fit starts from the checkpoint of the highest step in <log dir>/checkpoints
            # (last.ckpt, hpc_ckpt_N.ckpt, stepN.ckpt: resume_checkpoint) when there is one; --ckpt_path null starts
            # over there (StepCheckpoint moves the earlier run's checkpoints and logs to checkpoints/earlier.N/).
            # validate scores that checkpoint (scored_checkpoint: an error when there is none); --ckpt_path null
            # scores the weights the stage starts from.
            parser.set_defaults({"ckpt_path": "last", "weights_only": True})  # resume never unpickles code
            describe_resume_options(parser, subcommand)
        return parser

    def parse_arguments(self, parser, args) -> None:
        """Lightning's, keeping the command line for the top of ``config.yaml`` (``KeepEarlierConfig.command``), then
        refusing the run settings Lightning takes but cannot run (:func:`check_run_settings`)."""
        words = sys.argv[1:] if args is None else args
        prog = parser.prog if args is None else "train.py"  # args from Python (the demo): the command it stands for
        if isinstance(words, (list, tuple)):
            self.save_config_kwargs = {**self.save_config_kwargs, "command": command_line([prog], list(words))}
        super().parse_arguments(parser, args)
        check_run_settings(self.config.get(self.config.get("subcommand") or "", self.config))

    def _parse_ckpt_path(self) -> None:
        """Nothing: Lightning's CLI would merge the hyper-parameters of an explicit ``--ckpt_path FILE`` (its
        ``_class_path`` too) over the configured model, so another stage's checkpoint turned this stage into that
        stage's model, and the model options given were dropped. The model stays the one configured; resuming
        checks the checkpoint against it (``MarDiniBase.on_load_checkpoint``: kind, size, latents, shapes)."""

    def before_instantiate_classes(self) -> None:
        sub = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        expand_logger_folder(sub)  # before the folder is read: config.yaml records the expanded names
        every = sub.get("checkpoint_every", 500)
        if every is None or every < 1:
            raise ValueError(f"checkpoint_every={every} is impossible: it must be >= 1")
        self._checkpoint_every = every
        self._nothing_to_resume = False
        self._resume_from: str | None = None
        self._checkpoint_folder: str | None = None  # the stage's: where its checkpoints and preemption saves go
        self._root_dir: str | None = None  # the Trainer's default_root_dir where the config leaves it unset
        ckpt = sub.get("ckpt_path")
        # a checkpoint file named by its path (not one of Lightning's keywords)
        self._resuming = ckpt is not None and str(ckpt) not in ("last", "best", "hpc") and not _is_registry(ckpt)
        if self._resuming and Path(str(ckpt)).is_dir():
            raise ValueError(f"--ckpt_path: {directory_message(Path(str(ckpt)))}")  # Lightning: IsADirectoryError
        take_seed_everything(sub)
        trainer = sub.get("trainer")
        if "spawn" in str((trainer or {}).get("strategy", "")):
            # ddp_spawn pickles the module to its workers; PyTorch's default, passing shared-memory file descriptors,
            # fails where they cannot be resized ("unable to resize file ... Invalid argument", seen in containers)
            import torch.multiprocessing

            torch.multiprocessing.set_sharing_strategy("file_system")
        self._scored_from = sub if self.subcommand == "validate" and ckpt == "last" else None  # found again: validate
        if self._scored_from is not None:
            self._resume_from = scored_checkpoint(sub)
            self._resuming = True  # the weights are the checkpoint's: the starting checkpoints are not read
        if self.subcommand != "fit":
            return
        if no_logger(sub):
            raise ValueError(
                "trainer.logger is false, but a fit needs a logger: the learning rate is logged to it "
                "(LearningRateMonitor) and the stage's checkpoint folder, where --ckpt_path last resumes, is the "
                "logger's <save_dir>/<name>/<version>/checkpoints; set trainer.logger to a TensorBoardLogger (or "
                "CSVLogger) with a save_dir, a name and a fixed version, as the stage configs do (version: \"\")")
        unresumable = new_folder_each_run(sub)
        if sub.get("ckpt_path") == "last" and unresumable:
            cause, fix = unresumable
            raise ValueError(f"{cause}, so --ckpt_path last (the default) never finds the checkpoints of an earlier "
                             f"run to resume; {fix}, or pass --ckpt_path null to train a new run in a new version_N "
                             "folder")
        folder = self._checkpoint_folder = checkpoint_dir(sub)
        if folder is not None and trainer is not None and not trainer.get("default_root_dir"):
            # where Lightning looks for its preemption checkpoints (ckpt_path "hpc", and None under SLURM): the
            # stage's own checkpoint folder, where PreemptionSave writes them, not a folder stages share. Given to the
            # Trainer, not written into the config: config.yaml rerun with another logger folder derives its own
            self._root_dir = folder
        hpc = preemption_checkpoints(folder)
        if sub.get("ckpt_path") is None and hpc:
            raise ValueError(f"--ckpt_path null starts over, but {folder} holds SLURM preemption checkpoints "
                             f"({', '.join(p.name for p in hpc)}) that Lightning would resume from; delete them first")
        # the folder's checkpoint of the highest step (last.ckpt, a preemption or a step checkpoint); fit() passes
        # it, so the saved config.yaml stays what was given (ckpt_path: last and the stage's starting checkpoints:
        # rerunning it resumes, and it records where the stage started)
        self._resume_from = resume_checkpoint(folder) if sub.get("ckpt_path") == "last" else None
        if sub.get("ckpt_path") == "hpc" and hpc:  # Lightning would look in default_root_dir, which may be elsewhere
            self._resume_from = resume_checkpoint(folder, PREEMPTION)
        self._nothing_to_resume = folder is not None and sub.get("ckpt_path") == "last" and self._resume_from is None
        self._resuming = self._resuming or self._resume_from is not None or (sub.get("ckpt_path") == "hpc" and bool(hpc))

    def instantiate_classes(self) -> None:
        """A run that resumes (``--ckpt_path`` a file, or ``last`` / ``hpc`` that found one) takes every weight from
        its checkpoint: the stage's starting checkpoints (``init_from``, ``planner_ckpt``, ``generator_ckpt``) are
        not read again (they may be gone by now)."""
        token = RESUMING.set(getattr(self, "_resuming", False))
        try:
            super().instantiate_classes()
        finally:
            RESUMING.reset(token)

    def fit(self, model, **kwargs) -> None:
        """``trainer.fit``; a ``last`` that found nothing to resume starts afresh (``ckpt_path=None``: Lightning
        would warn that there is no last checkpoint; the saved config keeps ``last``, so rerunning it resumes). The
        fit holds its log folder (``RunLock``: a second fit there is refused, a dead fit's lock taken over); the
        checkpoint to resume is checked first (:meth:`check_resume`); a fit that fails, or that Ctrl-C (SIGINT)
        interrupted (:func:`interrupted`), is cleaned up after (:func:`clean_up_failed_fit`: no empty event file or log
        folder left, the earlier run it set aside put back) in the process that ran its training: under ``ddp_spawn``
        the worker of rank 0 (:class:`SpawnedFit`), which the main process waits for. A fit that SIGTERM ended
        exits with status 143 (``PreemptionSave``: after its checkpoint), never 0."""
        if self._nothing_to_resume:
            kwargs["ckpt_path"] = None
        elif self._resume_from is not None:
            kwargs["ckpt_path"] = self._resume_from
        folders = log_folders(self.trainer)
        spawned = isinstance(self.trainer.strategy.launcher, _MultiProcessingLauncher)
        if spawned:  # the workers run the training (and its clean-up); the main process only launches them
            self.trainer._fit_impl = SpawnedFit(self.trainer, folders)
        # one fit per log folder: a second one is refused before it reads or writes anything there (run_lock)
        lock = RunLock(folders if self.trainer.is_global_zero else ()).acquire()
        try:
            self.check_resume(model, kwargs.get("ckpt_path"), kwargs.get("weights_only"))
            self.trainer.fit(model, **kwargs)
        except SIGTERMException as e:
            if e.code is None:  # Lightning's own, without an exit status (SIGTERM before the training started)
                raise SIGTERMException(TERMINATED) from e
            raise
        except BaseException as e:
            if isinstance(e, Exception) or interrupted(e):
                if spawned:
                    wait_for_workers(self.trainer.strategy.launcher)  # their clean-up done, files closed
                lock.release()  # before the clean-up, which removes the log folder a failed fit made only if empty
                if spawned:
                    drop_empty_log_folders(folders if self.trainer.is_global_zero else {})
                else:
                    clean_up_failed_fit(self.trainer, folders, e)
            raise
        finally:
            lock.release()
            if spawned:
                del self.trainer._fit_impl

    def check_resume(self, model, ckpt_path, weights_only: bool | None) -> None:
        """Refuse the local checkpoint file a fit resumes (the stage's newest, or ``--ckpt_path FILE``) before
        ``trainer.fit`` sets anything up: a missing or unreadable file, or one the model cannot go on from
        (``MarDiniBase.check_checkpoint``: another kind, size or format, an EMA-only export, other latents, anchor
        or shapes). Lightning reads it only after its setup has opened a new event file in the stage's folder (the
        logger's) and rotated config.yaml (``KeepEarlierConfig``), which a refusal there left behind. Lightning's
        keywords and remote files are left to it."""
        path = resumed_file(ckpt_path)
        if path is None or not isinstance(model, MarDiniBase):
            return
        checkpoint = self.trainer.strategy.checkpoint_io.load_checkpoint(str(ckpt_path), weights_only=weights_only)
        model.check_checkpoint(checkpoint, str(ckpt_path), fitting=True)

    def validate(self, model, **kwargs):
        """``trainer.validate`` of the checkpoint ``last`` found (the stage's newest: ``scored_checkpoint``), of the
        file ``--ckpt_path`` names, or with ``--ckpt_path null`` of the weights the stage starts from.

        It takes no ``fit.lock`` and runs beside a fit of the same folder: scoring the newest checkpoint mid-training
        is what one wants, and it writes nowhere the fit writes (its logger logs in a folder of its own,
        ``validate/version_N``: :func:`validation_logger`; ``validate.yaml`` goes there; the checkpoint callbacks save
        nothing), so two at once do not mix their records either, and one that fails before writing anything there
        removes it. It holds ``validate/version_N.lock`` meanwhile: a new fit of the folder (``--ckpt_path null``)
        sets the earlier run's validate runs aside but this one (``set_aside_finished_validates``). It reads
        checkpoints the fit replaces atomically (``AtomicCheckpointIO``), and the one it scores as it starts
        (:meth:`_read_scored`: the fit deletes its older ones)."""
        if self._resume_from is not None:
            kwargs["ckpt_path"] = self._resume_from
        elif kwargs.get("ckpt_path") is None:
            rank_zero_info("validate scores the weights the stage starts from (--ckpt_path null): its init_from, "
                           "planner_ckpt / generator_ckpt, else freshly initialised ones")
        # its folder in use: a new fit of the stage folder (--ckpt_path null) sets the earlier run's validate runs
        # aside but this one (StepCheckpoint: set_aside_finished_validates)
        locks = [RunLock([run.parent], validate_lock(run).name).acquire() for run in self._validation_runs()]
        try:
            kwargs["ckpt_path"] = self._read_scored(kwargs.get("ckpt_path"), kwargs.get("weights_only"))
            with warnings.catch_warnings():
                # the checkpoint callback's folder follows the logger's, here validate/version_N (validation_logger);
                # it saves nothing in a validate, so the best / last paths it does not reload do not matter
                warnings.filterwarnings("ignore", message=MOVED_CHECKPOINT_FOLDER_WARNING)
                return self.trainer.validate(model, **kwargs)
        except BaseException:
            for lock in locks:
                lock.release()
            self._drop_empty_validation_runs()
            raise
        finally:
            for lock in locks:
                lock.release()

    def _validation_runs(self) -> list[Path]:
        """The local folders of this validate's own in a stage folder's ``validate/`` (:func:`validation_logger`), on
        global rank 0 (the one that logs)."""
        loggers = self.trainer.loggers if self.trainer.is_global_zero else []
        folders = [local_path(logger.log_dir) for logger in loggers if getattr(logger, "log_dir", None)]
        return [Path(f) for f in folders if f is not None and Path(f).parent.name == VALIDATION_FOLDER]

    def _drop_empty_validation_runs(self) -> None:
        """Remove the loggers' local folders a failed validate left empty: its ``validate/version_N``, and
        ``validate/`` where that was all it held."""
        for logger in self.trainer.loggers if self.trainer.is_global_zero else ():
            folder = local_path(logger.log_dir) if getattr(logger, "log_dir", None) else None
            for empty in (Path(folder), Path(folder).parent) if folder is not None else ():
                if not empty.is_dir() or any(empty.iterdir()):
                    break
                empty.rmdir()

    def _read_scored(self, ckpt_path, weights_only: bool | None):
        """The checkpoint file ``validate`` scores, read now and handed to Lightning's restore as read
        (``AtomicCheckpointIO.pin``): a fit of the same folder deletes its older step and preemption checkpoints as
        it saves newer ones, and Lightning reads the file only after the model's and the data's setup. Where the file
        ``--ckpt_path last`` found is gone by now, the stage's newest is found again, once; a file named by
        ``--ckpt_path`` that is gone is an error naming why and the way on. Before, a file deleted in between was
        ``train.py: error: checkpoint .../step00000002.ckpt does not exist; check the path (or the stage that
        writes it)``, though no path was given. Lightning's keywords, remote files and a CheckpointIO of one's own
        are left to Lightning."""
        io = self.trainer.strategy.checkpoint_io
        if resumed_file(ckpt_path) is None or not isinstance(io, AtomicCheckpointIO):
            return ckpt_path
        try:
            io.pin(ckpt_path, io.load_checkpoint(ckpt_path, weights_only=weights_only))
            return ckpt_path
        except FileNotFoundError as e:
            if self._scored_from is None:  # named by --ckpt_path
                raise FileNotFoundError(f"{e}{deleted_by_fit_hint(Path(str(ckpt_path)))}") from None
        rank_zero_info(f"{ckpt_path} is gone: the fit in its folder deleted it (a fit keeps its newest step and "
                       "preemption checkpoints only); validate finds the stage's newest again")
        found = scored_checkpoint(self._scored_from)
        try:
            io.pin(found, io.load_checkpoint(found, weights_only=weights_only))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the fit in {Path(found).parent} deleted {Path(found).name} while validate was starting, twice (it "
                "keeps its newest step and preemption checkpoints only): rerun validate, or copy the checkpoint "
                "elsewhere first and score the copy with --ckpt_path COPY") from None
        return found

    def instantiate_trainer(self, **kwargs):
        # what the fit resumes from: None (from scratch) starts a new run, which sets the folder's earlier one aside
        resume = None if self._nothing_to_resume else (self._resume_from or self._get(self.config, "ckpt_path"))
        # the records in the stage's folder before this fit writes any: a new run sets them aside with the checkpoints
        folder = self._checkpoint_folder
        logs = earlier_logs(str(Path(folder).parent)) if folder is not None else None
        extra = [
            StepCheckpoint(filename="step{step:08d}", auto_insert_metric_name=False, save_last=True,
                           every_n_train_steps=self._checkpoint_every, save_top_k=1, resume=resume, logs=logs),
            LatestLearningRateMonitor(logging_interval="step"),
            PreemptionSave(dirpath=self._checkpoint_folder),
            FitStarted(),
        ]
        # kwargs["callbacks"] replaces trainer.callbacks of the config in LightningCLI: keep the config's ones
        configured = (self._get(self.config_init, "trainer", default={}) or {}).get("callbacks") or []
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        # ResumedLogs first: it sets a resumed fit's logged step before any other callback logs at it
        kwargs["callbacks"] = [ResumedLogs(), *configured, *(kwargs.get("callbacks") or []), *extra]
        # the fit's folder keeps its records: validate logs in validate/version_N of it; a fit continues its
        # metrics.csv, and a resumed one hides from TensorBoard the steps a run given up logged after the checkpoint
        step = resumed_step(resume) if self.subcommand == "fit" else None
        rebuild = validation_logger if self.subcommand == "validate" else functools.partial(fit_logger, step=step)
        loggers = (self._get(self.config_init, "trainer", default={}) or {}).get("logger")
        entries = (self._get(self.config, "trainer", default={}) or {}).get("logger")
        if isinstance(loggers, (list, tuple)):
            kwargs["logger"] = [rebuild(one, entry) for one, entry in zip(loggers, entries)]
        else:
            kwargs["logger"] = rebuild(loggers, entries)
        if self._root_dir is not None:
            kwargs["default_root_dir"] = self._root_dir
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # atomic local saves unless the user chose one
        return trainer


def validation_logger(logger, entry):
    """The logger a ``validate`` run logs to, for the configured ``logger`` built from the config ``entry``
    (``class_path``/``init_args``): a TensorBoard or CSV logger of fixed version (the stage's folder
    ``<save_dir>/<name>/<version>``, whose event files, ``hparams.yaml`` and ``metrics.csv`` are the fit's) is
    rebuilt to log in a folder of its own in that folder's ``validate/``, ``validate/version_N``
    (:func:`new_validation_run`; ``validate.yaml`` goes there too); any other is kept (it logs each run in a new
    ``version_N`` folder, or in no folder). Before, a validate added its event file to the fit's, and a CSV logger
    replaced the fit's ``metrics.csv`` and ``hparams.yaml``; later, every validate logged in ``validate/`` itself,
    where two at once mixed their records (the one's ``validate.yaml`` beside the other's ``hparams.yaml``, and
    TensorBoard showed both runs' ``val/loss`` at step 0 of one run)."""
    args = entry.get("init_args") if hasattr(entry, "get") else None
    if (not isinstance(logger, (TensorBoardLogger, CSVLogger)) or args is None or not args.get("save_dir")
            or args.get("version") is None):
        return logger
    version = args["version"] if isinstance(args["version"], str) else f"version_{args['version']}"
    run = new_validation_run(os.path.join(logger.root_dir, version, VALIDATION_FOLDER))
    given = {**args.as_dict(), **dict(entry.get("dict_kwargs") or {})}  # dict_kwargs: TensorBoard's SummaryWriter's
    return type(logger)(**{**given, "version": os.path.join(version, VALIDATION_FOLDER, run)})


def new_validation_run(folder: str) -> str:
    """The name (``version_N``) of a new validate run's folder in the stage's ``validate/`` ``folder``: on global rank
    0, the first N from 0 whose folder it creates itself (``os.mkdir`` fails where another validate did first, so two
    starting at once get two); on another rank (which logs nothing: Lightning broadcasts rank 0's folder) and for a
    remote folder, the first N free."""
    local = local_path(folder)
    if local is None or getattr(rank_zero_only, "rank", 0) != 0:
        fs, path = url_to_fs(folder)
        return next(name for n in itertools.count() if not fs.exists(os.path.join(path, name := f"version_{n}")))
    os.makedirs(local, exist_ok=True)
    for n in itertools.count():
        try:
            os.mkdir(os.path.join(local, f"version_{n}"))
        except FileExistsError:
            continue
        return f"version_{n}"


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
    ``checkpoints/earlier.N/``."""

    def __init__(self, trainer, folders) -> None:
        self.trainer, self.folders = trainer, folders

    def __call__(self, *args, **kwargs):
        try:
            return Trainer._fit_impl(self.trainer, *args, **kwargs)
        except BaseException as e:
            if isinstance(e, Exception) or interrupted(e):
                if interrupted(e):  # a second Ctrl-C does not stop the clean-up (Lightning's rule in one process)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                call._interrupt(self.trainer, e)
                self.trainer._teardown()
                clean_up_failed_fit(self.trainer, self.folders, e)
            raise


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


def resumed_file(ckpt_path):
    """The local file a fit resuming ``ckpt_path`` reads, which the CLI checks and reads itself before Lightning
    does; None for a fit from scratch, Lightning's keywords (``last``, ``best``, ``hpc``, the registry's) and files
    another file system reaches."""
    if ckpt_path is None or str(ckpt_path) in ("last", "best", "hpc") or _is_registry(ckpt_path):
        return None
    return local_path(str(ckpt_path))


def resumed_step(ckpt_path) -> int | None:
    """The global step a fit resuming ``ckpt_path`` goes on from (its checkpoint read memory-mapped); None for a
    fit from scratch, and where it is not read here (Lightning's keywords, a remote file; one that cannot be read
    is refused by ``MarDiniCLI.check_resume``)."""
    path = resumed_file(ckpt_path)
    try:
        step = saved_step(path, missing=-1) if path is not None else -1
    except (OSError, ValueError):
        return None
    return step if step >= 0 else None


# ``dump`` keeping the None values, as config.yaml holds them: jsonargparse 4.49 renamed ``skip_none`` to
# ``skip_unset`` (the old name warns JsonargparseDeprecationWarning, and goes in 5.0); the floor, 4.39, has only it
KEEP_NONE = {("skip_unset" if compare_version("jsonargparse", operator.ge, "4.49.0") else "skip_none"): False}


class KeepEarlierConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the log folder, overwritten by each run of the stage; where the one there
    differs from the new one (a rerun with other settings, which resumes the run) it is first kept as
    ``config.N.yaml`` (N = 1, 2, ...: the highest is the newest), so the settings each part of the run was trained
    with stay on record. A run that fails before training (a failing sanity check; a resume refused for settings
    that do not fit the checkpoint, which ``MarDiniCLI.check_resume`` refuses before this runs) puts the earlier one
    back: ``config.yaml`` keeps naming the settings the checkpoint was trained with. Only a fit writes it:
    ``validate`` writes ``validate.yaml`` in its own log folder, its ``validate/version_N`` of the stage folder
    (:func:`validation_logger`)."""

    _kept: Path | None = None  # config.N.yaml, the earlier config.yaml, until the training starts
    _rotated: Path | None = None  # the same, from then on (for put_back)
    _before: tuple[Path, bytes | None] | None = None  # config.yaml and its bytes before this fit (None: none)

    _written: Path | None = None  # the file this setup writes (config.yaml, validate.yaml)

    def __init__(self, *args, command: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.command = command  # the command line that made the run, written atop the file (save_config)

    def setup(self, trainer, pl_module, stage: str) -> None:
        saving = not self.already_saved and self.save_to_log_dir
        log_dir = trainer.log_dir if saving else None  # a broadcast: every rank asks
        if stage != TrainerFn.FITTING:  # not what the run was trained with: before, each validate rotated config.yaml
            self.config_filename = f"{TrainerFn(stage).value}.yaml"
        elif trainer.is_global_zero and log_dir is not None:
            path = Path(log_dir) / self.config_filename
            self._before = (path, path.read_bytes() if path.is_file() else None)
            self._kept = keep_earlier_config(path, self.parser.dump(self.config, **KEEP_NONE))
        self._written = Path(log_dir) / self.config_filename if log_dir is not None else None
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        """The file just saved begins with the command that made it, as a YAML comment (it still loads as the
        config): a sweep's runs say which overrides made each. Before, only the resolved settings were there."""
        path, self._written = self._written, None
        if self.command is None or path is None or local_path(str(path)) is None or not path.is_file():
            return
        # ASCII (non-ASCII escaped): it decodes in whatever locale encoding Lightning wrote the rest in
        line = self.command.replace("\n", "\\n").encode("ascii", "backslashreplace").decode("ascii")
        header = f"# {line}\n# (the command that wrote this file; below, every setting it resolved to)\n"
        path.write_bytes(header.encode("ascii") + path.read_bytes())

    def on_train_start(self, trainer, pl_module) -> None:
        self._rotated, self._kept = self._kept, None  # the new settings train: the earlier ones stay kept

    def put_back(self) -> None:
        """``config.yaml`` as this fit found it, byte for byte (the earlier one back from ``config.N.yaml``, or its
        bytes; none where there was none): after a fit that failed once training started, whose earlier run
        ``StepCheckpoint.put_back_earlier_run`` put back."""
        if self._before is None:
            return
        (path, before), rotated = self._before, self._rotated
        self._before = self._rotated = None
        if rotated is not None and rotated.is_file():
            os.replace(rotated, path)
        elif before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._kept is not None and self._kept.is_file():
            os.replace(self._kept, self._kept.with_name(self.config_filename))
        self._kept = None


def keep_earlier_config(path: Path, new: str) -> Path | None:
    """Rename the config at ``path`` to ``<stem>.N<suffix>`` (the first free N from 1) if its settings differ
    from the YAML text ``new``; the kept path, or None (no config there, or the same settings)."""
    import yaml

    if not path.is_file():
        return None
    try:
        same = yaml.safe_load(path.read_text()) == yaml.safe_load(new)  # Lightning wrote it in the locale's encoding
    except yaml.YAMLError:  # not ours to judge: keep it
        same = False
    if same:
        return None
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, kept)
    return kept


MOVED_CHECKPOINT_FOLDER_WARNING = r"The dirpath has changed from .* to .*, therefore"


def take_seed_everything(config) -> None:
    """Give the model's and the datamodule's ``seed`` left unset (None) the run's ``seed_everything``, which
    LightningCLI has resolved to an int by now (``true``: ``PL_GLOBAL_SEED``, else 0; config.yaml records it); with
    ``false``, 0. An explicit seed is kept. (Under the CLI the hyper-parameters are the config's: None would be
    recorded and drawn with.)"""
    everything = config.get("seed_everything")
    everything = everything if isinstance(everything, int) and not isinstance(everything, bool) else 0
    for key in ("model", "data"):
        part = config.get(key)
        args = part.get("init_args") if hasattr(part, "get") else None
        if args is not None and "seed" in args and args.get("seed") is None:
            args["seed"] = everything


SEED_RANGE = (0, 2**32 - 1)  # what Lightning's seed_everything (numpy's generator) accepts


def check_run_settings(config) -> None:
    """Refuse, before Lightning seeds or builds anything, the settings it accepts and then fails on deep inside a
    fit: ``trainer.accumulate_grad_batches`` below 1 (a ZeroDivisionError in the datamodule's setup),
    ``trainer.val_check_interval`` 0 (a ZeroDivisionError after the first training batch) and a
    ``seed_everything`` outside numpy's range (Lightning's message names no key)."""
    trainer = config.get("trainer") or {}
    accumulate = trainer.get("accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate < 1:
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate} is impossible: it must be >= 1 (1: no "
                         "accumulation)")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
        raise ValueError(f"trainer.val_check_interval={interval} is impossible: it must be an int >= 1 (training "
                         "batches between validations), a float in (0, 1] (a fraction of the epoch) or a time "
                         "('DD:HH:MM:SS'); to validate never, set trainer.limit_val_batches 0")
    seed = config.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool) and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"seed_everything={seed} is impossible: it must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] "
                         "(or true: PL_GLOBAL_SEED, else 0)")


RESUME_HELP = {  # --help of the options whose meaning MarDiniCLI changes (Lightning's text described its own)
    ("fit", "ckpt_path"): "last (the default): resume from the newest checkpoint in the stage's folder "
                          "(<save_dir>/<name>/<version>/checkpoints: last.ckpt, hpc_ckpt_N.ckpt or stepN.ckpt, the one "
                          "of the highest step), or start afresh where there is none; PATH: resume from that file into "
                          "the configured model; null: start over in the same folder, the earlier run's checkpoints "
                          "and logs moved to checkpoints/earlier.N/; hpc: the newest preemption checkpoint",
    ("validate", "ckpt_path"): "last (the default): score the stage's newest checkpoint (the one fit resumes from; an "
                               "error where there is none); PATH: score that file; null: score the weights the stage "
                               "starts from (init_from, planner_ckpt / generator_ckpt, else freshly initialised)",
    ("fit", "weights_only"): "read the checkpoint with torch.load(weights_only=True) (the default: never unpickles "
                             "code); false only for a trusted checkpoint that holds other objects",
}
RESUME_HELP[("validate", "weights_only")] = RESUME_HELP[("fit", "weights_only")]


def describe_resume_options(parser, subcommand: str) -> None:
    """Give ``--ckpt_path`` and ``--weights_only`` of ``subcommand``'s parser the help of what they do here (a
    stage's folder resumes by default), in place of Lightning's ("last: the last model checkpoint from the previous
    trainer.fit call", "Defaults to None")."""
    for action in parser._actions:  # argparse's list of the options (jsonargparse has no setter for a help text)
        text = RESUME_HELP.get((subcommand, action.dest))
        if text is not None:
            action.help = text


def _is_registry(ckpt_path) -> bool:
    """Lightning's model-registry keyword (``registry`` or ``registry:NAME``)."""
    return str(ckpt_path).lower() == "registry" or str(ckpt_path).lower().startswith("registry:")


def checkpoint_dir(config) -> str | None:
    """``<save_dir>/<name>/<version>/checkpoints``, where Lightning's ModelCheckpoint saves under a logger (TensorBoard
    or CSV) with a ``save_dir`` and a version: a string as given (``""``: none, the stage configs' layout), an int
    ``N`` as ``version_N``; None for another logger or an unset version (a new ``version_N`` every run)."""
    args = _logger_args(config)
    if not args or not args.get("save_dir") or args.get("version") is None:
        return None
    version = args["version"] if isinstance(args["version"], str) else f"version_{args['version']}"
    return str(Path(str(args["save_dir"])) / str(args.get("name") or "") / version / "checkpoints")


def unversioned_logger(config) -> bool:
    """Whether the first logger (TensorBoard or CSV, with a ``save_dir``) leaves its ``version`` unset (Lightning's
    default): it then logs every run in a new ``version_N`` folder, where no earlier checkpoint is."""
    args = _logger_args(config)
    return bool(args) and bool(args.get("save_dir")) and "version" in args and args["version"] is None


def new_folder_each_run(config) -> tuple[str, str] | None:
    """``(why, fix)`` when the stage's logger logs every run in a new ``version_N`` folder (Lightning's default
    logger, or a logger whose version is null), where ``--ckpt_path last`` finds no earlier checkpoint; else None."""
    if default_logger(config):
        return ("trainer.logger is unset (or true): Lightning's default logger (version unset) logs each run in a new "
                "lightning_logs/version_N folder",
                "set trainer.logger to a TensorBoardLogger with a save_dir, a name and a fixed version, as the stage "
                "configs do (version: \"\": one folder, which the same command resumes in)")
    if unversioned_logger(config):
        return ("trainer.logger's version is null: Lightning then logs each run in a new version_N folder",
                "set the logger's version: \"\" (the stage configs' choice: one folder, which the same command "
                "resumes in) or a fixed version")
    return None


def default_logger(config) -> bool:
    """Whether ``trainer.logger`` is left to Lightning's default (unset or ``true``): a TensorBoardLogger (a
    CSVLogger without tensorboard) in ``<default_root_dir>/lightning_logs`` whose version is unset (a new
    ``version_N`` every run; under SLURM the job's id, a new one each job)."""
    logger = (config.get("trainer") or {}).get("logger")
    return logger is None or logger is True


def no_logger(config) -> bool:
    """Whether ``trainer.logger`` is off (``false`` or an empty list)."""
    logger = (config.get("trainer") or {}).get("logger")
    return logger is False or (isinstance(logger, (list, tuple)) and not logger)


LOGGER_FOLDER_FIELDS = ("save_dir", "name", "version")
ENV_REFERENCE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")  # $NAME or ${NAME}


def expand_logger_folder(config) -> None:
    """Expand the environment variables (``$NAME``, ``${NAME}``) that the loggers' ``save_dir``, ``name`` and
    ``version`` name, so that the runs of one command get folders of their own: ``version: task${SLURM_ARRAY_TASK_ID}``
    gives each task of a SLURM job array its folder (a requeue expands it the same way). A variable not set is an
    error naming it. Before, the text was taken as it was, and every task wrote into one folder literally named so."""
    logger = (config.get("trainer") or {}).get("logger")
    for one in logger if isinstance(logger, (list, tuple)) else [logger]:
        args = one.get("init_args") if hasattr(one, "get") else None
        for field in LOGGER_FOLDER_FIELDS if args is not None else ():
            value = args.get(field)
            if isinstance(value, str) and "$" in value:
                args[field] = expand_env(value, f"trainer.logger.init_args.{field}")


def expand_env(value: str, where: str) -> str:
    """``value`` with its ``$NAME`` / ``${NAME}`` replaced from the environment; an error naming those not set."""
    missing = [a or b for a, b in ENV_REFERENCE.findall(value) if (a or b) not in os.environ]
    if missing:
        raise ValueError(f"{where} {value!r} names the environment variable(s) {', '.join(dict.fromkeys(missing))}, "
                         "not set here: set them (SLURM sets SLURM_ARRAY_TASK_ID in a job array's tasks only), or "
                         "give the folder without them")
    return os.path.expandvars(value)


def _logger_args(config):
    """The ``init_args`` of the stage's first logger given by class path, or None."""
    logger = ((config.get("trainer") or {}).get("logger")) or None  # dicts or jsonargparse Namespaces
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return logger.get("init_args") if hasattr(logger, "get") else None


RESUMABLE = re.compile(r"(last|hpc_ckpt_\d+|step\d+)\.ckpt")  # what a fit writes in its checkpoint folder


def resume_checkpoint(folder: str | None, names: re.Pattern = RESUMABLE) -> str | None:
    """What a ``fit`` with ``--ckpt_path last`` resumes from: of the stage's ``folder/last.ckpt``, preemption
    checkpoints (``hpc_ckpt_N.ckpt``) and step checkpoints (``stepNNNNNNNN.ckpt``), the one of the highest recorded
    global step (the newest file among equal steps); None if there is none. A step checkpoint can be the newest: a
    kill between it and ``last.ckpt`` (written after it) leaves it alone or beside an older ``last.ckpt``. One that
    cannot be read is an error naming it and the others to resume from. ``names``: the file names to consider."""
    if folder is None:
        return None
    found = {p: key for p in Path(folder).glob("*.ckpt") if names.fullmatch(p.name) and (key := _newness(p))}
    return str(max(found, key=found.get)) if found else None


def _newness(path: Path) -> tuple[int, float] | None:
    """``(global step, modification time)`` of the checkpoint at ``path``, for :func:`resume_checkpoint`; None where
    it is no file, or is gone by the time it is read (a fit beside a ``validate`` deletes its older checkpoints: before,
    that was ``checkpoint ... does not exist`` or a raw ``FileNotFoundError``)."""
    try:
        return (_saved_step(path), path.stat().st_mtime) if path.is_file() else None
    except FileNotFoundError:
        return None


def deleted_by_fit_hint(path: Path) -> str:
    """Why a stage's step or preemption checkpoint named by ``--ckpt_path`` may be gone, and the way on; "" for
    another file."""
    if not re.fullmatch(r"(hpc_ckpt_\d+|step\d+)\.ckpt", path.name):
        return ""
    return (f"; a fit in {path.parent} deletes its step and preemption checkpoints (stepN.ckpt, hpc_ckpt_N.ckpt) as "
            "it saves newer ones: copy the checkpoint elsewhere before scoring it, or score the stage's newest with "
            "--ckpt_path last")


def scored_checkpoint(config) -> str:
    """What ``validate`` with ``--ckpt_path last`` (its default) scores: the checkpoint a ``fit`` of the same config
    would resume from (:func:`resume_checkpoint`), said on rank 0; an error naming ``--ckpt_path PATH`` and
    ``--ckpt_path null`` when there is none (before, validate scored freshly initialised or starting weights)."""
    folder = checkpoint_dir(config)
    found = resume_checkpoint(folder)
    if found is None:
        where = (f"{folder} holds none (last.ckpt, hpc_ckpt_N.ckpt or stepN.ckpt)" if folder is not None else
                 "trainer.logger names no stage folder (a TensorBoard or CSV logger with a save_dir and a version)")
        raise ValueError(f"validate scores the stage's newest checkpoint (--ckpt_path last, the default), but {where}: "
                         "pass --ckpt_path PATH to score a checkpoint, or --ckpt_path null to score the weights the "
                         "stage starts from (init_from, planner_ckpt / generator_ckpt, else freshly initialised)")
    rank_zero_info(f"validate scores {found} (step {_saved_step(Path(found))}), the newest checkpoint of the stage; "
                   "--ckpt_path PATH scores another")
    return found


def _saved_step(path: Path) -> int:
    """The global step recorded in the checkpoint at ``path`` (memory-mapped: its tensors are not read)."""
    try:
        return saved_step(path, missing=-1)
    except ValueError as e:
        raise ValueError(f"{e} {other_checkpoints_message(path)}") from e


def trainer_defaults() -> dict:
    return {"log_every_n_steps": 10}


UNION_NOISE = re.compile(r"^\s*(-\s*)?(Does not validate against any of the Union subtypes|Subtypes: |Errors:|"
                         r"Given value( type)?: |Expected a <class 'NoneType'>)")


def library_error(err: BaseException) -> BaseException:
    """The error to report for ``err``: under jsonargparse's wrapping (a Union or class that did not validate, raised
    ``from`` the error of the class it instantiated) the library's own error; a jsonargparse error without one keeps
    only its meaningful lines (not the subtypes, the ``NoneType`` alternative or the dump of the given value)."""
    while _raised_in_jsonargparse(err) and isinstance(err.__cause__, USER_ERRORS):
        err = err.__cause__
    if not _raised_in_jsonargparse(err):
        return err
    return type(err)(meaningful_lines(str(err))).with_traceback(err.__traceback__)


def meaningful_lines(message: str) -> str:
    """A jsonargparse message without the Union noise (subtypes, the ``NoneType`` alternative, the given value's
    dump) on one line: a line ending in ``:`` runs on into the next, others are joined by ``; `` (``message`` itself
    if nothing remains)."""
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if not UNION_NOISE.match(line)]
    meaningful = list(dict.fromkeys(line for line in lines if line))  # nested unions repeat their sub-errors
    joined = "".join(line + (" " if line.endswith(":") else "; ") for line in meaningful).removesuffix("; ").strip()
    return joined or message


def _jsonargparse_debug() -> bool:
    """jsonargparse's debug mode (``JSONARGPARSE_DEBUG``), in which its parse errors raise."""
    try:
        from jsonargparse._common import debug_mode_active
    except ImportError:  # a jsonargparse without it
        return bool(os.environ.get("JSONARGPARSE_DEBUG"))
    return debug_mode_active()


NO_TEST_SPLIT = re.compile(r"invalid choice: '(test|predict)'")


BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
# int before float, built from the classes: `Optional[Union[int, float]]` can come out of typing's cache as the
# float-first Union[float, int, None] (the Trainer's annotation), under which jsonargparse read 1 as 1.0
INT_OR_FRACTION = Union[int, float, None]


class ShortErrorParser(LightningArgumentParser):
    """Lightning's parser, whose parse errors (a value of the wrong type, an unknown option) print one message and a
    pointer to ``--help`` instead of the usage of every option (over a hundred lines) and the Union noise.
    ``MARDINI_TRACEBACK=1``, ``JSONARGPARSE_DEBUG`` or ``exit_on_error=False`` keep jsonargparse's own behaviour.

    The Trainer's ``limit_*_batches`` keep an int an int, as Lightning reads them: ``1`` one batch, ``1.0`` all of
    them (the Trainer's float-first annotation made jsonargparse turn ``limit_val_batches: 1`` into 100 %)."""

    def add_lightning_class_args(self, lightning_class, nested_key: str, subclass_mode: bool = False,
                                 required: bool = True) -> list[str]:
        if not (isinstance(lightning_class, type) and issubclass(lightning_class, Trainer)):
            return super().add_lightning_class_args(lightning_class, nested_key, subclass_mode, required)
        added = self.add_class_arguments(lightning_class, nested_key, fail_untyped=False, instantiate=False,
                                         sub_configs=True, skip=set(BATCH_LIMITS))  # as Lightning's, less those
        for name in BATCH_LIMITS:
            self.add_argument(f"--{nested_key}.{name}", type=INT_OR_FRACTION, default=None,
                              help=f"Trainer's {name}: an int counts batches (1: one batch), a float is a fraction "
                                   "of them (1.0: all); default all")
        return [*added, *(f"{nested_key}.{name}" for name in BATCH_LIMITS)]

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or _jsonargparse_debug():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        message = meaningful_lines(message)
        if NO_TEST_SPLIT.search(message):
            message += (": the stage modules have no test split (nor predict step); `validate` scores the validation "
                        "split, `python evaluate.py` the benchmark protocols")
        sys.stderr.write(f"{prog}: error: {message}\n  ({prog} --help lists the options)\n")
        sys.exit(2)


# what train.py reports as one message and exit status 2: the library's user errors and Lightning's refusals of a
# trainer setting (`--trainer.accelerator gpu` without a GPU, a negative max_steps), which were a traceback
CLI_ERRORS = (*USER_ERRORS, MisconfigurationException)


def _raised_in_jsonargparse(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename


DESCRIPTION = ("Train a MarDini stage (fit) or score its newest checkpoint (validate) from stage YAMLs, e.g. fit "
               "--config configs/tiny/common.yaml --config configs/tiny/01_dm_warmup_4f.yaml. The --config files and "
               "--KEY VALUE overrides apply in the order given (README.md, Training, 'Composing configs'); fit --help "
               "and validate --help list the options.")


def main(args: list[str] | None = None, run: bool = True, prog: str | None = None) -> MarDiniCLI:
    """The CLI over ``args`` (None: ``sys.argv[1:]``); ``prog``: the command its usage and errors name (default the
    script's file name, ``train.py``)."""
    from mardini.data.datamodule import VideoDataModule

    return MarDiniCLI(
        model_class=MarDiniBase,
        subclass_mode_model=True,
        datamodule_class=VideoDataModule,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_callback=KeepEarlierConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
        parser_class=ShortErrorParser,
        parser_kwargs={"description": DESCRIPTION, **({"prog": prog} if prog else {})},  # the main parser's
    )


if __name__ == "__main__":  # `python -m mardini.cli fit ...` is `python train.py fit ...` (also DDP's relaunch of it)
    # run by the imported module, so that its classes are the ones the library uses (not this __main__ copy's)
    from mardini.cli import CLI_ERRORS as _CLI_ERRORS
    from mardini.cli import library_error as _library_error
    from mardini.cli import main as _main
    from mardini.user_errors import run_module as _run_module

    sys.exit(_run_module("mardini.cli", _main, unwrap=_library_error, errors=_CLI_ERRORS))

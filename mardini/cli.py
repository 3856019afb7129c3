"""The LightningCLI used by ``train.py``: stage YAMLs with ``class_path``/``init_args``, safe defaults. Its pieces
live beside it: ``cli_parser`` (parse errors, help), ``cli_settings`` (run settings read before anything is built),
``cli_resume`` (the checkpoint a run resumes or scores), ``cli_loggers`` (where a fit and a validate log),
``cli_saved_config`` (``config.yaml`` / ``validate.yaml``) and ``cli_failed_fit`` (the clean-up after a failed fit)."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mardini.cli_failed_fit import (SpawnedFit, clean_up_after_workers, clean_up_failed_fit, interrupted,
                                   wait_for_workers)
from mardini.cli_loggers import (MOVED_CHECKPOINT_FOLDER_WARNING, drop_empty_validation_runs, fit_logger,
                                 validation_logger)
from mardini.cli_parser import (BATCH_LIMITS, CLI_ERRORS, ShortErrorParser, describe_resume_options,
                                describe_seed_option, library_error)
from mardini.cli_resume import (deleted_by_fit_hint, is_registry_path, resume_checkpoint, resumed_file, resumed_step,
                                scored_checkpoint)
from mardini.cli_saved_config import KEEP_NONE, KeepEarlierConfig
from mardini.cli_settings import (check_run_settings, checkpoint_dir, expand_logger_folder, new_folder_each_run,
                                  no_logger, take_seed_everything)
from mardini.lit.base import MarDiniBase
from mardini.lit.checkpoint_io import AtomicCheckpointIO
from mardini.lit.checkpoints import RESUMING, directory_message
from mardini.lit.clean_up_record import CleanUpRecord
from mardini.lit.fsdp import warn_unpinned_restore
from mardini.lit.lr_monitor import LatestLearningRateMonitor
from mardini.lit.preemption import TERMINATED, PreemptionSave
from mardini.lit.resumed_logs import ResumedLogs
from mardini.lit.run_lock import RunLock
from mardini.lit.scored_checkpoint import ScoredOnEveryRank, none_found, read_identity
from mardini.lit.step_checkpoint import (PREEMPTION, FitStarted, StepCheckpoint,
                                         drop_empty_log_folders, earlier_logs, log_folders, preemption_checkpoints)
from mardini.run_info import command_line

# what `from mardini.cli import ...` keeps offering (train.py, the demo, the tests), wherever it is defined
__all__ = ["BATCH_LIMITS", "CLI_ERRORS", "KEEP_NONE", "KeepEarlierConfig", "MarDiniCLI", "library_error", "main",
           "resume_checkpoint", "trainer_defaults"]


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
            describe_seed_option(parser)
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
        self._resuming = ckpt is not None and str(ckpt) not in ("last", "best", "hpc") and not is_registry_path(ckpt)
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
            self._resume_from = found_or_sent(sub)
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
        the worker of rank 0 (:class:`SpawnedFit`), which the main process waits for, and where that worker was
        stopped before its clean-up ran (another rank failed first), the main process (:func:`clean_up_after_workers`,
        from the state rank 0 recorded: ``mardini.lit.clean_up_record``). A fit that SIGTERM ended
        exits with status 143 (``PreemptionSave``: after its checkpoint), never 0."""
        if self._nothing_to_resume:
            kwargs["ckpt_path"] = None
        elif self._resume_from is not None:
            kwargs["ckpt_path"] = self._resume_from
        folders = log_folders(self.trainer)
        spawned = isinstance(self.trainer.strategy.launcher, _MultiProcessingLauncher)
        # one fit per log folder: a second one is refused before it reads or writes anything there (run_lock)
        lock = RunLock(folders if self.trainer.is_global_zero else ()).acquire()
        record = CleanUpRecord() if spawned else None  # rank 0's clean-up state, for this process
        if spawned:  # the workers run the training (and its clean-up); the main process only launches them
            self.trainer._fit_impl = SpawnedFit(self.trainer, folders, record)
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
                if spawned:  # rank 0's clean-up, where it ended first, and what the workers left
                    workers = getattr(self.trainer.strategy.launcher, "procs", None) or []
                    clean_up_after_workers(record, self.trainer, folders, e, workers)
                    drop_empty_log_folders(folders if self.trainer.is_global_zero else {})
                else:
                    clean_up_failed_fit(self.trainer, folders, e)
            raise
        finally:
            lock.release()
            if spawned:
                del self.trainer._fit_impl
                record.remove()

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
        removes it. It holds ``validate/version_N.lock`` from the folder's creation (:func:`new_validation_run`, as
        the logger is built) to its end: a new fit of the folder (``--ckpt_path null``) sets the earlier run's validate
        runs aside but this one (``set_aside_finished_validates``). It reads
        checkpoints the fit replaces atomically (``AtomicCheckpointIO``), and the one it scores as it starts
        (:meth:`_read_scored`: the fit deletes its older ones); under DDP every rank scores the one global rank 0
        read (``ScoredOnEveryRank``)."""
        if self._resume_from is not None:
            kwargs["ckpt_path"] = self._resume_from
        elif kwargs.get("ckpt_path") is None:
            rank_zero_info("validate scores the weights the stage starts from (--ckpt_path null): its init_from, "
                           "planner_ckpt / generator_ckpt, else freshly initialised ones")
        # its folder in use since its logger was built (validation_logger): a new fit of the stage folder
        # (--ckpt_path null) sets the earlier run's validate runs aside but this one (set_aside_finished_validates)
        locks = self._validation_locks
        try:
            kwargs["ckpt_path"] = self._read_scored(kwargs.get("ckpt_path"), kwargs.get("weights_only"))
            self._note_scored(kwargs["ckpt_path"])
            io = self.trainer.strategy.checkpoint_io
            if isinstance(io, AtomicCheckpointIO) and io.pinned_read()[0] is not None:  # Lightning's FSDP reads again
                warn_unpinned_restore(self.trainer.strategy, kwargs["ckpt_path"])
            with warnings.catch_warnings():
                # the checkpoint callback's folder follows the logger's, here validate/version_N (validation_logger);
                # it saves nothing in a validate, so the best / last paths it does not reload do not matter
                warnings.filterwarnings("ignore", message=MOVED_CHECKPOINT_FOLDER_WARNING)
                return self.trainer.validate(model, **kwargs)
        except BaseException:
            for lock in locks:
                lock.release()
            drop_empty_validation_runs(self.trainer.loggers if self.trainer.is_global_zero else ())
            raise
        finally:
            for lock in locks:
                lock.release()

    def _read_scored(self, ckpt_path, weights_only: bool | None):
        """The checkpoint file ``validate`` scores, read now and handed to Lightning's restore as read
        (``AtomicCheckpointIO.pin``): a fit of the same folder deletes its older step and preemption checkpoints as
        it saves newer ones, and Lightning reads the file only after the model's and the data's setup. Where the file
        ``--ckpt_path last`` found is gone by now, the stage's newest is found again, once; a file named by
        ``--ckpt_path`` that is gone is an error naming why and the way on. Before, a file deleted in between was
        ``train.py: error: checkpoint .../step00000002.ckpt does not exist; check the path (or the stage that
        writes it)``, though no path was given. Lightning's keywords, remote files and a CheckpointIO of one's own
        are left to Lightning. On a rank other than global rank 0 a checkpoint not found is pinned as none found
        (:func:`~mardini.lit.scored_checkpoint.none_found`): rank 0's read is sent to it as the ranks agree
        (``ScoredOnEveryRank``). Before, that rank raised while rank 0 waited for it in a collective for ever."""
        try:
            return self._read_or_find(ckpt_path, weights_only)
        except (FileNotFoundError, ValueError) as e:
            if getattr(rank_zero_only, "rank", 0) == 0:
                raise
            self.trainer.strategy.checkpoint_io.pin(ckpt_path, None, identity=none_found(e))
            return ckpt_path

    def _read_or_find(self, ckpt_path, weights_only: bool | None):
        """:meth:`_read_scored` on one rank: the file read and pinned, found again once where ``last``'s is gone."""
        io = self.trainer.strategy.checkpoint_io
        self._scored_step = None
        if resumed_file(ckpt_path) is None or not isinstance(io, AtomicCheckpointIO):
            return ckpt_path
        try:
            self._pin(io, ckpt_path, weights_only)
            return ckpt_path
        except FileNotFoundError as e:
            if self._scored_from is None:  # named by --ckpt_path
                raise FileNotFoundError(f"{e}{deleted_by_fit_hint(Path(str(ckpt_path)))}") from None
        rank_zero_info(f"{ckpt_path} is gone: the fit in its folder deleted it (a fit keeps its newest step and "
                       "preemption checkpoints only); validate finds the stage's newest again")
        found = scored_checkpoint(self._scored_from)
        try:
            self._pin(io, found, weights_only)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the fit in {Path(found).parent} deleted {Path(found).name} while validate was starting, twice (it "
                "keeps its newest step and preemption checkpoints only): rerun validate, or copy the checkpoint "
                "elsewhere first and score the copy with --ckpt_path COPY") from None
        return found

    def _pin(self, io: AtomicCheckpointIO, path, weights_only: bool | None) -> None:
        """Read the checkpoint at ``path`` for Lightning's restore (``AtomicCheckpointIO.pin``), noting its global
        step for ``validate.yaml`` (:meth:`_note_scored`)."""
        checkpoint, identity = read_identity(io, path, weights_only)
        io.pin(path, checkpoint, identity)  # compared over the ranks before the restore (ScoredOnEveryRank)
        self._scored_step = checkpoint.get("global_step")

    def _note_scored(self, ckpt_path) -> None:
        """Have ``validate.yaml`` name the checkpoint this validate scores (``KeepEarlierConfig.scored``): the file
        (absolute, where local) and its global step where it was read here. Its ``ckpt_path`` field keeps what was
        asked for (``last``: rerunning it scores the stage's newest then)."""
        if ckpt_path is None:  # the weights the stage starts from: ckpt_path null says so
            return
        local = resumed_file(ckpt_path)
        scored = os.path.abspath(local) if local is not None else str(ckpt_path)
        step = getattr(self, "_scored_step", None)
        for callback in self.trainer.callbacks:
            if isinstance(callback, KeepEarlierConfig):
                callback.scored = scored if step is None else f"{scored} (global step {step})"

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
            *([ScoredOnEveryRank()] if self.subcommand == "validate" else []),  # every rank scores rank 0's read
        ]
        # kwargs["callbacks"] replaces trainer.callbacks of the config in LightningCLI: keep the config's ones
        configured = (self._get(self.config_init, "trainer", default={}) or {}).get("callbacks") or []
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        # ResumedLogs first: it sets a resumed fit's logged step before any other callback logs at it
        kwargs["callbacks"] = [ResumedLogs(), *configured, *(kwargs.get("callbacks") or []), *extra]
        # the fit's folder keeps its records: validate logs in validate/version_N of it; a fit continues its
        # metrics.csv, and a resumed one hides from TensorBoard the steps a run given up logged after the checkpoint
        step = resumed_step(resume) if self.subcommand == "fit" else None
        self._validation_locks = []  # those of the validate/version_N folders made next (released by validate)
        rebuild = (functools.partial(validation_logger, locks=self._validation_locks) if self.subcommand == "validate"
                   else functools.partial(fit_logger, step=step))
        loggers = (self._get(self.config_init, "trainer", default={}) or {}).get("logger")
        entries = (self._get(self.config, "trainer", default={}) or {}).get("logger")
        if isinstance(loggers, (list, tuple)):
            kwargs["logger"] = [rebuild(one, entry) for one, entry in zip(loggers, entries)]
        else:
            kwargs["logger"] = rebuild(loggers, entries)
        if self._root_dir is not None:
            kwargs["default_root_dir"] = self._root_dir
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except BaseException:  # a setting the Trainer refuses: the validate/version_N just made is left empty
            if self.subcommand == "validate" and getattr(rank_zero_only, "rank", 0) == 0:
                for lock in self._validation_locks:
                    lock.release()
                given = kwargs["logger"]
                drop_empty_validation_runs(given if isinstance(given, (list, tuple)) else [given])
            raise
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # atomic local saves unless the user chose one
        return trainer


def found_or_sent(sub) -> str:
    """``scored_checkpoint(sub)``: the checkpoint ``validate --ckpt_path last`` scores. On a rank other than global
    rank 0 (which found one: it started the others), where the stage's folder holds none by now (the fit deleted it),
    the path of its ``last.ckpt``: :meth:`MarDiniCLI._read_scored` pins it as none found, and rank 0's read is sent to
    it as the ranks agree (``ScoredOnEveryRank``). Before, that rank raised while rank 0 waited for it for ever."""
    try:
        return scored_checkpoint(sub)
    except ValueError:
        folder = checkpoint_dir(sub)
        if getattr(rank_zero_only, "rank", 0) == 0 or folder is None:
            raise
        return os.path.join(folder, "last.ckpt")


def trainer_defaults() -> dict:
    return {"log_every_n_steps": 10}


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

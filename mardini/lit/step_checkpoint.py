"""ModelCheckpoint that also saves the final step of a fit, whatever ``checkpoint_every`` is, and that keeps one run's
checkpoints in its folder: a new run there first moves the earlier run's aside, and each save deletes the preemption
checkpoints it supersedes."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from mardini.lit.checkpoint_io import local_path
from mardini.lit.checkpoints import read_checkpoint
from mardini.lit.clean_up_record import KeptForCleanUp, note
from mardini.lit.expected_warnings import ignore, remove_filters
from mardini.lit.run_lock import RunLock, drop_stale, held

CONTINUES = ("last", "hpc", "best")  # Lightning's ckpt_path keywords that resume a run of this folder
PREEMPTION = re.compile(r"hpc_ckpt_\d+\.ckpt")  # Lightning's preemption checkpoints (mardini.lit.preemption)
# where train.py validate logs in the stage folder (mardini.cli_loggers.validation_logger)
VALIDATION_FOLDER = "validate"
# a run's records in its log folder: TensorBoard's event files, the loggers' hparams.yaml, a CSV logger's metrics.csv,
# and the folder train.py validate logs in (VALIDATION_FOLDER); config.yaml is KeepEarlierConfig's
LOGS = re.compile(rf"events\.out\.tfevents\..+|hparams\.yaml|metrics\.csv|{VALIDATION_FOLDER}")
# the records a new run may rewrite under the same name (event files are named by time, host and pid): those judged
# unchanged by their contents too (_stamp), not by size and modification time alone
SAME_NAME = re.compile(r"hparams\.yaml|metrics\.csv")
# the records a logger rewrites as the fit starts, before the earlier run is set aside (a CSV logger's hparams.yaml,
# written by log_hyperparams): kept by their bytes (rewritten_records)
REWRITTEN = re.compile(r"hparams\.yaml")
MODEL_CHECKPOINT_MODULE = r"lightning\.pytorch\.callbacks\.model_checkpoint"  # where Lightning warns of a full folder


def not_empty_warning(folder: str) -> str:
    """The filter pattern of ModelCheckpoint's warning that ``folder`` (this one only) "exists and is not empty"."""
    return rf"Checkpoint directory {re.escape(folder)} exists and is not empty\.\Z"


class StepCheckpoint(ModelCheckpoint, KeptForCleanUp):
    """Saves every ``every_n_train_steps`` like ModelCheckpoint, and once more when training ends.

    Lightning's ``save_last`` writes ``last.ckpt`` at train end only if nothing was saved before, so a stage of
    650 steps saved every 100 would end with ``last.ckpt`` at step 600 and lose its last 50 steps. Here the end of
    a fit (max_steps reached, max_time, an early stop) saves the step it stopped at, unless it is already saved: a
    stop inside an epoch where it is decided, before Lightning's fit loop counts the cut epoch as completed (so that a
    resume goes on in the same epoch with Lightning's epoch counter unchanged): ``max_steps`` and ``max_time``
    (Lightning's Timer) at that batch's end, as the every-N saves, an early stop at a validation (EarlyStopping) at
    that validation's end; a stop at an epoch's end when the fit ends.

    ``resume``: what the fit resumes from (its ``ckpt_path``). A fit that starts a new run in the folder (None: from
    scratch, or a checkpoint file outside the folder) first moves the ``*.ckpt`` files an earlier run left there to
    ``earlier.N/`` inside it (N = 1, 2, ...: the highest is the newest) and says so, when its training starts: a fit
    that fails before (a checkpoint to resume refused, a failing sanity check) leaves them where ``--ckpt_path last``
    resumes them. Files are named without Lightning's version counter, so ``last.ckpt`` is always the newest save,
    the one ``--ckpt_path last`` resumes (with the counter, a new run beside an earlier one wrote ``last-v1.ckpt``,
    and ``last`` resumed the earlier run).

    ``logs``: the earlier run's records in the log folder, listed before the fit opens its own
    (:func:`earlier_logs`: event files, hparams.yaml, metrics.csv, validate/); those still as they were move with
    its checkpoints, so TensorBoard shows the new run apart from the earlier one, and a ``hparams.yaml`` the fit has
    rewritten by then (a CSV logger's) goes there as it was (its bytes, read here: :func:`rewritten_records`); of
    ``validate/``, the runs of the validates that have ended (:func:`set_aside_finished_validates`). A fit
    that then fails before it saves a checkpoint puts them back (:meth:`put_back_earlier_run`, called by
    ``MarDiniCLI.fit``), so that ``--ckpt_path last`` resumes the earlier run again; one that saved a checkpoint
    leaves them in ``earlier.N/``.

    Each save then deletes the preemption checkpoints (``hpc_ckpt_N.ckpt``, one per preemption) in the folder that it
    supersedes (:func:`drop_superseded_preemption_checkpoints`), so they do not pile up over a run's requeues.
    """

    clean_up_state = ("aside", "saved_any", "dirpath", "_fs", "logs")  # what put_back_earlier_run reads

    def __init__(self, *args, resume: str | None = "last", logs: dict[str, tuple] | None = None,
                 **kwargs) -> None:
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        self.resume, self.logs = resume, logs or {}
        self.rewritten = rewritten_records(self.logs)  # before the fit: its logger may rewrite them as it starts
        self.aside: str | None = None  # where this fit set the earlier run aside (rank 0)
        self.saved_any = False  # whether this fit has saved a checkpoint

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Lightning's setup, without its warning that this callback's own folder "exists and is not empty": a resume
        writes into its own run's folder and a new run sets the earlier run aside, by design. The filter names this
        folder and is removed after the setup: another folder's warning (another ModelCheckpoint's) still shows."""
        added = ignore(not_empty_warning(self._own_folder(trainer)), MODEL_CHECKPOINT_MODULE)
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            remove_filters(added)

    def _own_folder(self, trainer: "pl.Trainer") -> str:
        """The folder Lightning's setup resolves next (``dirpath``, else the logger's ``.../checkpoints``)."""
        return str(self._ModelCheckpoint__resolve_ckpt_dir(trainer))

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Set the earlier run aside once the checkpoint to resume has loaded: at ``setup`` Lightning has not read it
        yet, and a resume refused then (``MarDiniBase.on_load_checkpoint``) left the folder without its checkpoints."""
        super().on_train_start(trainer, pl_module)
        if not self._starts_new_run():
            return
        if trainer.is_global_zero:
            self.aside = set_aside_earlier_run(self._fs, str(self.dirpath), self.logs, self.rewritten)
            note(trainer)  # where it is, for the main process of a ddp_spawn fit (mardini.lit.clean_up_record)
        trainer.strategy.barrier("StepCheckpoint.set_aside")  # no rank saves before the folder is clear

    def _starts_new_run(self) -> bool:
        """A fit from scratch, or resuming a checkpoint file that is not directly in this folder."""
        if self.resume is None:
            return True
        name = str(self.resume)
        if name in CONTINUES or name.lower().startswith("registry"):
            return False
        file, folder = local_path(name), local_path(str(self.dirpath))
        if file is None or folder is None:
            return False  # remote: not ours to move
        return Path(file).resolve().parent != Path(folder).resolve()

    def put_back_earlier_run(self, ended: str = "failed") -> bool:
        """After this fit failed (or ``ended`` otherwise: "was interrupted"): the earlier run it set aside goes back
        where it was (:func:`put_back_earlier_run`) if the fit saved no checkpoint; if it saved one, the earlier run
        stays in ``earlier.N/`` and it says so. Whether it put it back (False too where nothing was set aside)."""
        aside, self.aside = self.aside, None
        if aside is None:
            return False
        if self.saved_any:  # the folder's checkpoints are this fit's: the earlier run's are aside
            names = ", ".join(sorted(os.path.basename(p) for p in self._fs.ls(str(self.dirpath), detail=False)
                                     if p.endswith(".ckpt")))
            rank_zero_info(f"The fit {ended} after saving {names}: the earlier run stays in {aside} (--ckpt_path "
                           f"{os.path.join(aside, 'last.ckpt')} resumes it; --ckpt_path last resumes the new one)")
            return False
        put_back_earlier_run(self._fs, aside, str(self.dirpath), self.logs, ended)
        return True

    def _save_checkpoint(self, trainer: "pl.Trainer", filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.saved_any = True
        note(trainer)
        folder = local_path(str(self.dirpath))
        if trainer.is_global_zero and folder is not None:  # the file is written (rank 0 writes it)
            drop_superseded_preemption_checkpoints(Path(folder), trainer.global_step)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx: int) -> None:
        """The every-N save, and the fit's last step by ``max_steps`` or by a stop set at this batch's end (Lightning's
        Timer at ``max_time``; it and the other callbacks run before the checkpoint callbacks), where
        ModelCheckpoint's every-N save would: saved at :meth:`on_train_end`, Lightning's fit loop would already have
        counted the unfinished epoch as completed, and each resume from it logged ``epoch`` one higher while it went
        on in the same epoch."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps) or stops_inside_epoch(trainer):
            self._save_this_step(trainer)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """ModelCheckpoint's, and the fit's last step where this validation stopped it inside an epoch
        (EarlyStopping), for the reason :meth:`on_train_batch_end` gives."""
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking and stops_inside_epoch(trainer):
            self._save_this_step(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._save_this_step(trainer)  # a stop at an epoch's end (the epoch is over: loop_state starts the next)
        super().on_train_end(trainer, pl_module)

    def _save_this_step(self, trainer: "pl.Trainer") -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # fitting, and this step is not saved yet
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def stops_inside_epoch(trainer: "pl.Trainer") -> bool:
    """Whether the fit stops after the training batch last run, which is not its epoch's last: ``should_stop`` is set
    (Timer, EarlyStopping, a module or callback of one's own) and Lightning may stop (``min_epochs`` and
    ``min_steps`` met; before, it trains on with the flag set)."""
    loop = trainer.fit_loop
    return trainer.should_stop and lightning_may_stop(loop) and not loop.epoch_loop.batch_progress.is_last_batch


def lightning_may_stop(loop) -> bool:
    """Lightning's "``min_epochs`` and ``min_steps`` are met" (``_FitLoop._can_stop_early``: private, no public API
    says it). A Lightning without it is an error naming the fix, not a guess: taking it for True saved a checkpoint at
    every step a fit trained on below ``min_steps`` with ``should_stop`` set."""
    try:
        return loop._can_stop_early
    except AttributeError:
        raise RuntimeError(
            "StepCheckpoint (mardini/lit/step_checkpoint.py): this Lightning's fit loop has no _can_stop_early; install "
            "requirements.txt's lightning, or port stops_inside_epoch to this version (run "
            "tests/test_library_internals.py first)") from None


def set_aside_earlier_run(fs, folder: str, logs: dict[str, tuple] | None = None,
                          rewritten: dict[str, bytes] | None = None) -> str | None:
    """Move the ``*.ckpt`` files in ``folder`` (on the fsspec file system ``fs``), and the records ``logs`` names
    (:func:`earlier_logs`) that are still as they were then (of ``validate/``, the runs of validates that have
    ended: :func:`set_aside_finished_validates`), into ``folder/earlier.N``, the first free N from 1, and say so;
    that folder, or None (nothing to move). A record changed since is the new run's and stays; where ``rewritten``
    (:func:`rewritten_records`) holds its earlier bytes (a CSV logger's hparams.yaml, rewritten when the fit
    starts), those are written into ``earlier.N`` in its place."""
    found = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".ckpt") and fs.isfile(p)) \
        if fs.isdir(folder) else []
    records = sorted(path for path, stamp in (logs or {}).items() if unchanged(path, stamp))
    copies = {path: data for path, data in (rewritten or {}).items() if path not in records}
    if not found and not records and not copies:
        return None
    n = 1
    while fs.exists(aside := os.path.join(folder, f"earlier.{n}")):
        n += 1
    fs.makedirs(aside)
    running: list[str] = []
    for path in found + records:
        if os.path.basename(path) == VALIDATION_FOLDER:
            running = set_aside_finished_validates(fs, path, os.path.join(aside, VALIDATION_FOLDER))
        else:
            fs.mv(path, os.path.join(aside, os.path.basename(path)), recursive=True)
    for path, data in copies.items():
        fs.pipe_file(os.path.join(aside, os.path.basename(path)), data)
    records = sorted(records + list(copies))
    names = [os.path.basename(p) for p in found]
    way = f" (--ckpt_path {os.path.join(aside, 'last.ckpt')} resumes that run)" if "last.ckpt" in names else ""
    moved = " and ".join(f"{what} ({', '.join(os.path.basename(p) for p in paths)})" for what, paths in
                         (("checkpoints", found), ("logs", records)) if paths)
    stay = (f"; {', '.join(f'{VALIDATION_FOLDER}/{name}' for name in running)} "
            f"{'stays where it is' if len(running) == 1 else 'stay where they are'}: a validate is writing there"
            if running else "")
    rank_zero_info(f"A new run in {folder}: the earlier run's {moved} are moved to {aside}{way}{stay}")
    return aside


def validate_lock(run: str | Path) -> Path:
    """The lock a validate holds beside its folder ``run`` (``validate/version_N.lock``) while it writes there."""
    return Path(f"{run}.lock")


def set_aside_finished_validates(fs, folder: str, dest: str) -> list[str]:
    """Move the validate runs in ``folder`` (the log folder's ``validate/``: ``version_N`` each) to ``dest``, but for
    those a validate holds (:func:`running_validates`), which stay where they are with their locks, and those made
    after this looked (each moved by name, never ``folder`` whole); the locks of validates that are gone are deleted
    (:func:`drop_dead_validate_locks`), not moved; ``dest`` is made only where a run moves, and ``folder`` removed
    where that emptied it. The names of the runs left. Before, ``validate/`` moved whole, and a validate writing
    there ended with ``FileNotFoundError: [Errno 2] No such file or directory: '.../validate/version_1/metrics.csv'``
    (its event file too), its score recorded nowhere."""
    names = os.listdir(folder)
    running = running_validates(folder, names)
    drop_dead_validate_locks(folder)  # a lock is no record: a dead validate's is deleted, a live one's stays
    moving = sorted(name for name in set(names) - set(running) if not is_validate_lock(name))
    if moving:  # no empty dest where all stay
        fs.makedirs(dest, exist_ok=True)
    for name in moving:
        fs.mv(os.path.join(folder, name), os.path.join(dest, name), recursive=True)
    if not running:
        with contextlib.suppress(OSError):  # not empty: a validate claimed a run meanwhile
            os.rmdir(folder)
    return running


def is_validate_lock(name: str) -> bool:
    """Whether ``name`` (an entry of ``validate/``) is a validate run's lock file (:func:`validate_lock`)."""
    return name.endswith(validate_lock("").name)


def running_validates(folder: str, names: list[str]) -> list[str]:
    """The validate runs among ``names`` (the entries of ``validate/`` ``folder``) whose lock is held, found by their
    lock files: a run's lock comes before its folder (``mardini.cli_loggers.new_validation_run``), so a run claimed
    and not made yet is one."""
    suffix = validate_lock("").name  # ".lock"
    return sorted(name[:-len(suffix)] for name in names if is_validate_lock(name) and held(Path(folder) / name))


def drop_dead_validate_locks(folder: str | Path) -> list[str]:
    """Delete the locks in ``validate/`` ``folder`` of validates that are gone (``run_lock.drop_stale``: the pid on
    this host gone, the SLURM job requeued, or no heartbeat for ``STALE_AFTER_S``), saying so; a live one is never
    deleted. Their names. Before, a killed validate's ``version_N.lock`` stayed for ever (and moved with the finished
    runs into ``earlier.N/validate/``)."""
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    dropped = []
    for name in filter(is_validate_lock, names):
        if why := drop_stale(Path(folder) / name):
            rank_zero_info(f"{Path(folder) / name} deleted: the validate that held it is gone ({why})")
            dropped.append(name)
    return dropped


def put_back_earlier_run(fs, aside: str, folder: str, logs: dict[str, tuple] | None = None,
                         ended: str = "failed") -> None:
    """Undo :func:`set_aside_earlier_run` after a new run that failed (or ``ended`` otherwise: "was interrupted")
    without saving a checkpoint: delete the records that run wrote in the log folder (``folder``'s parent; ``LOGS``
    files that were not there before, ``logs``, and those the earlier run's are coming back over), move every file of
    ``aside`` back where it was (checkpoints to ``folder``, records to the log folder; validate runs beside those in
    ``validate/``: :func:`put_back_validates`), remove ``aside`` (but where a validate holds a run in it), and say
    so. Run again after it was stopped part way (rank 0 of a ``ddp_spawn`` fit killed in its clean-up, which the main
    process then does again: ``mardini.cli_failed_fit.clean_up_after_workers``) it puts back what is left, and
    nothing where ``aside`` is gone."""
    if not fs.exists(aside):  # put back already, by a clean-up stopped before it was marked done
        return
    log_dir = os.path.dirname(os.path.normpath(folder))
    back, held_aside = [os.path.basename(p) for p in fs.ls(aside, detail=False)], []
    records = {os.path.basename(p): p for p in (logs or {})}  # the earlier run's, by name
    local = local_path(log_dir)
    if local is not None and os.path.isdir(local):  # the failed run's own records (local folders only, as the logs)
        for name in sorted(os.listdir(local)):
            path = os.path.join(local, name)
            if LOGS.fullmatch(name) and os.path.isfile(path) and (name not in records or name in back):
                os.remove(path)
    for name in back:
        dest = os.path.join(folder, name) if name.endswith(".ckpt") else records.get(name, os.path.join(log_dir, name))
        if name == VALIDATION_FOLDER:  # run by run, beside those kept there or started since (not the fit's)
            fs.makedirs(dest, exist_ok=True)
            held_aside = put_back_validates(fs, os.path.join(aside, name), dest)
            continue
        if fs.isdir(dest):  # a folder the failed run made where the earlier run's comes back
            fs.rm(dest, recursive=True)
        fs.mv(os.path.join(aside, name), dest, recursive=True)
    stay = (f"; {', '.join(held_aside)} {'stays' if len(held_aside) == 1 else 'stay'} in {aside}/{VALIDATION_FOLDER}: "
            "a validate is writing there" if held_aside else "")
    if not held_aside:
        fs.rmdir(aside)
    rank_zero_info(f"The fit {ended} before saving a checkpoint: the earlier run's files ({', '.join(sorted(back))}) "
                   f"are back from {aside} (--ckpt_path last resumes that run){stay}")


def put_back_validates(fs, aside: str, folder: str) -> list[str]:
    """Move the finished validate runs in ``aside`` back into ``folder`` (the log folder's ``validate/``) beside those
    there (kept by :func:`set_aside_finished_validates`, or started since), each under a name claimed as a validate
    claims one (:func:`claim_run_name`: its lock first, then no folder of that name), its own where free, else the
    first free ``version_N``; remove ``aside`` where that emptied it. A run whose lock is held (a validate writing
    there) stays where it is, with its lock; locks of validates that are gone are deleted. The names that stayed.
    Earlier, the ``validate/`` there was deleted with the runs in it; then, runs were moved by folder names alone:
    into the name a validate had claimed (its lock taken, its folder not made yet), and a run in ``aside`` that a
    validate held was moved from under it (its lock file too)."""
    drop_dead_validate_locks(aside)
    names = sorted(os.listdir(aside))
    running = running_validates(aside, names)
    runs = [name for name in names if name not in running and not is_validate_lock(name)]
    for name in sorted(runs, key=lambda name: name_taken(folder, name)):  # those of a name taken: the first N then free
        dest, lock = claim_run_name(folder, name)
        try:
            fs.mv(os.path.join(aside, name), os.path.join(folder, dest), recursive=True)
        finally:
            lock.release()
    if not running:
        fs.rmdir(aside)
    return running


def name_taken(folder: str, name: str) -> bool:
    """Whether ``validate/`` ``folder`` has a run ``name``, or its lock (a validate claimed the name)."""
    return any(os.path.exists(os.path.join(folder, entry)) for entry in (name, validate_lock(name).name))


def claim_run_name(folder: str, name: str) -> tuple[str, RunLock]:
    """``(a run name in validate/ folder, the lock held on it)``: ``name`` where this takes its lock (``O_EXCL``, as
    ``mardini.cli_loggers.new_validation_run`` does) and no folder has it, else the first such ``version_N``."""
    for candidate in itertools.chain([name], (f"version_{n}" for n in itertools.count())):
        lock = RunLock([folder], validate_lock(candidate).name)
        if lock.claim():
            if not os.path.exists(os.path.join(folder, candidate)):
                return candidate, lock
            lock.release()  # a finished run's name


def rewritten_records(logs: dict[str, tuple]) -> dict[str, bytes]:
    """The bytes of the records of :func:`earlier_logs` that a logger rewrites as the fit starts (``REWRITTEN``: a
    CSV logger's hparams.yaml), read before the fit, so that :func:`set_aside_earlier_run` sets the earlier run's aside
    and :func:`put_back_earlier_run` puts them back. Before, the new run's hparams.yaml replaced the earlier one's."""
    return {path: Path(path).read_bytes() for path in logs
            if REWRITTEN.fullmatch(os.path.basename(path)) and os.path.isfile(path)}


def earlier_logs(log_dir: str | None) -> dict[str, tuple]:
    """The records of a run in the local log folder ``log_dir`` (``LOGS``: event files, hparams.yaml, metrics.csv,
    validate/), each with its :func:`_stamp`, for :func:`set_aside_earlier_run`; none for None or a remote folder."""
    folder = local_path(log_dir) if log_dir is not None else None
    if folder is None or not os.path.isdir(folder):
        return {}
    return {str(p): stamp for p in Path(folder).iterdir() if LOGS.fullmatch(p.name) and (stamp := _stamp(p))}


class FitStarted(Callback, KeptForCleanUp):
    """Whether the fit reached its training (``on_train_start``: after the setup, the checkpoint's restore and the
    sanity check), for the clean-up of a fit that failed before (:func:`drop_untrained_logs`)."""

    started = False
    clean_up_state = ("started",)

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = True
        note(trainer)


def log_folders(trainer) -> dict[Path, tuple[set[str] | None, Path]]:
    """Each local log folder of the trainer's loggers, before the fit writes any: the names in it (None: no such
    folder yet) and its nearest folder that exists (itself, or the parent its logger would create it in); remote
    folders and loggers without one are left out."""
    folders: dict[Path, tuple[set[str] | None, Path]] = {}
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        folder = local_path(log_dir) if log_dir is not None else None
        if folder is None:
            continue
        folder = Path(folder).absolute()
        existing = next(p for p in (folder, *folder.parents) if p.is_dir())
        folders[folder] = (set(os.listdir(folder)) if existing == folder else None, existing)
    return folders


def drop_untrained_logs(folders: dict[Path, tuple[set[str] | None, Path]]) -> list[str]:
    """Delete what a fit that failed before training (its setup, the data's, the sanity check) added to the log
    folders of :func:`log_folders`: the records (``LOGS``: an event file with no step, hparams.yaml, metrics.csv)
    that were not there, then the folder and the parents it created, where left empty. The paths deleted."""
    dropped = []
    for folder, (names, _) in folders.items():
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and LOGS.fullmatch(path.name) and (names is None or path.name not in names):
                path.unlink()
                dropped.append(str(path))
    return dropped + drop_empty_log_folders(folders)


def drop_empty_log_folders(folders: dict[Path, tuple[set[str] | None, Path]]) -> list[str]:
    """Delete the log folders of :func:`log_folders` that the fit created and left empty, and the parents it created
    with them. The paths deleted."""
    dropped = []
    for folder, (_, existing) in folders.items():
        while folder != existing and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            dropped.append(str(folder))
            folder = folder.parent
    return dropped


def unchanged(path: str, stamp: tuple) -> bool:
    """Whether the record ``path`` is still the earlier run's, as :func:`earlier_logs` found it with ``stamp``:
    ``validate/`` always (its runs are sorted by their locks: :func:`set_aside_finished_validates`; a validate that
    claimed a run there since changed its time, and the finished runs stayed in the new run's folder), a file where
    its :func:`_stamp` is the same."""
    if os.path.basename(path) == VALIDATION_FOLDER:
        return os.path.isdir(path)
    return _stamp(path) == stamp


def _stamp(path: str | Path) -> tuple | None:
    """``(size, modification time in ns, SHA-256 of the contents)`` of ``path`` (the hash for ``SAME_NAME`` files
    only, else None); None where there is nothing. Size and time alone took a record the new run rewrote to as many
    bytes within the file system's time resolution (a second or two on some) for the earlier run's: it was moved
    aside, and the earlier run's lost."""
    try:
        info = os.stat(path)
        digest = None
        if SAME_NAME.fullmatch(os.path.basename(path)) and os.path.isfile(path):
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns, digest


def preemption_checkpoints(folder: str | Path | None) -> list[Path]:
    """The preemption checkpoints (``hpc_ckpt_N.ckpt``) in ``folder``, by name; none for None."""
    if folder is None:
        return []
    return sorted(p for p in Path(folder).glob("hpc_ckpt_*.ckpt") if PREEMPTION.fullmatch(p.name))


def saved_step(path: str | Path, missing: int) -> int:
    """The global step a checkpoint records (memory-mapped: its tensors are not read); ``missing`` where it records
    none. Raises :func:`~mardini.lit.checkpoints.read_checkpoint`'s errors."""
    return int(read_checkpoint(path).get("global_step", missing))


def drop_superseded_preemption_checkpoints(folder: Path, step: int) -> list[str]:
    """Delete the preemption checkpoints (``hpc_ckpt_N.ckpt``) in ``folder`` that record a global step up to ``step``:
    a checkpoint of ``step`` just saved there supersedes them (``--ckpt_path last`` resumes the highest step, the
    newer file among equals). One of a higher step, or one that cannot be read, stays. The names deleted."""
    dropped = []
    for path in preemption_checkpoints(folder):
        try:
            saved = saved_step(path, missing=step + 1)
        except (ValueError, FileNotFoundError):
            continue
        if saved <= step:
            path.unlink(missing_ok=True)
            dropped.append(path.name)
    if dropped:
        rank_zero_info(f"{', '.join(dropped)} deleted from {folder}: the checkpoint of step {step} saved there "
                       "supersedes them")
    return dropped

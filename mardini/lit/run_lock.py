"""One fit per log folder: a lock file that refuses a second fit of the same ``save_dir/name/version``.

Lightning does not guard a log folder: two fits given the same logger ``save_dir``, ``name`` and fixed ``version``
(a sweep's copy-paste, a job array without a per-task version) both write there, and each overwrites the other's
``last.ckpt``, step checkpoints, ``config.yaml`` and ``hparams.yaml`` while their event files interleave in
TensorBoard (its ModelCheckpoint only warns that the folder "exists and is not empty", as a resume's is by design:
``StepCheckpoint`` ignores that warning for its own folder).

``train.py fit`` holds ``fit.lock`` in the stage's log folder for the whole fit (global rank 0; the file names the
host, pid, SLURM job and start time, and a thread touches it every ``HEARTBEAT_S`` seconds). A second fit there is
refused before it writes anything, naming the holder and the fix. A lock left by a fit that died without releasing
it (SIGKILL, a node lost) is stale and taken over, with a message: its pid is gone (same host), its SLURM job is the
one now running again (a requeue keeps ``SLURM_JOB_ID`` and raises ``SLURM_RESTART_COUNT``), or its heartbeat is
older than ``STALE_AFTER_S`` (another host). Resumes (``--ckpt_path last``) and requeues therefore go on as before.

Every step that decides who holds the folder is atomic on a local file system and on NFSv3+: creating the lock and
claiming a takeover (``O_CREAT | O_EXCL``), replacing a stale lock (``os.replace``); fits that judge one stale lock
at once leave it to the one that claims it first, the others are refused as by a live lock (:func:`take_over`).
What stays non-atomic: removing a claim left by a taker killed within its takeover (milliseconds; two fits that
both find it ``HEARTBEAT_S`` later could both remove it), and a holder judged stale wrongly (its heartbeat stalled
over ``STALE_AFTER_S``) that releases its lock while another fit replaces it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

LOCK_NAME = "fit.lock"
HEARTBEAT_S = 30.0  # how often the holder touches its lock
STALE_AFTER_S = 600.0  # a lock untouched this long is a dead fit's, whatever its host


class FolderInUseError(ValueError):
    """Another fit holds the log folder (a user error: one line, no traceback)."""


class RunLock:
    """The lock files of a fit's log ``folders`` (taken by :meth:`acquire`, dropped by :meth:`release`)."""

    def __init__(self, folders, name: str = LOCK_NAME, holder: str = "fit") -> None:
        self.paths = [Path(folder) / name for folder in dict.fromkeys(map(str, folders))]
        self.holder = holder  # what holds it, as the takeover's message names it (a sample.py job's: "job")
        self.record = holder_record()
        self._held: list[Path] = []
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take every folder's lock or none (a refusal releases those taken)."""
        try:
            for path in self.paths:
                take(path, self.record, self.holder)
                self._held.append(path)
        except BaseException:
            self.release()
            raise
        self._start_heartbeat()
        return self

    def claim(self) -> bool:
        """Take every folder's lock only where no lock file is there, live or stale (no takeover): True once held,
        False (none taken) where one is there. For a lock of a new name each run (a validate's ``version_N.lock``),
        where another name is the way on rather than a dead holder's lock: no takeover claim or temp file is made."""
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not create(path, self.record):
                self.release()
                return False
            self._held.append(path)
        self._start_heartbeat()
        return True

    def _start_heartbeat(self) -> None:
        if self._held:
            self._beat = threading.Thread(target=self._heartbeat, name="mardini-fit-lock", daemon=True)
            self._beat.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the locks still ours (idempotent)."""
        self._stop.set()
        held, self._held = self._held, []
        for path in held:
            if read_record(path).get("token") == self.record["token"]:
                path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for path in list(self._held):
                if read_record(path).get("token") == self.record["token"]:
                    os.utime(path)


def holder_record() -> dict:
    """What a lock says about its fit: host, pid, SLURM job and restart count, start time, a unique token."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}


def take(path: Path, record: dict, holder: str = "fit") -> None:
    """Create the lock at ``path`` holding ``record``; a stale one is taken over (said once, naming the ``holder``
    that is gone), a live one refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # the lock may change hands between our look and our claim: look again
        if create(path, record):
            return
        found = read_record(path)
        why = stale_reason(found, path)
        if why is None:
            raise FolderInUseError(in_use_message(path, found))
        stale = identity(found, path)
        if stale is not None and take_over(path, record, stale):
            rank_zero_warn(f"{path}: taking over the lock of a {holder} that is gone ({why}); this {holder} now holds "
                           "the folder")
            return
    raise FolderInUseError(in_use_message(path, read_record(path)))


def take_over(path: Path, record: dict, stale: str) -> bool:
    """Replace the stale lock at ``path`` (``stale``: its :func:`identity`) by one holding ``record``, under the claim
    file ``<lock name>.takeover-<stale>`` (``fit.lock.takeover-<stale>``) that only one taker creates (``O_EXCL``);
    the lock is replaced whole (``os.replace`` of a written temp file), never moved away. False where the lock is no
    longer that one (taken over or released meanwhile: look again). While another fit holds the claim this one is
    refused, as by a live lock; a claim older than ``HEARTBEAT_S`` is a taker's killed mid-takeover and is removed."""
    claim = path.with_name(f"{path.name}.takeover-{stale}")
    if not create(claim, record):
        return clear_dead_claim(claim, path)
    try:
        if identity(read_record(path), path) != stale:
            return False
        replace(path, record)
        return True
    finally:
        claim.unlink(missing_ok=True)


def clear_dead_claim(claim: Path, path: Path) -> bool:
    """False after removing ``claim`` when its taker is gone (older than ``HEARTBEAT_S``); otherwise the refusal
    naming that taker, which is taking the lock at ``path`` over."""
    try:
        age = time.time() - claim.stat().st_mtime
    except FileNotFoundError:  # its takeover just ended
        return False
    if age <= HEARTBEAT_S:
        raise FolderInUseError(in_use_message(path, read_record(claim)))
    claim.unlink(missing_ok=True)
    return False


def identity(found: dict, path: Path) -> str | None:
    """Which lock ``found`` (read from ``path``) is: its token, else (an empty or foreign file) its inode; None when
    ``path`` is gone."""
    token = found.get("token")
    if isinstance(token, str) and token.isalnum():
        return token
    try:
        return f"inode{path.stat().st_ino}"
    except FileNotFoundError:
        return None


def replace(path: Path, record: dict) -> None:
    """Put a lock holding ``record`` at ``path`` over whatever is there, in one step (a temp file ``os.replace``d)."""
    temp = path.with_name(f"{path.name}.{record['token']}.tmp")
    try:
        temp.write_text(json.dumps(record))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def create(path: Path, record: dict) -> bool:
    """Write ``record`` to a new file at ``path``; False when one is there (atomic, ``O_EXCL``)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


def read_record(path: Path) -> dict:
    """The lock's record; empty when it is gone or unreadable (half written)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def stale_reason(found: dict, path: Path) -> str | None:
    """Why the lock holding ``found`` is a dead fit's, or None while its fit may be alive."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "its file is gone"
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old, over {STALE_AFTER_S:.0f} s"
    job = os.environ.get("SLURM_JOB_ID")
    if job and found.get("slurm_job_id") == job and \
            found.get("slurm_restart_count") != os.environ.get("SLURM_RESTART_COUNT", "0"):
        return f"SLURM job {job} was requeued and runs again here"
    if found.get("host") == socket.gethostname() and isinstance(found.get("pid"), int) and not alive(found["pid"]):
        return f"pid {found['pid']} on this host is gone"
    if not found and age > HEARTBEAT_S:
        return "it is empty, a fit killed while writing it"
    return None


def drop_stale(path: Path) -> str | None:
    """Delete the lock at ``path`` where it is a dead holder's (:func:`stale_reason`), never a live one: it is first
    renamed to a name of its own (atomic: of two that drop it, one gets it) and deleted only where that file is the
    lock judged stale; a lock made at ``path`` since (by a run that found the name free) is put back. Why it was
    stale, or None where it is left (live, gone, or put back)."""
    found = read_record(path)
    why, stale = stale_reason(found, path), identity(found, path)
    if why is None or stale is None:
        return None
    grabbed = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, grabbed)
    except FileNotFoundError:  # another run dropped it first
        return None
    if identity(read_record(grabbed), grabbed) == stale:
        grabbed.unlink()
        return why
    try:  # a live lock made since the look: back where its holder reads it
        os.link(grabbed, path)
    except FileExistsError:
        pass
    grabbed.unlink()
    return None


def held(path: Path) -> bool:
    """Whether the lock at ``path`` is there and its process may be alive (not :func:`stale_reason`)."""
    return path.is_file() and stale_reason(read_record(path), path) is None


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_text(found: dict, what: str = "fit") -> str:
    """``pid P on host H, SLURM job J, started T`` of a lock's record ``found`` (empty: ``a <what> whose lock is
    being written``)."""
    job = f", SLURM job {found['slurm_job_id']}" if found.get("slurm_job_id") else ""
    return (f"pid {found.get('pid')} on host {found.get('host')}{job}, started {found.get('started')}" if found
            else f"a {what} whose lock is being written")


def in_use_message(path: Path, found: dict) -> str:
    """The refusal: who holds the folder, why two fits there break both, and the fixes."""
    holder = holder_text(found)
    return (f"{path.parent} is in use by another fit ({holder}; lock file {path}). Two fits in one log folder "
            "overwrite each other's last.ckpt, step checkpoints, config.yaml and hparams.yaml and mix their event "
            "files. Give this run its own folder: another trainer.logger.init_args.version (e.g. --trainer.logger."
            "init_args.version lr3e-4, or task$SLURM_ARRAY_TASK_ID in a job array), save_dir or name; or wait for "
            "that fit to end and rerun this command to resume it. The lock is taken over by itself once that fit is "
            f"gone (its pid on the same host, its SLURM job requeued, or no heartbeat for {STALE_AFTER_S:.0f} s); "
            f"delete {path} only if you know it is gone")

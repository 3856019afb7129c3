"""One fit per log folder (``mardini.lit.run_lock``): a second fit of the same save_dir/name/version is refused
before it writes anything; a lock its fit left behind when it died (pid gone, SLURM requeue, no heartbeat) is taken
over, so resumes and requeues go on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Callback

from mardini.cli import main
from mardini.data.testing import tiny_synthetic
from mardini.lit import run_lock
from mardini.lit.run_lock import LOCK_NAME, FolderInUseError, RunLock

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lock")
    tiny_synthetic(root / "data" / "shards" / "synthetic", train=8, val=4, frames=8, size=32)
    return root


def _config(tmp: Path) -> Path:
    """A 2-step tiny generator stage logging to ``tmp/stage`` (version "", the stage configs' layout)."""
    cfg = {
        "seed_everything": 1, "checkpoint_every": 100,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 2,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp), "name": "stage", "version": ""}}},
        "model": {"class_path": "mardini.lit.GenerationModule", "init_args": {
            "size": "tiny", "planner_resolution": 16, "frames": 4, "generator": {"patch_size": 2, "dim": 32},
            "lr": 1e-3, "decay_steps": 10, "keep_ratio": [0.5, 1.0], "templates": {"random": 1.0}}},
        "data": {"class_path": "mardini.data.datamodule.VideoDataModule", "init_args": {
            "train_shards": "data/shards/synthetic/train", "val_shards": "data/shards/synthetic/val", "frames": 4,
            "fps": 8, "resolution": 32, "batch_size": 2, "num_workers": 0, "epoch_size": 4, "shuffle_buffer": 2}},
    }
    path = tmp / "stage.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(workdir: Path, monkeypatch, config: Path, *args: str):
    monkeypatch.chdir(workdir)
    return main(["fit", "--config", str(config), *QUIET, *args])


def _lock(folder: Path, **record) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "slurm_job_id": None,
                                "slurm_restart_count": "0", "started": "2026-12-07T10:00:00+00:00", "token": "other",
                                **record}))
    return path


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_a_second_fit_in_a_folder_a_live_fit_holds_is_refused_and_writes_nothing(workdir, monkeypatch, tmp_path):
    """Before, the second fit trained in the same folder, overwriting the first's config.yaml and checkpoints."""
    folder = tmp_path / "stage"
    _lock(folder)  # a fit of this host's live process (our parent) holds the folder
    (folder / "config.yaml").write_text("the other fit's\n")
    with pytest.raises(FolderInUseError, match=rf"in use by another fit \(pid {os.getppid()} on host .*"
                                               r"trainer\.logger\.init_args\.version"):
        _fit(workdir, monkeypatch, _config(tmp_path))
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", LOCK_NAME]
    assert (folder / "config.yaml").read_text() == "the other fit's\n"
    assert json.loads((folder / LOCK_NAME).read_text())["token"] == "other"


class SeesLock(Callback):
    """Records the lock file of the fit's folder at the training's start (class path ``test_run_lock.SeesLock``)."""

    held: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        path = Path(trainer.log_dir) / LOCK_NAME
        SeesLock.held = json.loads(path.read_text()) if path.is_file() else None


def test_a_dead_fit_s_lock_is_taken_over_held_during_the_fit_and_released_after(workdir, monkeypatch, tmp_path):
    """A lock whose pid is gone (a fit killed with SIGKILL on this host) does not stop the rerun that resumes it."""
    folder = tmp_path / "stage"
    _lock(folder, pid=_dead_pid())
    with pytest.warns(UserWarning, match="taking over the lock of a fit that is gone"):
        _fit(workdir, monkeypatch, _config(tmp_path), '--trainer.callbacks+={"class_path": "test_run_lock.SeesLock"}')
    assert SeesLock.held is not None and SeesLock.held["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    again = _fit(workdir, monkeypatch, _config(tmp_path), "--trainer.max_steps=3")  # the rerun resumes
    assert again.trainer.global_step == 3 and not (folder / LOCK_NAME).exists()


def test_a_refused_resume_leaves_no_lock_nor_folder_behind(workdir, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError):
        _fit(workdir, monkeypatch, _config(tmp_path), f"--ckpt_path={tmp_path / 'missing.ckpt'}")
    assert not (tmp_path / "stage").exists()


def test_a_requeued_slurm_job_takes_its_own_lock_over_from_another_host(tmp_path, monkeypatch):
    """SLURM requeues a preempted job under its job id, often on another node: its old lock is its own."""
    path = _lock(tmp_path, host="node-that-died", pid=1, slurm_job_id="77", slurm_restart_count="0")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.warns(UserWarning, match="SLURM job 77 was requeued"):
        lock = RunLock([tmp_path]).acquire()
    assert json.loads(path.read_text())["slurm_restart_count"] == "1"
    lock.release()
    assert not path.exists()


def test_another_host_s_lock_is_refused_while_its_heartbeat_is_fresh_and_taken_over_once_stale(tmp_path,
                                                                                              monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = _lock(tmp_path, host="other-node", pid=1, slurm_job_id="12")
    with pytest.raises(FolderInUseError, match="pid 1 on host other-node, SLURM job 12"):
        RunLock([tmp_path]).acquire()
    old = time.time() - run_lock.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    with pytest.warns(UserWarning, match="heartbeat is .* s old"):
        lock = RunLock([tmp_path]).acquire()
    assert json.loads(path.read_text())["token"] == lock.record["token"]
    lock.release()


def test_the_holder_s_heartbeat_keeps_its_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock([tmp_path]).acquire()
    path = tmp_path / LOCK_NAME
    old = time.time() - 1000
    os.utime(path, (old, old))
    deadline = time.monotonic() + 10
    while path.stat().st_mtime <= old + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > old + 1
    lock.release()
    assert not path.exists()


def _empty_stale_lock(folder: Path) -> Path:
    """A lock a fit was killed while writing (empty), older than a heartbeat."""
    path = folder / LOCK_NAME
    path.write_text("")
    old = time.time() - run_lock.HEARTBEAT_S - 5
    os.utime(path, (old, old))
    return path


@pytest.mark.parametrize("stale", ["dead pid", "empty"])
def test_fits_that_judge_one_stale_lock_at_once_leave_the_folder_to_one(tmp_path, monkeypatch, stale):
    """Two fits judge a dead fit's lock stale before either writes (a requeue and a manual restart); the first takes
    it over, then the second acts while a third fit starts. Before, the second moved the first's live lock aside to
    look at it, the third took the empty place, and the second put the first's lock back over the third's
    (``os.replace``): the first and the third both held the folder."""
    path = _lock(tmp_path, pid=_dead_pid()) if stale == "dead pid" else _empty_stale_lock(tmp_path)
    first, second, third = RunLock([tmp_path]), RunLock([tmp_path]), RunLock([tmp_path])
    judge, read = run_lock.stale_reason, run_lock.read_record
    refused, seen = [], {"judged": False, "third": False}

    def stale_reason(found, where):
        why = judge(found, where)
        if why and not seen["judged"]:  # the second has judged the lock stale: the first takes it over now
            seen["judged"] = True
            first.acquire()
        return why

    def read_record(where):
        if first._held and not seen["third"]:  # the second acts on its judgement: a third fit starts meanwhile
            seen["third"] = True
            with pytest.raises(FolderInUseError, match=f"pid {os.getpid()}"):
                third.acquire()
            refused.append(third)
        return read(where)

    monkeypatch.setattr(run_lock, "stale_reason", stale_reason)
    monkeypatch.setattr(run_lock, "read_record", read_record)
    try:
        with pytest.warns(UserWarning, match="taking over the lock") as said, \
                pytest.raises(FolderInUseError, match=f"in use by another fit \\(pid {os.getpid()}"):
            second.acquire()
        assert [lock for lock in (first, second, third) if lock._held] == [first] and refused == [third]
        assert read(path)["token"] == first.record["token"]
        assert len([w for w in said if "taking over" in str(w.message)]) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # no claim nor temp file left
    finally:
        for lock in (first, second, third):
            lock.release()


def test_a_fit_taking_a_stale_lock_over_refuses_the_others_until_done_and_a_dead_taker_s_claim_is_cleared(
        tmp_path, monkeypatch):
    path = _lock(tmp_path, pid=_dead_pid())
    claim = tmp_path / f"{LOCK_NAME}.takeover-other"
    claim.write_text(json.dumps({"host": "node9", "pid": 5, "started": "now", "token": "taker"}))
    with pytest.raises(FolderInUseError, match="pid 5 on host node9"):
        RunLock([tmp_path]).acquire()
    old = time.time() - run_lock.HEARTBEAT_S - 5
    os.utime(claim, (old, old))  # its taker was killed within the takeover
    with pytest.warns(UserWarning, match="taking over the lock"):
        lock = RunLock([tmp_path]).acquire()
    assert json.loads(path.read_text())["token"] == lock.record["token"] and not claim.exists()
    lock.release()



def test_validate_in_a_folder_a_live_fit_holds_scores_its_newest_checkpoint_and_leaves_the_fit_s_files(
        workdir, monkeypatch, tmp_path):
    """Scoring a checkpoint mid-training is allowed: validate takes no lock and writes only in the folder's validate/
    (its event file, hparams.yaml, validate.yaml); the fit's checkpoints, config.yaml, hparams.yaml, event files and
    lock stay as they were."""
    folder = tmp_path / "stage"
    _fit(workdir, monkeypatch, _config(tmp_path))
    lock = _lock(folder)  # another fit of this host's live process (our parent) now holds the folder
    fits = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    monkeypatch.chdir(workdir)
    cli = main(["validate", "--config", str(_config(tmp_path)), *QUIET, "--trainer.limit_val_batches=1"])
    assert cli.trainer.logged_metrics["val/loss"] > 0
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and "validate" not in p.parts} == fits
    assert json.loads(lock.read_text())["token"] == "other"
    assert {p.name for p in (folder / "validate" / "version_0").iterdir()} >= {"hparams.yaml", "validate.yaml"}


def test_a_refusal_in_one_folder_releases_the_locks_taken_in_the_others(tmp_path):
    """A fit (or validate's claim) refused in its second folder holds none: its first folder's lock is gone, so a
    later fit there is not refused by a lock nobody holds."""
    first, second = tmp_path / "a", tmp_path / "b"
    _lock(second)  # a live fit's (this test's parent process)
    with pytest.raises(FolderInUseError, match=str(second)):
        RunLock([first, second]).acquire()
    assert not (first / LOCK_NAME).exists()
    assert RunLock([first, second]).claim() is False
    assert not (first / LOCK_NAME).exists()


def test_a_holder_judged_stale_leaves_the_lock_of_the_fit_that_took_it_over(tmp_path):
    """A fit whose lock another fit took over (its heartbeat stalled) deletes only its own lock at the end."""
    lock = RunLock([tmp_path]).acquire()
    path = _lock(tmp_path, token="taker")
    lock.release()
    assert json.loads(path.read_text())["token"] == "taker"


def test_an_empty_lock_of_a_fit_still_writing_it_is_refused_not_taken_over(tmp_path):
    """An empty lock younger than a heartbeat is a fit's that is writing it: refused (an older one is a fit killed
    while writing it, taken over: test_fits_that_judge_one_stale_lock_at_once_leave_the_folder_to_one)."""
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(FolderInUseError, match="a fit whose lock is being written"):
        RunLock([tmp_path]).acquire()


def test_a_lock_of_another_user_s_live_process_is_refused(tmp_path, monkeypatch):
    """``os.kill(pid, 0)`` of another user's process raises PermissionError: it is alive, its lock is held."""
    _lock(tmp_path, pid=4242)

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(run_lock.os, "kill", kill)
    with pytest.raises(FolderInUseError, match="pid 4242"):
        RunLock([tmp_path]).acquire()

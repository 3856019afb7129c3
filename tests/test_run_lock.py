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

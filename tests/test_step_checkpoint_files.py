"""The file rules of ``mardini/lit/step_checkpoint.py`` on folders alone: no fit runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from fsspec.implementations.local import LocalFileSystem

from mardini.lit.run_lock import RunLock
from mardini.lit.step_checkpoint import (drop_superseded_preemption_checkpoints, drop_untrained_logs, log_folders,
                                         set_aside_finished_validates, validate_lock)


def test_a_dead_validate_s_run_is_set_aside_as_finished_and_a_live_one_stays(tmp_path):
    """validate/version_0's lock is a dead validate's (its pid gone): its run moves with the finished ones and its lock
    is deleted (before, it moved with them and stayed for ever); version_1's validate is alive and stays with its
    lock."""
    folder, dest = tmp_path / "validate", tmp_path / "earlier.1" / "validate"
    for run in ("version_0", "version_1"):
        (folder / run).mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    validate_lock(folder / "version_0").write_text(json.dumps({"host": socket.gethostname(),
                                                                "pid": int(dead.stdout), "token": "dead"}))
    live = RunLock([folder], validate_lock(folder / "version_1").name).acquire()
    try:
        assert set_aside_finished_validates(LocalFileSystem(), str(folder), str(dest)) == ["version_1"]
        assert sorted(os.listdir(dest)) == ["version_0"]
        assert sorted(os.listdir(folder)) == ["version_1", "version_1.lock"]
    finally:
        live.release()


def test_a_checkpoint_of_a_step_supersedes_the_preemption_checkpoints_up_to_that_step(tmp_path):
    for n, step in ((1, 3), (2, 4), (3, 5)):
        torch.save({"global_step": step}, tmp_path / f"hpc_ckpt_{n}.ckpt")
    assert drop_superseded_preemption_checkpoints(tmp_path, 4) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    assert sorted(os.listdir(tmp_path)) == ["hpc_ckpt_3.ckpt"]


class _Logger:
    def __init__(self, log_dir) -> None:
        self.log_dir = str(log_dir)


def test_a_fit_failing_before_training_drops_only_what_it_added_and_the_folders_it_made(tmp_path):
    """The earlier run's records stay; the new run's hparams.yaml and event file go; a folder the fit made (and its
    parents it made) goes where left empty, never one that was there."""
    kept, parent = tmp_path / "kept", tmp_path / "parent"
    new = parent / "made" / "deeper"
    kept.mkdir()
    parent.mkdir()  # there before the fit, empty
    (kept / "hparams.yaml").write_text("earlier: 1\n")
    folders = log_folders(type("Trainer", (), {"loggers": [_Logger(kept), _Logger(new)]})())
    (kept / "events.out.tfevents.1.host").write_bytes(b"")
    new.mkdir(parents=True)
    (new / "hparams.yaml").write_text("new: 1\n")
    drop_untrained_logs(folders)
    assert sorted(os.listdir(kept)) == ["hparams.yaml"] and sorted(os.listdir(tmp_path)) == ["kept", "parent"]
    assert os.listdir(parent) == []

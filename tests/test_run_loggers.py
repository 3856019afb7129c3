"""The loggers ``train.py`` builds (``mardini/cli_loggers.py``), on folders alone: no fit runs."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from mardini.cli_loggers import drop_empty_validation_runs, fit_logger, new_validation_run
from mardini.lit.resumed_logs import ContinuedCSVLogger


def test_a_finished_validate_s_folder_is_passed_over_and_its_name_s_lock_released(tmp_path):
    """validate/version_0 without a lock is a finished run's: the new one is version_1, and the lock it took on
    version_0 before finding the folder is not left behind (it would mark a finished run as running)."""
    folder = tmp_path / "validate"
    (folder / "version_0").mkdir(parents=True)
    run, lock = new_validation_run(str(folder))
    try:
        assert run == "version_1" and sorted(os.listdir(folder)) == ["version_0", "version_1", "version_1.lock"]
    finally:
        lock.release()


def test_a_validate_folder_removed_while_a_run_is_claimed_is_made_again(tmp_path, monkeypatch):
    """A new fit sets the finished validates aside (removing validate/) between the lock and the run's folder: the
    validate makes validate/ again and claims its run there."""
    folder, mkdir = tmp_path / "validate", os.mkdir
    removed = []

    def removed_first(path, *args, **kwargs):
        if str(path).endswith("version_0") and not removed:
            shutil.rmtree(folder)
            removed.append(path)
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", removed_first)
    run, lock = new_validation_run(str(folder))
    try:
        assert removed and run == "version_0" and (folder / "version_0").is_dir() and lock.paths[0].is_file()
    finally:
        lock.release()


def test_a_validate_folder_that_keeps_vanishing_ends_the_claim_with_a_message(tmp_path, monkeypatch):
    """Something deleting validate/ at every try: the claim gives up after CLAIM_TRIES with a message (it looped for
    ever) and leaves no lock behind."""
    import pytest

    from mardini import cli_loggers

    folder, mkdir, tries = tmp_path / "validate", os.mkdir, []

    def always_removed(path, *args, **kwargs):
        if str(path).endswith("version_0"):
            tries.append(path)
            shutil.rmtree(folder)
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", always_removed)
    monkeypatch.setattr(cli_loggers, "CLAIM_TRIES", 3)
    with pytest.raises(RuntimeError, match=r"vanished 3 times while this validate claimed a run folder in it"):
        new_validation_run(str(folder))
    assert len(tries) == 3 and not list(folder.glob("*.lock"))


def test_only_empty_run_folders_are_dropped_and_validate_with_them_when_it_is_left_empty(tmp_path):
    empty, written, other = (tmp_path / "a" / "validate" / "version_0", tmp_path / "b" / "validate" / "version_0",
                             tmp_path / "c" / "validate" / "version_1")
    for folder in (empty, written, other, other.parent / "version_0"):
        folder.mkdir(parents=True)
    (written / "validate.yaml").write_text("a: 1\n")
    drop_empty_validation_runs([SimpleNamespace(log_dir=str(f)) for f in (empty, written, other)])
    assert not empty.parent.exists() and (written / "validate.yaml").is_file()
    assert not other.exists() and sorted(os.listdir(other.parent)) == ["version_0"]


def _entry(**init_args) -> Namespace:
    return Namespace(class_path="x", init_args=Namespace(**init_args))


def test_a_fit_continues_a_csv_log_and_purges_tensorboard_s_steps_from_the_resumed_one(tmp_path):
    args = {"save_dir": str(tmp_path), "name": "stage", "version": ""}
    csv = fit_logger(CSVLogger(**args), _entry(**args))
    assert type(csv) is ContinuedCSVLogger and csv.log_dir == CSVLogger(**args).log_dir
    resumed = fit_logger(TensorBoardLogger(**args), _entry(**args), step=7)
    assert resumed._kwargs.get("purge_step") == 7 and resumed.log_dir == TensorBoardLogger(**args).log_dir
    fresh = TensorBoardLogger(**args)
    assert fit_logger(fresh, _entry(**args), step=None) is fresh

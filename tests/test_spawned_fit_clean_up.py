"""The clean-up of a failed ``ddp_spawn`` fit where its rank 0 was stopped before running it: another rank failed
first, and torch's spawn launcher SIGTERMs, then 30 s later SIGKILLs, the other workers. Rank 0 records the state its
clean-up needs as the fit goes (``mardini.lit.clean_up_record``); the main process cleans up from that record where
rank 0 did not mark it done (``mardini.cli_failed_fit.clean_up_after_workers``). The decision is tested here in one
process; ``tests/test_training.py`` runs it on two spawned workers (slow: rank 1 fails while rank 0 hangs)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from jsonargparse import ArgumentParser, Namespace

from mardini.cli_failed_fit import SpawnedFit, clean_up_after_workers
from mardini.cli_saved_config import KeepEarlierConfig, keep_earlier_config
from mardini.lit.clean_up_record import CleanUpRecord, keep_in, note
from mardini.lit.step_checkpoint import FitStarted, StepCheckpoint, earlier_logs, log_folders


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _callbacks(run: Path) -> list:
    """The clean-up's callbacks of a new run (``--ckpt_path null``) in the stage folder ``run``, as train.py makes
    them (before the fit: in the main process, and as each spawned worker unpickles them)."""
    return [KeepEarlierConfig(ArgumentParser(), Namespace()), FitStarted(),
            StepCheckpoint(dirpath=str(run / "checkpoints"), resume=None, logs=earlier_logs(str(run)))]


def _trainer(callbacks: list, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=rank == 0, callbacks=callbacks, log_dir=None,
                           strategy=SimpleNamespace(barrier=lambda name=None: None))


@pytest.fixture()
def run(tmp_path) -> Path:
    """A stage folder holding an earlier run: its checkpoint, event file, hparams.yaml and config.yaml."""
    run = tmp_path / "stage"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"earlier weights")
    (run / "events.out.tfevents.1.host.1.0").write_bytes(b"earlier events")
    (run / "hparams.yaml").write_text("lr: 1\n")
    (run / "config.yaml").write_text("lr: 1\n")
    return run


def _rank_zero_trains(run: Path, record: CleanUpRecord) -> list:
    """What rank 0 of the new run does before another rank fails and it is killed: rotate config.yaml (other
    settings), start training (the earlier run set aside), write its own records; each step recorded, no clean-up.
    Its callbacks."""
    callbacks = _callbacks(run)
    trainer = _trainer(callbacks)
    saved, started, checkpoint = callbacks
    keep_in(record)
    try:
        path = run / "config.yaml"
        saved._before = (path, path.read_bytes())  # KeepEarlierConfig.setup
        saved._kept = keep_earlier_config(path, "lr: 2\n")
        path.write_text("lr: 2\n")
        note(trainer)
        started.on_train_start(trainer, None)
        saved.on_train_start(trainer, None)
        checkpoint.on_train_start(trainer, None)  # the earlier run to checkpoints/earlier.1/
        (run / "events.out.tfevents.2.host.2.0").write_bytes(b"new events")
        (run / "hparams.yaml").write_text("lr: 2\n")
    finally:
        keep_in(None)
    return callbacks


def test_the_main_process_puts_back_the_earlier_run_rank_0_set_aside_when_it_was_killed_before_its_clean_up(run):
    """Rank 0 set the earlier run aside and was killed (its pending collective outlived the launcher's 30 s) before
    its clean-up: the main process puts the stage folder back as the fit found it, byte for byte. Before, the
    earlier run stayed in checkpoints/earlier.1/ with config.yaml rotated to config.1.yaml, and --ckpt_path last
    trained from scratch."""
    before = _files(run)
    folders = log_folders(SimpleNamespace(loggers=[SimpleNamespace(log_dir=str(run))]))
    record = CleanUpRecord(run.parent / "record")
    record.folder.mkdir()
    _rank_zero_trains(run, record)
    assert (run / "checkpoints" / "earlier.1" / "last.ckpt").is_file() and (run / "config.1.yaml").is_file()
    main = _trainer(_callbacks(run))  # the main process's callbacks never ran
    assert clean_up_after_workers(record, main, folders, RuntimeError("rank 1 failed"), workers=[])
    assert _files(run) == before
    assert sorted(p.name for p in run.rglob("*") if p.is_dir()) == ["checkpoints"]


def test_the_main_process_leaves_the_clean_up_to_rank_0_where_it_ran_or_still_runs(run):
    """Rank 0 marked its clean-up done (it ran, the folder is its business), or a worker is still alive (a Ctrl-C
    whose clean-up outlasts the wait): the main process touches nothing."""
    folders = log_folders(SimpleNamespace(loggers=[SimpleNamespace(log_dir=str(run))]))
    record = CleanUpRecord(run.parent / "record")
    record.folder.mkdir()
    _rank_zero_trains(run, record)
    after = _files(run)
    alive = SimpleNamespace(is_alive=lambda: True)
    assert not clean_up_after_workers(record, _trainer(_callbacks(run)), folders, RuntimeError(), workers=[alive])
    record.mark_done()
    assert not clean_up_after_workers(record, _trainer(_callbacks(run)), folders, RuntimeError(), workers=[])
    assert _files(run) == after


def test_without_a_record_the_main_process_drops_the_untrained_run_s_event_file(run):
    """Rank 0 recorded nothing (killed before its training started): the main process deletes what the new run added
    to the log folder, as rank 0's clean-up of a fit that failed before training does; the earlier run stays."""
    before = _files(run)
    folders = log_folders(SimpleNamespace(loggers=[SimpleNamespace(log_dir=str(run))]))
    (run / "events.out.tfevents.2.host.2.0").write_bytes(b"")  # the new run's logger, at its setup
    record = CleanUpRecord(run.parent / "record")
    record.folder.mkdir()
    assert clean_up_after_workers(record, _trainer(_callbacks(run)), folders, RuntimeError(), workers=[])
    assert _files(run) == before


def test_only_rank_0_of_a_spawned_fit_records(run, tmp_path):
    """``note`` records on rank 0 after ``keep_in`` (a spawned worker's ``SpawnedFit``), not on another rank, nor in
    a process that keeps no record (one that trains in the main process)."""
    record = CleanUpRecord(tmp_path / "record")
    record.folder.mkdir()
    callbacks = _callbacks(run)
    callbacks[1].started = True
    note(_trainer(callbacks))
    keep_in(record)
    try:
        note(_trainer(callbacks, rank=1))
        assert not (record.folder / "state.pkl").exists()
        note(_trainer(callbacks))
    finally:
        keep_in(None)
    assert [cb.started for cb in record.restored(_callbacks(run)) if isinstance(cb, FitStarted)] == [True]


class _Killed(BaseException):
    """SIGKILL, where rank 0's clean-up stands when torch's spawn launcher kills it (nothing after it runs)."""


@pytest.mark.parametrize("killed", ["at the first move back", "at the second", "at the third", "before config.yaml",
                                    "before marking it done"])
def test_the_main_process_finishes_a_clean_up_rank_0_was_killed_in(run, monkeypatch, killed):
    """Rank 0 set the earlier run aside, failed, and was killed in the middle of its clean-up (moving the earlier
    run's three files back from checkpoints/earlier.1/, before putting config.yaml back, or before marking its
    clean-up done): the record is not marked done, and the main process does the clean-up again from it, which puts
    back what is left: the stage folder as the fit found it, byte for byte. Before, where the earlier run was back
    already the main process failed on the missing checkpoints/earlier.1 (FileNotFoundError, in place of the fit's
    error) and left config.yaml rotated to config.1.yaml."""
    before = _files(run)
    folders = log_folders(SimpleNamespace(loggers=[SimpleNamespace(log_dir=str(run))]))
    record = CleanUpRecord(run.parent / "record")
    record.folder.mkdir()
    callbacks = _rank_zero_trains(run, record)
    saved, _, checkpoint = callbacks
    fs, moves = checkpoint._fs, []
    mv = fs.mv

    def moved(*args, **kwargs):
        if len(moves) == ["at the first move back", "at the second", "at the third"].index(killed):
            raise _Killed
        moves.append(args)
        return mv(*args, **kwargs)

    if killed.startswith("at"):
        monkeypatch.setattr(fs, "mv", moved)
    elif killed == "before config.yaml":
        monkeypatch.setattr(saved, "put_back", lambda: (_ for _ in ()).throw(_Killed()))
    else:
        monkeypatch.setattr(record, "mark_done", lambda: (_ for _ in ()).throw(_Killed()))
    trainer = _trainer(callbacks)
    monkeypatch.setattr("lightning.pytorch.trainer.Trainer._fit_impl", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("rank 1 failed")))
    monkeypatch.setattr("lightning.pytorch.trainer.call._interrupt", lambda *a: None)
    trainer._teardown = lambda: None
    with pytest.raises(_Killed):
        SpawnedFit(trainer, folders, record)()  # rank 0: the fit fails, its clean-up is killed part way
    monkeypatch.undo()
    assert not record.done()
    assert clean_up_after_workers(record, _trainer(_callbacks(run)), folders, RuntimeError("rank 1 failed"), workers=[])
    assert _files(run) == before
    assert sorted(p.name for p in run.rglob("*") if p.is_dir()) == ["checkpoints"]

"""``train.py validate`` beside a running fit of the same folder, and beside another validate: the fit deletes its
older step and preemption checkpoints as it saves newer ones, which a validate may have just found or been given;
each validate logs in a folder of its own."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
import yaml
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from mardini import cli, cli_resume
from mardini.cli import main, resume_checkpoint
from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.lit import run_lock
from mardini.lit.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from mardini.lit.run_lock import RunLock, held
from mardini.lit.scored_checkpoint import agree_on_pinned, read_identity
from mardini.cli_loggers import new_validation_run
from mardini.lit.step_checkpoint import earlier_logs, put_back_earlier_run, set_aside_earlier_run, validate_lock
from test_run_lock import QUIET, _config

ONE_BATCH = "--trainer.limit_val_batches=1"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("beside")
    tiny_synthetic(root / "data" / "shards" / "synthetic", train=8, val=4, frames=8, size=32)
    return root


@pytest.fixture(scope="module")
def trained(workdir, tmp_path_factory) -> Path:
    """A 2-step fit's stage folder, saved at every step: ``checkpoints/`` holds step00000002.ckpt and last.ckpt."""
    tmp = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        main(["fit", "--config", str(_config(tmp)), *QUIET, "--checkpoint_every=1"])
    return tmp / "stage"


def _stage(trained: Path, workdir: Path, tmp: Path, monkeypatch) -> tuple[Path, Path]:
    """A copy of the trained stage in ``tmp`` (its checkpoint folder, its config), the cwd the data's."""
    shutil.copytree(trained, tmp / "stage")
    monkeypatch.chdir(workdir)
    return tmp / "stage" / "checkpoints", _config(tmp)


def _next_save(folder: Path, deleted: Path) -> Path:
    """What the fit does at its next save: a newer step checkpoint, and the one it supersedes deleted."""
    newer = folder / "step00000003.ckpt"
    shutil.copy(deleted, newer)
    deleted.unlink()
    return newer


def test_validate_finds_the_newest_again_when_the_fit_deleted_the_one_it_found(trained, workdir, tmp_path, monkeypatch):
    """``--ckpt_path last`` found step00000002.ckpt (the newest: a kill before last.ckpt), and the fit saved step 3
    and deleted it before validate read it: validate finds the newest again and scores it. Before: ``checkpoint
    .../step00000002.ckpt does not exist; check the path (or the stage that writes it)``."""
    folder, config = _stage(trained, workdir, tmp_path, monkeypatch)
    (folder / "last.ckpt").unlink()
    found, newer = [], []

    def resolved_then_deleted(sub):
        found.append(original(sub))
        if len(found) == 1:
            newer.append(_next_save(folder, Path(found[0])))
        return found[-1]

    original = cli.scored_checkpoint  # MarDiniCLI's (mardini.cli imports it from mardini.cli_resume)
    monkeypatch.setattr(cli, "scored_checkpoint", resolved_then_deleted)
    run = main(["validate", "--config", str(config), *QUIET, ONE_BATCH])
    assert found == [str(folder / "step00000002.ckpt"), str(newer[0])]
    assert run.trainer.ckpt_path == str(newer[0]) and run.trainer.logged_metrics["val/loss"] > 0


def test_validate_scores_the_checkpoint_it_read_though_the_fit_deletes_it_before_lightning_restores(
        trained, workdir, tmp_path, monkeypatch):
    """The step checkpoint named by ``--ckpt_path`` is deleted during the data's setup, before Lightning's restore:
    validate scores it as it read it when it started. Before, Lightning read the file then: ``does not exist``."""
    folder, config = _stage(trained, workdir, tmp_path, monkeypatch)
    scored = folder / "step00000002.ckpt"
    setup = VideoDataModule.setup

    def setup_while_the_fit_saves(self, stage):
        if scored.exists():
            _next_save(folder, scored)
        return setup(self, stage)

    monkeypatch.setattr(VideoDataModule, "setup", setup_while_the_fit_saves)
    run = main(["validate", "--config", str(config), *QUIET, ONE_BATCH, f"--ckpt_path={scored}"])
    assert not scored.exists() and run.trainer.ckpt_path == str(scored)
    assert run.trainer.logged_metrics["val/loss"] > 0


def test_a_step_checkpoint_named_by_ckpt_path_and_gone_says_the_fit_deletes_them_and_the_way_on(
        workdir, tmp_path, monkeypatch):
    """Before, only ``does not exist; check the path``, though the path was right when the command was typed."""
    monkeypatch.chdir(workdir)
    gone = tmp_path / "stage" / "checkpoints" / "step00000100.ckpt"
    with pytest.raises(FileNotFoundError, match=r"does not exist; .*a fit in .*checkpoints deletes its step and "
                                                r"preemption checkpoints .* copy the checkpoint elsewhere"):
        main(["validate", "--config", str(_config(tmp_path)), *QUIET, ONE_BATCH, f"--ckpt_path={gone}"])
    assert not (tmp_path / "stage" / "validate").exists()  # the failed validate's empty folder is removed


def test_a_validate_whose_trainer_settings_lightning_refuses_leaves_no_empty_run_folder(workdir, tmp_path, monkeypatch):
    """The logger makes ``validate/version_N`` as it is built, before the Trainer; a Trainer that refuses its
    settings (``max_epochs -3``) left it empty, and the next validate logged in ``version_1``."""
    monkeypatch.chdir(workdir)
    args = ["validate", "--config", str(_config(tmp_path)), *QUIET, ONE_BATCH, "--ckpt_path=null"]
    with pytest.raises(MisconfigurationException, match="max_epochs"):
        main([*args, "--trainer.max_epochs=-3"])
    assert not (tmp_path / "stage" / "validate").exists()


def test_the_newest_checkpoint_is_found_among_those_left_when_one_goes_while_they_are_read(tmp_path, monkeypatch):
    """A fit deletes step00000002.ckpt as validate reads the steps of the folder's checkpoints: it is passed over.
    Before: ``checkpoint .../step00000002.ckpt does not exist``."""
    for name, step in (("last.ckpt", 1), ("step00000002.ckpt", 2)):
        torch.save({"global_step": step}, tmp_path / name)
    read = cli_resume._saved_step

    def deleted_as_read(path):
        if path.name.startswith("step"):
            path.unlink()
        return read(path)

    monkeypatch.setattr(cli_resume, "_saved_step", deleted_as_read)
    assert resume_checkpoint(str(tmp_path)) == str(tmp_path / "last.ckpt")


def test_two_validates_at_once_each_log_in_a_folder_of_their_own(trained, workdir, tmp_path, monkeypatch):
    """A second validate of the folder runs while the first sets its data up: each has its validate/version_N with
    its own validate.yaml and hparams.yaml. Before, both logged in validate/: the first's validate.yaml beside the
    second's hparams.yaml, and both runs' val/loss at step 0 of one TensorBoard run."""
    _, config = _stage(trained, workdir, tmp_path, monkeypatch)
    setup, second = VideoDataModule.setup, []

    def setup_beside_another(self, stage):
        if not second:  # the first validate's: the second's own setup runs as it was
            second.append(None)
            second[0] = main(["validate", "--config", str(config), *QUIET, ONE_BATCH, "--model.init_args.lr=0.5"])
        return setup(self, stage)

    monkeypatch.setattr(VideoDataModule, "setup", setup_beside_another)
    first = main(["validate", "--config", str(config), *QUIET, ONE_BATCH, "--model.init_args.lr=0.25"])
    runs = {run.trainer.log_dir: lr for run, lr in ((first, 0.25), (second[0], 0.5))}
    assert sorted(runs) == [str(tmp_path / "stage" / "validate" / f"version_{n}") for n in (0, 1)]
    for folder, lr in runs.items():
        said = yaml.safe_load((Path(folder) / "validate.yaml").read_text())["model"]["init_args"]["lr"]
        assert (said, yaml.safe_load((Path(folder) / "hparams.yaml").read_text())["lr"]) == (lr, lr)
        assert len(list(Path(folder).glob("events.out.tfevents.*"))) == 1


def _validate_runs(log_dir: Path, *names: str) -> dict[str, bytes]:
    """Finished validate runs in ``log_dir/validate`` (their files, by path), as earlier validates left them."""
    for name in names:
        (log_dir / "validate" / name).mkdir(parents=True)
        (log_dir / "validate" / name / "hparams.yaml").write_text(f"run: {name}\n")
    return _files(log_dir / "validate")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_new_run_sets_aside_the_finished_validates_and_leaves_the_one_still_writing(tmp_path):
    """A new run (--ckpt_path null) moves the earlier run's validate runs to checkpoints/earlier.1/validate/, but the
    one whose validate still holds its lock stays, lock and all. Before, validate/ moved whole, and the validate
    writing there ended with ``FileNotFoundError: ... validate/version_1/metrics.csv`` (its score recorded nowhere)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    runs = _validate_runs(tmp_path, "version_0", "version_1", "version_2")
    lock = RunLock([tmp_path / "validate"], validate_lock(tmp_path / "validate" / "version_1").name).acquire()
    try:
        aside = set_aside_earlier_run(LocalFileSystem(), str(folder), earlier_logs(str(tmp_path)))
        assert _files(Path(aside) / "validate") == {k: v for k, v in runs.items() if "version_1" not in k}
        kept = _files(tmp_path / "validate")
        assert kept == {"version_1/hparams.yaml": runs["version_1/hparams.yaml"],
                        "version_1.lock": kept["version_1.lock"]}
    finally:
        lock.release()


def test_a_new_run_that_fails_puts_the_earlier_validates_back_beside_those_started_meanwhile(tmp_path):
    """A validate started during a new run that then fails before saving: the earlier run's validate runs come back
    beside it (one of a name taken renamed to the first free version_N). Before, the validate/ there was deleted."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    runs = _validate_runs(tmp_path, "version_0", "version_1")
    logs, fs = earlier_logs(str(tmp_path)), LocalFileSystem()
    aside = set_aside_earlier_run(fs, str(folder), logs)
    assert not (tmp_path / "validate").exists()  # none running: no empty validate/ left in the new run's folder
    meanwhile = _validate_runs(tmp_path, "version_0")  # the validate started while the new run trained
    put_back_earlier_run(fs, aside, str(folder), logs)
    assert _files(tmp_path / "validate") == {"version_0/hparams.yaml": meanwhile["version_0/hparams.yaml"],
                                             "version_1/hparams.yaml": runs["version_1/hparams.yaml"],
                                             "version_2/hparams.yaml": runs["version_0/hparams.yaml"]}


def test_a_validate_holds_the_lock_beside_its_folder_while_it_runs(trained, workdir, tmp_path, monkeypatch):
    """validate/version_0.lock is held from the start of the validate to its end (a new run leaves the folder where
    it is meanwhile), and gone after."""
    _, config = _stage(trained, workdir, tmp_path, monkeypatch)
    lock, seen = tmp_path / "stage" / "validate" / "version_0.lock", []
    setup = VideoDataModule.setup

    def setup_seeing_the_lock(self, stage):
        seen.append(held(lock))
        return setup(self, stage)

    monkeypatch.setattr(VideoDataModule, "setup", setup_seeing_the_lock)
    main(["validate", "--config", str(config), *QUIET, ONE_BATCH])
    assert seen == [True] and not lock.exists()


def test_validate_yaml_names_the_checkpoint_file_it_scored_and_its_step(trained, workdir, tmp_path, monkeypatch):
    """``validate.yaml`` keeps ``ckpt_path: last`` (what was asked for) and its header names the file that resolved
    to and its global step; a ``--ckpt_path`` given relative to the working folder is named absolute. Before, the
    validate run's folder said ``ckpt_path: last`` only, not which checkpoint it scored."""
    folder, config = _stage(trained, workdir, tmp_path, monkeypatch)
    (folder / "last.ckpt").unlink()  # the stage's newest: step00000002.ckpt
    found = main(["validate", "--config", str(config), *QUIET, ONE_BATCH])
    text = (Path(found.trainer.log_dir) / "validate.yaml").read_text()
    assert yaml.safe_load(text)["ckpt_path"] == "last"
    assert f"\n# scored: {folder / 'step00000002.ckpt'} (global step 2), the checkpoint file" in text
    relative = os.path.relpath(folder / "step00000002.ckpt", workdir)  # the working folder: workdir (_stage)
    named = main(["validate", "--config", str(config), *QUIET, ONE_BATCH, f"--ckpt_path={relative}"])
    text = (Path(named.trainer.log_dir) / "validate.yaml").read_text()
    assert f"\n# scored: {folder / 'step00000002.ckpt'} (global step 2), the checkpoint file" in text


def test_a_new_run_set_aside_between_the_validate_s_folder_and_its_start_leaves_the_validate_s_folder(
        trained, workdir, tmp_path, monkeypatch):
    """A new fit of the folder sets the earlier run aside after the validate made its validate/version_0 (as its
    logger is built) and before it starts validating: the folder stays, held. Before, it was created unlocked and the
    lock taken only in ``MarDiniCLI.validate``: the fit saw a finished run and moved the empty folder to
    ``earlier.1/validate/version_0``, and the validate logged in a new one."""
    folder, config = _stage(trained, workdir, tmp_path, monkeypatch)
    stage, validate = folder.parent, cli.MarDiniCLI.validate

    def a_fit_sets_aside_first(self, model, **kwargs):
        set_aside_earlier_run(LocalFileSystem(), str(folder), earlier_logs(str(stage)))
        return validate(self, model, **kwargs)

    monkeypatch.setattr(cli.MarDiniCLI, "validate", a_fit_sets_aside_first)
    run = main(["validate", "--config", str(config), *QUIET, ONE_BATCH, "--ckpt_path=null"])  # its checkpoints aside
    assert run.trainer.log_dir == str(stage / "validate" / "version_0")
    assert (stage / "validate" / "version_0" / "validate.yaml").is_file()
    assert not (folder / "earlier.1" / "validate" / "version_0").exists()


def test_a_run_claimed_and_not_made_yet_stays_where_it_is_with_its_lock(tmp_path):
    """A new run looks at validate/ between a validate's lock and its folder (made next): the lock stays, so the
    folder made after it is the validate's. Before, running validates were found by their folders, and the live
    lock moved to ``earlier.1/validate/``."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    runs = _validate_runs(tmp_path, "version_0")
    lock = RunLock([tmp_path / "validate"], validate_lock(tmp_path / "validate" / "version_1").name).acquire()
    try:
        aside = set_aside_earlier_run(LocalFileSystem(), str(folder), earlier_logs(str(tmp_path)))
        assert _files(Path(aside) / "validate") == runs
        assert sorted(os.listdir(tmp_path / "validate")) == ["version_1.lock"] and held(lock.paths[0])
    finally:
        lock.release()


def test_a_dead_validate_s_lock_is_deleted_not_taken_over(tmp_path, monkeypatch):
    """validate/version_0.lock of a validate that died (no heartbeat for over ``STALE_AFTER_S``) and no folder: the
    next validate deletes that lock (stale by ``RunLock``'s rules) and claims version_0, making no takeover claim or
    temp file (``fit.lock.takeover-*``, ``fit.lock.*.tmp``) in validate/. Earlier, it took the lock over under
    ``fit.lock``-named files, which a new fit would move as a finished run's; then, the dead lock stayed for ever."""
    dead = _dead_lock(tmp_path / "validate", "version_0.lock")
    made: list[str] = []
    create = run_lock.create
    monkeypatch.setattr(run_lock, "create", lambda path, record: made.append(path.name) or create(path, record))
    name, lock = new_validation_run(str(tmp_path / "validate"))
    try:
        assert name == "version_0" and held(validate_lock(tmp_path / "validate" / name))
        assert made == ["version_0.lock"] and "dead" not in dead.read_text()
        assert sorted(os.listdir(tmp_path / "validate")) == ["version_0", "version_0.lock"]
    finally:
        lock.release()


def _dead_lock(folder: Path, name: str) -> Path:
    """A validate lock ``folder/name`` of a validate on another host whose heartbeat stopped over ``STALE_AFTER_S``
    ago (stale by ``RunLock``'s rules; no process spawned to find a dead pid)."""
    lock = folder / name
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": f"dead{name[8]}"}))
    old = lock.stat().st_mtime - run_lock.STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    return lock


def test_dead_validates_locks_are_deleted_and_live_ones_kept(tmp_path):
    """A new validate deletes the locks of validates that are gone (version_0: no folder; version_2: a killed run's
    folder, which stays as a finished run), never a live one's (version_1: this process's)."""
    folder = tmp_path / "validate"
    _dead_lock(folder, "version_0.lock"), _dead_lock(folder, "version_2.lock")
    (folder / "version_2").mkdir()
    live = RunLock([folder], "version_1.lock").acquire()
    try:
        name, lock = new_validation_run(str(folder))
        lock.release()
        assert name == "version_0"
        assert sorted(os.listdir(folder)) == ["version_0", "version_1.lock", "version_2"]
        assert held(folder / "version_1.lock")
    finally:
        live.release()


def test_a_new_run_deletes_dead_validates_locks_and_moves_only_their_runs(tmp_path):
    """A new run sets the finished runs aside and deletes a dead validate's lock instead of moving it to
    ``earlier.1/validate/`` (where it stayed for ever)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    runs = _validate_runs(tmp_path, "version_0")
    _dead_lock(tmp_path / "validate", "version_0.lock")
    aside = set_aside_earlier_run(LocalFileSystem(), str(folder), earlier_logs(str(tmp_path)))
    assert _files(Path(aside) / "validate") == runs and not (tmp_path / "validate").exists()


def test_a_lock_made_again_between_the_look_and_the_delete_is_kept(tmp_path, monkeypatch):
    """The dead lock is judged stale, then deleted by another validate, which claims the name anew: the lock now
    there is live and stays, token and all."""
    path = _dead_lock(tmp_path / "validate", "version_0.lock")
    judge = run_lock.stale_reason
    live = RunLock([path.parent], path.name)

    def judged_then_claimed(found, lock):
        why = judge(found, lock)
        path.unlink()  # another validate's delete and claim, between this look and this delete
        assert live.claim()
        return why

    monkeypatch.setattr(run_lock, "stale_reason", judged_then_claimed)
    try:
        assert run_lock.drop_stale(path) is None
        assert json.loads(path.read_text())["token"] == live.record["token"]
        assert sorted(os.listdir(path.parent)) == ["version_0.lock"]
    finally:
        live.release()


def test_no_empty_validate_folder_is_left_in_earlier_n_when_only_a_running_validate_was_there(tmp_path):
    """validate/ holds only a running validate's run: nothing of it moves, and ``earlier.1/`` gets no ``validate/``
    (nor keeps one after the put-back). Before, an empty ``earlier.1/validate/`` was made and left there."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"the earlier run's")
    _validate_runs(tmp_path, "version_0")
    lock = RunLock([tmp_path / "validate"], validate_lock(tmp_path / "validate" / "version_0").name).acquire()
    logs, fs = earlier_logs(str(tmp_path)), LocalFileSystem()
    try:
        aside = set_aside_earlier_run(fs, str(folder), logs)
        assert sorted(os.listdir(aside)) == ["last.ckpt"]
        put_back_earlier_run(fs, aside, str(folder), logs)
        assert not Path(aside).exists() and sorted(os.listdir(tmp_path / "validate")) == ["version_0", "version_0.lock"]
    finally:
        lock.release()


class _Ranks:
    """The collectives of a ``world``-rank strategy over threads, one per rank (broadcast, all-reduce of a bool)."""

    def __init__(self, world: int) -> None:
        self.world, self.slot, self.sync = world, [None] * world, threading.Barrier(world)

    def strategy(self, rank: int):
        ranks = self

        class Strategy:
            global_rank = rank

            def broadcast(self, obj, src=0):
                return ranks._exchange(rank, obj)[src]

            def reduce_boolean_decision(self, decision, all=True):
                return builtins.all(ranks._exchange(rank, decision))

        return Strategy()

    def _exchange(self, rank: int, obj) -> list:
        self.slot[rank] = obj
        self.sync.wait()
        seen = list(self.slot)
        self.sync.wait()
        return seen


def _agree(ios) -> list[bool]:
    """``agree_on_pinned`` on every rank at once (a thread each), rank r's CheckpointIO ``ios[r]``."""
    ranks, sent = _Ranks(len(ios)), [None] * len(ios)

    def run(rank):
        sent[rank] = agree_on_pinned(ranks.strategy(rank), ios[rank])

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(ios))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return sent


def test_every_rank_scores_the_checkpoint_rank_0_read_though_the_fit_replaced_it_before_rank_1_read(tmp_path):
    """Under DDP rank 1 reruns the command after rank 0 started, and reads ``--ckpt_path last`` (last.ckpt) after the
    fit replaced it with step 3: rank 0's step-2 checkpoint is sent to it and both score that. Before, each rank
    restored the file it read itself: rank 0 scored step 2, rank 1 step 3, and their losses were averaged."""
    last = tmp_path / "last.ckpt"
    optimiser = {"optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}}], "lr_schedulers": [{}]}
    atomic_torch_save({"global_step": 2, "state_dict": {"w": torch.zeros(2)}, "loops": {"fit_loop": 2}, **optimiser},
                      last)
    ios = [AtomicCheckpointIO(), AtomicCheckpointIO()]
    ios[0].pin(last, *read_identity(ios[0], last, True))
    atomic_torch_save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, last)  # the fit's next save
    ios[1].pin(last, *read_identity(ios[1], last, True))
    assert _agree(ios) == [True, True]
    for io in ios:
        restored = io.load_checkpoint(str(last))
        assert restored["global_step"] == 2 and torch.equal(restored["state_dict"]["w"], torch.zeros(2))
        assert restored["loops"] == {"fit_loop": 2}  # what validate restores is sent whole ...
        assert "optimizer_states" not in restored and "lr_schedulers" not in restored  # ... the optimiser is not


def test_ranks_that_read_the_same_file_send_nothing(tmp_path):
    """Both ranks read the same last.ckpt: each keeps its own read (no checkpoint goes through broadcast)."""
    last = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 2, "state_dict": {"w": torch.zeros(2)}}, last)
    ios = [AtomicCheckpointIO(), AtomicCheckpointIO()]
    for io in ios:
        io.pin(last, *read_identity(io, last, True))
    pinned = [io.pinned_checkpoint() for io in ios]
    assert _agree(ios) == [False, False]
    assert all(io.load_checkpoint(str(last)) is read for io, read in zip(ios, pinned))


def test_the_fsdp_strategy_restores_the_checkpoint_validate_read_not_the_file_replaced_since(tmp_path):
    """Under ``MarDiniFSDPStrategy`` validate's read (step 2, pinned) is restored though the fit replaced last.ckpt
    (step 3) after it. Before, Lightning's FSDP restore read the file itself, bypassing the CheckpointIO: step 3's
    weights were scored under a validate.yaml naming step 2 (a deleted step checkpoint: ``FileNotFoundError``)."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from mardini.lit.fsdp import MarDiniFSDPStrategy

    model, last = BoringModel(), tmp_path / "last.ckpt"
    weights = {step: {k: torch.full_like(v, step) for k, v in model.state_dict().items()} for step in (2, 3)}
    strategy = MarDiniFSDPStrategy(checkpoint_io=AtomicCheckpointIO())
    strategy._lightning_module, strategy.model = model, model  # what Lightning's setup attaches (no GPU here)
    atomic_torch_save({"global_step": 2, "state_dict": weights[2]}, last)
    strategy.checkpoint_io.pin(last, *read_identity(strategy.checkpoint_io, last, True))
    atomic_torch_save({"global_step": 3, "state_dict": weights[3]}, last)  # the fit's next save
    restored = strategy.load_checkpoint(last)
    assert restored["global_step"] == 2 and "state_dict" not in restored
    assert all(torch.equal(v, weights[2][k]) for k, v in model.state_dict().items())


def _replaced_during_reads(io: AtomicCheckpointIO, path: Path, reads: int, monkeypatch) -> None:
    """The fit saves ``path`` anew (global step 3, 4, ...) during each of the first ``reads`` reads through ``io``."""
    load, saves = io.load_checkpoint, iter(range(3, 3 + reads))

    def replaced_during(file, **kwargs):
        checkpoint = load(file, **kwargs)
        if (step := next(saves, None)) is not None:
            atomic_torch_save({"global_step": step}, path)  # the fit's next save, during this read
        return checkpoint

    monkeypatch.setattr(io, "load_checkpoint", replaced_during)


@pytest.mark.parametrize("replaced", [1, 3])
def test_a_checkpoint_replaced_during_its_read_is_read_again(tmp_path, monkeypatch, replaced):
    """The fit replaces last.ckpt while validate reads it: the read is not of the file now there, so it is read again
    and identified as the new file (step 3); replaced during each of the ``READS`` (3) reads, it is unidentified."""
    last, io = tmp_path / "last.ckpt", AtomicCheckpointIO()
    atomic_torch_save({"global_step": 2}, last)
    _replaced_during_reads(io, last, replaced, monkeypatch)
    checkpoint, identity = read_identity(io, last, True)
    if replaced == 1:
        assert checkpoint["global_step"] == 3 and identity[:2] == (str(last), 3)
    else:
        assert checkpoint["global_step"] == 4 and identity is None


def test_a_file_replaced_by_one_of_the_same_step_size_and_time_is_another_file(tmp_path):
    """A fit started over (``--ckpt_path null``) saves last.ckpt at the same step, size and modification time (a
    coarse-clocked file system) with other weights: its new inode tells the ranks' reads apart, and rank 0's is sent."""
    last = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 2, "state_dict": {"w": torch.zeros(2)}}, last)
    ios = [AtomicCheckpointIO(), AtomicCheckpointIO()]
    ios[0].pin(last, *read_identity(ios[0], last, True))
    when = last.stat().st_mtime_ns
    atomic_torch_save({"global_step": 2, "state_dict": {"w": torch.ones(2)}}, last)
    os.utime(last, ns=(when, when))
    ios[1].pin(last, *read_identity(ios[1], last, True))
    assert _agree(ios) == [True, True]
    assert all(torch.equal(io.load_checkpoint(str(last))["state_dict"]["w"], torch.zeros(2)) for io in ios)


def test_ranks_whose_reads_are_unidentified_all_take_rank_0_s(tmp_path):
    """Neither rank could tell which file it read (replaced during each read): rank 0's checkpoint is sent, not each
    rank left with its own."""
    last = tmp_path / "last.ckpt"
    ios = [AtomicCheckpointIO(), AtomicCheckpointIO()]
    for step, io in zip((2, 3), ios):
        io.pin(last, {"global_step": step}, identity=None)
    assert _agree(ios) == [True, True]
    assert [io.load_checkpoint(str(last))["global_step"] for io in ios] == [2, 2]


def test_the_callback_agrees_on_the_pinned_read_at_setup_and_only_where_one_is_pinned(tmp_path):
    """``ScoredOnEveryRank.setup`` runs ``agree_on_pinned`` where the strategy's CheckpointIO holds a pinned read
    (validate's), and leaves a CheckpointIO without one alone (a fit)."""
    from types import SimpleNamespace

    from mardini.lit.scored_checkpoint import ScoredOnEveryRank

    last, ranks = tmp_path / "last.ckpt", _Ranks(2)
    ios = [AtomicCheckpointIO(), AtomicCheckpointIO()]
    for step, io in zip((2, 3), ios):
        io.pin(last, {"global_step": step}, identity=(str(last), step, (1, 1, step)))

    def setup(rank):
        strategy = ranks.strategy(rank)
        strategy.checkpoint_io = ios[rank]
        ScoredOnEveryRank().setup(SimpleNamespace(strategy=strategy), None, "validate")

    threads = [threading.Thread(target=setup, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [io.load_checkpoint(str(last))["global_step"] for io in ios] == [2, 2]
    unpinned = SimpleNamespace(checkpoint_io=AtomicCheckpointIO())  # no collectives: a call would fail
    ScoredOnEveryRank().setup(SimpleNamespace(strategy=unpinned), None, "fit")


def _stage_config(tmp_path: Path) -> dict:
    """The parsed config of a stage logging to ``tmp_path/stage`` (what ``scored_checkpoint`` reads)."""
    return {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(tmp_path), "name": "stage", "version": ""}}}}


def _read_on_rank_1(ckpt_path, config, monkeypatch) -> AtomicCheckpointIO:
    """What validate's ``_read_scored`` pins on global rank 1 for ``ckpt_path`` (``config``: ``--ckpt_path last``'s
    stage, found again where the file is gone; None: a path given)."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    run = object.__new__(cli.MarDiniCLI)  # the CLI's state _read_scored reads, without parsing a command
    run.trainer = SimpleNamespace(strategy=SimpleNamespace(checkpoint_io=AtomicCheckpointIO()))
    run._scored_from = config
    assert run._read_scored(ckpt_path, True) == ckpt_path
    return run.trainer.strategy.checkpoint_io


@pytest.mark.parametrize("found_again", [True, False])
def test_a_later_rank_that_finds_no_checkpoint_scores_rank_0_s_read(tmp_path, monkeypatch, found_again):
    """Rank 0 read last.ckpt (step 2); the fit deleted it (and left no other) before rank 1 read: rank 1 pins that it
    found none and is sent rank 0's read as the ranks agree. Before, rank 1 raised (``validate scores the stage's
    newest checkpoint ..., but ... holds none``, or ``does not exist`` for a path given) while rank 0 waited for it
    in a collective for ever."""
    last = tmp_path / "stage" / "checkpoints" / "last.ckpt"
    atomic_torch_save({"global_step": 2, "state_dict": {"w": torch.zeros(2)}}, last)
    ios = [AtomicCheckpointIO()]
    ios[0].pin(last, *read_identity(ios[0], last, True))
    last.unlink()  # the fit's doing, before rank 1 read
    ios.append(_read_on_rank_1(str(last), _stage_config(tmp_path) if found_again else None, monkeypatch))
    assert ios[1].pinned_read()[1][0] == "none found"
    assert _agree(ios) == [True, True]
    assert [io.load_checkpoint(str(last))["global_step"] for io in ios] == [2, 2]


def test_a_later_rank_that_finds_no_stage_checkpoint_when_it_starts_goes_on_to_the_agreement(tmp_path, monkeypatch):
    """``--ckpt_path last`` resolved on rank 1 after the fit deleted the stage's checkpoints: rank 1 goes on with the
    stage's last.ckpt path (pinned as none found by ``_read_scored``) instead of raising; rank 0 raises as before."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    (tmp_path / "stage" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds none"):
        cli.found_or_sent(_stage_config(tmp_path))
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert cli.found_or_sent(_stage_config(tmp_path)) == str(tmp_path / "stage" / "checkpoints" / "last.ckpt")


def test_where_rank_0_found_none_every_rank_raises_the_same_error(tmp_path):
    """No rank read a checkpoint: each raises one error naming rank 0's cause, none waits for the others."""
    from mardini.lit.scored_checkpoint import none_found

    last, ranks, errors = tmp_path / "last.ckpt", _Ranks(2), [None, None]
    ios = [AtomicCheckpointIO(), AtomicCheckpointIO()]
    for rank, io in enumerate(ios):
        io.pin(last, None, identity=none_found(FileNotFoundError(f"rank {rank}: gone")))

    def run(rank):
        try:
            agree_on_pinned(ranks.strategy(rank), ios[rank])
        except FileNotFoundError as e:
            errors[rank] = str(e)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors[0] == errors[1] and "global rank 0 found no checkpoint to score (FileNotFoundError: rank 0: gone)" \
        in errors[0]


def _validate_with(strategy, ckpt_path) -> list[str]:
    """The warnings of ``MarDiniCLI.validate`` scoring ``ckpt_path`` under ``strategy`` (a stub Trainer: Lightning's
    refuses FSDP without a GPU)."""
    from types import SimpleNamespace

    run = object.__new__(cli.MarDiniCLI)  # the CLI's state validate reads, without parsing a command
    run.trainer = SimpleNamespace(strategy=strategy, callbacks=[], validate=lambda model, **kwargs: kwargs["ckpt_path"])
    run._resume_from, run._scored_from, run._validation_locks = None, None, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lightning.pytorch.utilities.rank_zero.rank_zero_only.rank", 0)
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run.validate(None, ckpt_path=ckpt_path, weights_only=True) == ckpt_path
    return [str(w.message) for w in caught if "restores it by reading the file again" in str(w.message)]


def test_validate_under_lightning_s_fsdp_strategy_warns_that_it_reads_the_file_again_and_names_the_fix(tmp_path):
    """Lightning's ``FSDPStrategy`` restores by reading the file itself, not validate's pinned read: validate warns up
    front, naming ``--trainer.strategy mardini.lit.fsdp.MarDiniFSDPStrategy``; under that strategy, and DDP, which
    restore the read, it does not. Before, nothing said so: a fit that deleted the file failed the validate later
    (``FileNotFoundError``), one that replaced last.ckpt had it score another step than validate.yaml named."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from mardini.lit.fsdp import MarDiniFSDPStrategy

    last = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 2, "state_dict": {"w": torch.zeros(2)}}, last)
    warned = _validate_with(FSDPStrategy(checkpoint_io=AtomicCheckpointIO()), str(last))
    assert len(warned) == 1 and "--trainer.strategy mardini.lit.fsdp.MarDiniFSDPStrategy" in warned[0]
    assert str(last) in warned[0] and "FileNotFoundError" in warned[0]
    for restores_the_read in (MarDiniFSDPStrategy, DDPStrategy):
        assert _validate_with(restores_the_read(checkpoint_io=AtomicCheckpointIO()), str(last)) == []


def test_a_put_back_run_does_not_take_the_name_a_running_validate_claimed(tmp_path):
    """A validate claimed validate/version_0 (its lock taken, its folder not made yet) while the new run trained: the
    earlier run's version_0 comes back as version_1, and version_0 stays the validate's. Before, the put-back chose by
    folder names alone and moved the earlier run into version_0 under the validate's held lock."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    runs = _validate_runs(tmp_path, "version_0")
    logs, fs = earlier_logs(str(tmp_path)), LocalFileSystem()
    aside = set_aside_earlier_run(fs, str(folder), logs)
    claimed = RunLock([tmp_path / "validate"], "version_0.lock")
    assert claimed.claim()
    try:
        put_back_earlier_run(fs, aside, str(folder), logs)
        lock = (tmp_path / "validate" / "version_0.lock").read_bytes()
        assert _files(tmp_path / "validate") == {"version_1/hparams.yaml": runs["version_0/hparams.yaml"],
                                                 "version_0.lock": lock}
        assert held(tmp_path / "validate" / "version_0.lock") and not Path(aside).exists()
    finally:
        claimed.release()


def test_a_run_in_earlier_n_whose_validate_holds_it_stays_there(tmp_path):
    """earlier.1/validate/ holds a finished run and one whose lock beside it is held (a validate writing there): the
    finished run comes back (as version_1: version_0 is taken), the held one stays where it is, lock and all, and so
    does earlier.1. Before, both were moved from under the validate, its lock file with them."""
    folder = tmp_path / "checkpoints"
    aside = folder / "earlier.1"
    (tmp_path / "validate" / "version_0").mkdir(parents=True)  # a validate of the new run, finished
    for name in ("version_0", "version_1"):
        (aside / "validate" / name).mkdir(parents=True)
        (aside / "validate" / name / "hparams.yaml").write_text(f"run: {name}\n")
    writing = RunLock([aside / "validate"], "version_1.lock").acquire()
    try:
        put_back_earlier_run(LocalFileSystem(), str(aside), str(folder), {})
        assert sorted(os.listdir(tmp_path / "validate")) == ["version_0", "version_1"]
        assert (tmp_path / "validate" / "version_1" / "hparams.yaml").read_text() == "run: version_0\n"
        assert sorted(os.listdir(aside / "validate")) == ["version_1", "version_1.lock"]
    finally:
        writing.release()


def test_a_record_rewritten_to_as_many_bytes_at_the_same_time_is_the_new_run_s(tmp_path):
    """The new run rewrote hparams.yaml to as many bytes within the file system's time resolution (its modification
    time the same as the earlier file's): the new run's stays, and the earlier run's bytes go to earlier.1. Before,
    size and time alone took it for the earlier run's: the new run's was moved aside, the earlier run's was lost."""
    from mardini.lit.step_checkpoint import rewritten_records

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"the earlier run's")
    hparams = tmp_path / "hparams.yaml"
    hparams.write_text("lr: 0.001\n")
    logs = earlier_logs(str(tmp_path))
    rewritten, when = rewritten_records(logs), hparams.stat().st_mtime_ns
    hparams.write_text("lr: 0.002\n")  # the new run's logger, as it starts
    os.utime(hparams, ns=(when, when))  # a coarse clock: the same modification time
    aside = set_aside_earlier_run(LocalFileSystem(), str(folder), logs, rewritten)
    assert hparams.read_text() == "lr: 0.002\n" and (Path(aside) / "hparams.yaml").read_text() == "lr: 0.001\n"


def test_the_finished_validates_are_set_aside_though_a_validate_claimed_a_run_since_the_fit_looked(tmp_path):
    """A validate claimed validate/version_1 between the fit's look at its records and the set-aside (validate/'s
    time changed): the finished version_0 still goes to earlier.1/validate/, the running one stays. Before, validate/
    was taken for the new run's, and the earlier run's finished runs stayed in the new run's folder."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    runs = _validate_runs(tmp_path, "version_0")
    logs = earlier_logs(str(tmp_path))
    name, lock = new_validation_run(str(tmp_path / "validate"))
    try:
        when = (tmp_path / "validate").stat().st_mtime_ns + 10**9
        os.utime(tmp_path / "validate", ns=(when, when))  # however fine the clock: validate/ changed
        aside = set_aside_earlier_run(LocalFileSystem(), str(folder), logs)
        assert name == "version_1" and _files(Path(aside) / "validate") == runs
        assert sorted(os.listdir(tmp_path / "validate")) == ["version_1", "version_1.lock"]
    finally:
        lock.release()

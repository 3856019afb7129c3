"""SLURM's requeue signal (SIGUSR1) and SIGTERM under ``PreemptionSave``: every rank saves the preemption checkpoint at
the same step, after the step, even when the signal reaches one rank only; rank 0 requeues the job once (SIGUSR1), or
the fit ends with exit status 143 (SIGTERM).

Each fit runs as SLURM tasks would (the SLURM variables srun sets, a stand-in ``scontrol`` on the PATH that records
its arguments), in subprocesses with a timeout so that a hang fails the test.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mardini.data.testing import tiny_synthetic

ROOT = Path(__file__).resolve().parents[1]
JOB = "4242"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("preempt"), train=8, val=2, frames=8, size=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env(tmp: Path, world: int, rank: int, port: str) -> dict[str, str]:
    """The environment of SLURM task ``rank`` of ``world`` (as srun sets it), with a stand-in ``scontrol`` that appends
    its arguments to ``tmp/requeued``."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp / "requeued"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NTASKS=str(world),
                SLURM_NTASKS_PER_NODE=str(world), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                SLURM_NODEID="0", SLURM_JOB_ID=JOB, SLURM_JOB_NAME="mardini", SLURM_NODELIST="127.0.0.1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


def _fit(data: Path, tmp: Path, world: int, signal_rank: int, mode: str, timeout: float = 240,
         scenario: str = "step", code: int = 0) -> list[str]:
    """Run the fit as ``world`` SLURM tasks, each to exit with ``code``; returns each task's stdout."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = _slurm_env(tmp, world, rank, port)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "preemption_run.py"), str(data),
                                       str(tmp / "out"), str(world), str(signal_rank), mode, scenario],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == code, err[-3000:]
            outs.append(out)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {world}-task run hung ({mode}, the signal on rank {signal_rank})")
    finally:
        for p in procs:
            p.kill()
    return outs


def _saved_step(tmp: Path) -> int:
    (path,) = (tmp / "out").glob("hpc_ckpt_*.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_the_requeue_signal_saves_after_the_step_and_requeues_once(data, tmp_path):
    outs = _fit(data, tmp_path, 1, 0, "deferred")
    assert "FINISHED rank=0 global_step=5" in outs[0]
    assert _saved_step(tmp_path) == 3  # the signal came at step 2's start: saved at its end, not inside it
    assert (tmp_path / "requeued").read_text().split() == ["requeue", JOB]


@pytest.mark.timeout(600)
def test_a_signal_on_one_rank_saves_on_every_rank_at_the_same_step(data, tmp_path):
    outs = _fit(data, tmp_path, 2, 1, "deferred")
    assert [o.strip().splitlines()[-1] for o in outs] == [f"FINISHED rank={r} global_step=5" for r in range(2)]
    assert _saved_step(tmp_path) == 3
    assert (tmp_path / "requeued").read_text().split() == ["requeue", JOB]  # rank 0 requeues, though rank 1 got it


def test_the_signal_inside_an_accumulation_window_saves_at_the_window_s_end(data, tmp_path):
    _fit(data, tmp_path, 1, 0, "deferred", scenario="accumulate")
    assert _saved_step(tmp_path) == 3  # after step 2's two micro-batches, not between them (step 2 of 2 half done)


def test_a_signal_during_validation_saves_at_the_validation_s_end(data, tmp_path):
    _fit(data, tmp_path, 1, 0, "deferred", scenario="validation")
    assert _saved_step(tmp_path) == 2  # the validation after step 2, not the next training step
    assert (tmp_path / "requeued").read_text().split() == ["requeue", JOB]


def test_a_signal_before_a_validation_inside_an_accumulation_window_saves_at_the_window_s_end(data, tmp_path):
    # windows of 3 micro-batches, a validation every 2 batches: the first one ends inside step 0's window
    _fit(data, tmp_path, 1, 0, "deferred", scenario="validation_in_window", code=143)
    (path,) = (tmp_path / "out").glob("hpc_ckpt_*.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ran = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"]  # micro-batches run
    assert (ckpt["global_step"], ran) == (1, 3)  # after step 0's 3 micro-batches; before, (0, 2): 2 of 3 lost


def test_sigterm_saves_after_the_step_and_ends_the_fit_with_status_143(data, tmp_path):
    _fit(data, tmp_path, 1, 0, "deferred", scenario="term", code=143)  # Lightning's handler alone: 0, nothing saved
    assert _saved_step(tmp_path) == 3  # the signal came at step 2's start: saved at its end
    assert not (tmp_path / "requeued").exists()  # SIGTERM ends the job; requeueing is SLURM's (or SIGUSR1's)


@pytest.mark.timeout(600)
def test_sigterm_on_one_rank_saves_on_every_rank_at_the_same_step_and_ends_all_of_them(data, tmp_path):
    _fit(data, tmp_path, 2, 1, "deferred", scenario="term", code=143)
    assert _saved_step(tmp_path) == 3



def test_sigterm_to_the_workers_of_loaders_passed_to_fit_directly_saves_and_exits_143(data, tmp_path):
    """Loaders of a user's own passed to ``Trainer.fit(train_dataloaders=..., val_dataloaders=...)``, their workers
    signalled with the main process: they outlive the first SIGTERM as a datamodule's do (PreemptionSave gives them
    leave_first_sigterm_to_main); before, they died and the fit failed ("DataLoader worker ... killed by signal:
    Terminated") before it saved."""
    _fit(data, tmp_path, 1, 0, "deferred", scenario="term_direct", code=143)
    assert _saved_step(tmp_path) == 3  # the signal came at step 2's start: saved at its end

@pytest.fixture(scope="module")
def data32(tmp_path_factory) -> Path:
    """Clips for configs/debug.yaml (9 frames at 8 fps from 16-fps clips, 32 px)."""
    return tiny_synthetic(tmp_path_factory.mktemp("preempt32"), train=8, val=4, frames=18, size=32)


def _train(data: Path | str, tmp: Path, *args: str) -> subprocess.Popen:
    """``train.py fit --config configs/debug.yaml`` as one SLURM task in its own process group, logging to
    ``tmp/train.log``, checkpoints in ``tmp/out/joint/checkpoints``. ``data``: the folder of the shards, or the class
    path of another datamodule (tests/ is on the PYTHONPATH)."""
    env = _slurm_env(tmp, 1, 0, str(_free_port()))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    chosen = ([f"--data={data}"] if isinstance(data, str)
              else [f"--data.init_args.train_shards={data}/train", f"--data.init_args.val_shards={data}/val"])
    command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "debug.yaml"),
               *chosen, f"--trainer.logger.init_args.save_dir={tmp / 'out'}", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false", *args]
    # a file, not a pipe the test would have to drain while it waits; the child keeps its own copy open
    with open(tmp / "train.log", "a") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
                                start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} never appeared (exit status {proc.returncode})")
        time.sleep(0.1)


def test_sigterm_to_train_py_and_its_loader_workers_saves_exits_143_and_the_command_resumes(data32, tmp_path):
    folder = tmp_path / "out" / "joint" / "checkpoints"
    run = ["--checkpoint_every=2", "--data.init_args.num_workers=2"]
    proc = _train(data32, tmp_path, "--trainer.max_steps=1000", *run)
    _wait_for(folder / "step00000002.ckpt", proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM, timeout and a container stop do: the loader workers get it too
    try:
        assert proc.wait(timeout=120) == 143, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        proc.kill()
    (hpc,) = folder.glob("hpc_ckpt_*.ckpt")
    step = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]
    assert step >= 2
    resumed = _train(data32, tmp_path, f"--trainer.max_steps={step + 1}", *run)
    assert resumed.wait(timeout=120) == 0, (tmp_path / "train.log").read_text()[-3000:]
    assert f"Restored all states from the checkpoint at {hpc}" in (tmp_path / "train.log").read_text()
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == step + 1


def test_sigterm_to_the_workers_of_a_datamodule_of_one_s_own_saves_and_exits_143_too(tmp_path):
    """A user's datamodule (tests/user_extensions.py) whose plain DataLoaders set no worker_init_fn: its workers,
    signalled with the main process, outlive the first SIGTERM as VideoDataModule's do (PreemptionSave gives them
    leave_first_sigterm_to_main); before, they died and the run failed ("DataLoader worker ... killed by signal")
    before it saved."""
    folder = tmp_path / "out" / "joint" / "checkpoints"
    proc = _train("user_extensions.RandomClipsDataModule", tmp_path, "--trainer.max_steps=1000",
                  "--checkpoint_every=2", "--data.init_args.num_workers=2")
    _wait_for(folder / "step00000002.ckpt", proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the loader workers get it too
    try:
        assert proc.wait(timeout=120) == 143, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        proc.kill()
    (hpc,) = folder.glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, map_location="cpu", weights_only=False)["global_step"] >= 2


_FOUND: list[str] = []  # in a loader worker: the SIGTERM handler its own worker_init_fn found


def _own_worker_init(worker_id: int) -> None:
    _FOUND[:] = [getattr(signal.getsignal(signal.SIGTERM), "__name__", "none")]


class _Found(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> str:
        return _FOUND[0] if _FOUND else "no worker_init_fn of its own ran"


def test_preemption_save_gives_a_datamodule_s_loaders_the_sigterm_protection_before_their_own_worker_init_fn(
        monkeypatch):
    """The loaders a datamodule's hooks return during a fit start their workers with leave_first_sigterm_to_main,
    then their own worker_init_fn; one without its own keeps the seeding Lightning would give it (under
    seed_everything(workers=True)); VideoDataModule's (already protected) and worker-less loaders stay as they are.
    After the fit the hooks are the datamodule's again."""
    import lightning as L
    from lightning.fabric.utilities.seed import pl_worker_init_function
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from torch.utils.data import DataLoader

    from mardini.data.datamodule import leave_first_sigterm_to_main
    from mardini.lit.preemption import PreemptionSave

    class Own(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(_Found(), batch_size=None, num_workers=1, worker_init_fn=_own_worker_init)

        def val_dataloader(self):
            return {"plain": DataLoader(_Found(), batch_size=None, num_workers=1),
                    "video": [DataLoader(_Found(), num_workers=1, worker_init_fn=leave_first_sigterm_to_main),
                              DataLoader(_Found())]}

    monkeypatch.setenv("PL_SEED_WORKERS", "1")  # what LightningCLI's seed_everything(workers=True) sets
    dm, save = Own(), PreemptionSave()
    trainer = type("Trainer", (), {"datamodule": dm, "global_rank": 3, "fit_loop": _fit_loop(dm, dm)})()
    save.setup(trainer, L.LightningModule(), "fit")
    assert list(dm.train_dataloader()) == ["_end_on_the_next_sigterm"]  # ours first, then the loader's own
    val = dm.val_dataloader()
    assert val["plain"].worker_init_fn.then.func is pl_worker_init_function
    assert val["plain"].worker_init_fn.then.keywords == {"rank": 3}
    assert [dl.worker_init_fn for dl in val["video"]] == [leave_first_sigterm_to_main, None]
    assert is_overridden("val_dataloader", dm) and not is_overridden("test_dataloader", dm)
    save.teardown(trainer, L.LightningModule(), "fit")
    assert not {"train_dataloader", "val_dataloader"} & set(vars(dm))
    assert dm.train_dataloader().worker_init_fn is _own_worker_init


def _fit_loop(train: Any, val: Any) -> SimpleNamespace:
    """A stand-in for a Trainer's fit loop, as ``Trainer.fit`` leaves it: where it gets its loaders from."""
    from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource

    val_loop = SimpleNamespace(_data_source=_DataLoaderSource(val, "val_dataloader"))
    return SimpleNamespace(_data_source=_DataLoaderSource(train, "train_dataloader"),
                           epoch_loop=SimpleNamespace(val_loop=val_loop))


def test_preemption_save_gives_loaders_passed_to_fit_the_sigterm_protection_and_their_own_back_after(monkeypatch):
    """Loaders passed to ``Trainer.fit`` directly start their workers with leave_first_sigterm_to_main, then their
    own worker_init_fn (or Lightning's seeding); after the fit each has its own worker_init_fn again, a loader passed
    as both training and validation loader too."""
    import lightning as L
    from torch.utils.data import DataLoader

    from mardini.lit.preemption import PreemptionSave

    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    train = DataLoader(_Found(), batch_size=None, num_workers=1, worker_init_fn=_own_worker_init)
    plain = DataLoader(_Found(), batch_size=None, num_workers=1)
    save = PreemptionSave()
    trainer = type("Trainer", (), {"datamodule": None, "global_rank": 0,
                                   "fit_loop": _fit_loop(train, {"plain": plain, "again": train})})()
    save.setup(trainer, L.LightningModule(), "fit")
    assert list(train) == ["_end_on_the_next_sigterm"]  # ours first, then the loader's own
    assert plain.worker_init_fn.then.keywords == {"rank": 0}
    save.teardown(trainer, L.LightningModule(), "fit")
    assert (train.worker_init_fn, plain.worker_init_fn) == (_own_worker_init, None)


def test_a_sigterm_lightning_s_handler_caught_before_the_training_exits_143_too(data32, tmp_path, monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from mardini.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(ROOT / "configs" / "debug.yaml"), f"--data.init_args.train_shards={data32}/train",
                f"--data.init_args.val_shards={data32}/val", f"--trainer.logger.init_args.save_dir={tmp_path}"],
               run=False)

    def sigterm_in_the_sanity_check(*args, **kwargs):
        raise SIGTERMException  # what Lightning's loops raise: no exit status, so Python exits 0

    monkeypatch.setattr(cli.trainer, "fit", sigterm_in_the_sanity_check)
    with pytest.raises(SystemExit) as exited:
        cli.fit(cli.model, datamodule=cli.datamodule)
    assert exited.value.code == 143

"""SLURM's requeue signal (SIGUSR1) under ``PreemptionSave``: every rank saves the preemption checkpoint at the same
step, after the step, even when the signal reaches one rank only, and rank 0 requeues the job once.

Each fit runs as SLURM tasks would (the SLURM variables srun sets, a stand-in ``scontrol`` on the PATH that records
its arguments), in subprocesses with a timeout so that a hang fails the test.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

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


def _fit(data: Path, tmp: Path, world: int, signal_rank: int, mode: str, timeout: float = 240,
         scenario: str = "step") -> list[str]:
    """Run the fit as ``world`` SLURM tasks; returns each task's stdout."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp / "requeued"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                   PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NTASKS=str(world),
                   SLURM_NTASKS_PER_NODE=str(world), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_NODEID="0", SLURM_JOB_ID=JOB, SLURM_JOB_NAME="mardini", SLURM_NODELIST="127.0.0.1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "preemption_run.py"), str(data),
                                       str(tmp / "out"), str(world), str(signal_rank), mode, scenario],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
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

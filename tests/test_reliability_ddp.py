"""Distributed faults on 2 CPU processes (gloo, ``ddp_spawn``), each run in a subprocess with a timeout so that a
hang fails the test instead of blocking CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mardini.data.testing import tiny_synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    # 3 validation shards of 2 clips over 2 ranks: rank 0 validates 4 clips, rank 1 only 2 (uneven batches)
    return tiny_synthetic(tmp_path_factory.mktemp("ddp"), train=12, val=6, frames=12, size=16)


@pytest.fixture(scope="module")
def one_val_shard(tmp_path_factory) -> Path:
    # 1 validation shard of 3 clips over 2 ranks (num_workers 0): fewer shards than readers, split by sample
    from mardini.data.synthetic_shards import write_synthetic_split

    root = tmp_path_factory.mktemp("ddp_one_val_shard")
    write_synthetic_split(root, "train", 12, 6, frames=12, height=16, width=16, fps=16.0, progress=False)
    write_synthetic_split(root, "val", 3, 3, frames=12, height=16, width=16, fps=16.0, progress=False)
    return root


def _run(root: Path, tmp: Path, mode: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT}", OMP_NUM_THREADS="1")
    try:
        return subprocess.run([sys.executable, str(ROOT / "tests" / "reliability_ddp_run.py"), str(root), str(tmp),
                               mode], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the 2-process run hung ({mode}):\n{(e.stderr or b'')[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_uneven_validation_data_does_not_hang(uneven, tmp_path):
    res = _run(uneven, tmp_path, "uneven")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FINISHED" in res.stdout and "`max_steps=6` reached" in res.stderr  # both ranks trained to the end


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rank_that_raises_brings_the_run_down_with_its_error(uneven, tmp_path):
    res = _run(uneven, tmp_path, "raise")
    assert res.returncode != 0
    assert "rank 1 failed on purpose at step 2" in res.stderr
    assert "FINISHED" not in res.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_validation_split_of_fewer_shards_than_ranks_validates(one_val_shard, tmp_path):
    res = _run(one_val_shard, tmp_path, "uneven")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FINISHED" in res.stdout and "`max_steps=6` reached" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_template_only_some_ranks_validate_does_not_hang(uneven, tmp_path):
    """val/loss_{template} is reduced over the ranks before it is logged: a key only some ranks log, synced by
    those alone, would leave them waiting on the others."""
    res = _run(uneven, tmp_path, "templates", timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FINISHED" in res.stdout and "LOGGED ['val/loss_interpolation', 'val/loss_random']" in res.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rank_whose_validation_clips_are_all_skipped_does_not_hang(uneven, tmp_path):
    """val/loss is reduced over the ranks at the epoch's end: logged (and synced) per batch, the rank without a
    usable clip never joined the sync and the other waited for ever."""
    res = _run(uneven, tmp_path, "rank0_skips_val", timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FINISHED" in res.stdout and "VAL_LOSS True" in res.stdout

"""Smoke test of the benchmarks: the --quick modes run and write finite positive figures (no timing asserts)."""

from __future__ import annotations

import math

import pytest

from bench import run_all, sampling_overhead, train_mfu


def _positive(*xs: float) -> bool:
    return all(math.isfinite(x) and x > 0 for x in xs)


def test_train_mfu_quick(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # results go to tmp_path/bench/results
    r = train_mfu.main(["--quick"])
    m = r["median"]
    assert _positive(r["flops_per_step"], m["step_s"], m["peak_bf16"], m["peak_fp32"], m["mfu_bf16"], m["mfu_fp32"])
    assert r["command"].startswith(".venv/bin/python -m bench.train_mfu")
    assert (tmp_path / "bench/results/train_mfu.json").exists()


def test_sampling_overhead_quick_and_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = sampling_overhead.main(["--quick"])
    m = r["median"]
    assert _positive(m["loop_s"], m["network_s"]) and m["calls"] == 3
    assert 0 <= m["overhead_share"] < 1
    text = run_all.summary({})
    assert "Sampling per-step overhead" in text and r["command"] in text


@pytest.mark.slow
def test_run_all_quick(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(run_all.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "bench.run_all", "--quick", "--only", "growth", "asymmetric"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "bench/results/SUMMARY.md").exists()

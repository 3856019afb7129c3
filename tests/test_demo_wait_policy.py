"""The demo picks OpenMP's wait policy from the machine's load, before torch loads OpenMP."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mardini.demo.wait_policy import BUSY_THRESHOLD, apply_wait_policy, busy_cores, read_cpu_times


def test_read_cpu_times_counts_idle_and_iowait_as_idle(tmp_path):
    stat = tmp_path / "stat"
    #                user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 5 20 1000 50 1 2 7 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n")
    busy, total = read_cpu_times(str(stat))
    assert total == 100 + 5 + 20 + 1000 + 50 + 1 + 2 + 7  # guest time is already inside user
    assert busy == total - 1000 - 50
    assert read_cpu_times(str(tmp_path / "missing")) is None
    (tmp_path / "bad").write_text("intr 1 2 3\n")
    assert read_cpu_times(str(tmp_path / "bad")) is None


def test_busy_cores_is_the_busy_share_times_the_cores():
    readings = iter([(100, 1000), (100 + 150, 1000 + 200)])  # 150 of 200 jiffies busy
    busy = busy_cores(interval=0.0, read=lambda: next(readings), cpus=2, sleep=lambda s: None)
    assert busy == pytest.approx(1.5)
    assert busy_cores(read=lambda: None, sleep=lambda s: None) is None
    same = iter([(5, 10), (5, 10)])  # no time passed: unknown rather than a division by zero
    assert busy_cores(read=lambda: next(same), sleep=lambda s: None) is None


def test_busy_machine_gets_passive_idle_one_keeps_the_default():
    env: dict[str, str] = {}
    why = apply_wait_policy(env, measure=lambda: BUSY_THRESHOLD + 0.5)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"} and "PASSIVE" in why and "1.0 cores busy" in why
    env = {}
    why = apply_wait_policy(env, measure=lambda: 0.05)
    assert env == {} and "default" in why and "0.1 cores busy" in why
    env = {}
    assert "unknown" in apply_wait_policy(env, measure=lambda: None) and env == {}


def test_a_policy_the_user_set_is_kept_without_measuring():
    def never():
        raise AssertionError("the load must not be measured when the user chose a policy")

    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert "set by the user" in apply_wait_policy(env, measure=never)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_python_m_mardini_demo_chooses_before_torch_loads():
    """The policy only counts if torch (and with it libgomp) is not loaded yet when ``__main__`` sets it: importing
    the ``mardini.demo`` package, which ``python -m`` does first, must not import torch."""
    code = "import sys, mardini.demo, mardini.demo.wait_policy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr

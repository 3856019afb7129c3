"""The demo picks OpenMP's wait policy from the machine's load, before torch loads OpenMP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mardini.demo import wait_policy
from mardini.demo.wait_policy import BUSY_THRESHOLD, apply_wait_policy, busy_cores, read_cpu_times

DEMO_THREADS = min(2, os.cpu_count() or 1)  # the demo's --threads without OMP_NUM_THREADS


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
    two_cores = {"threads": 2, "cores": 2}  # this machine, the demo's default threads
    env: dict[str, str] = {}
    why = apply_wait_policy(env, measure=lambda: BUSY_THRESHOLD + 0.5, **two_cores)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"} and "PASSIVE" in why and "1.0 cores busy" in why
    env = {}
    why = apply_wait_policy(env, measure=lambda: 0.05, **two_cores)
    assert env == {} and "default" in why and "0.1 cores busy" in why
    env = {}
    assert "unknown" in apply_wait_policy(env, measure=lambda: None, **two_cores) and env == {}


@pytest.mark.parametrize("busy, threads, cores, passive", [
    (1.0, 2, 64, False),  # a background daemon on a big machine: the demo's 2 threads have cores to spare
    (61.0, 2, 64, False),
    (62.5, 2, 64, True),  # busy cores + threads exceed the cores by half a core: threads would wait on each other
    (0.6, 1, 2, False),  # --threads 1 beside one busy core of two: a core to itself
    (1.5, 1, 2, True),
    (0.0, 4, 2, True),  # more threads than cores (OMP_NUM_THREADS=4 on 2 cores)
    (BUSY_THRESHOLD, 2, 2, True), (BUSY_THRESHOLD - 0.01, 2, 2, False),  # this machine: half a core, as before
])
def test_passive_only_when_busy_cores_and_the_demo_s_threads_exceed_the_cores(busy, threads, cores, passive):
    env: dict[str, str] = {}
    why = apply_wait_policy(env, measure=lambda: busy, threads=threads, cores=cores)
    assert (env == {"OMP_WAIT_POLICY": "PASSIVE"}) == passive, why
    assert f"+ {threads} threads, {cores} cores" in why


def test_the_load_is_measured_on_the_cpus_this_process_may_run_on(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  30 0 0 70 0 0 0 0\ncpu0 10 0 0 0 0 0 0 0\ncpu1 0 0 0 10 0 0 0 0\ncpu2 20 0 0 60 0 0 0 0\n")
    assert read_cpu_times(str(stat)) == (30, 100)
    assert read_cpu_times(str(stat), cpus={1, 2}) == (20, 90)
    assert read_cpu_times(str(stat), cpus={5}) is None
    monkeypatch.setattr(wait_policy.os, "sched_getaffinity", lambda pid: {1, 2}, raising=False)
    seen = {}

    def fake_busy_cores(read, cpus):  # what the default measure reads, and over how many CPUs
        seen["cpus"], seen["reading"] = cpus, read()
        return 0.3

    monkeypatch.setattr(wait_policy, "busy_cores", fake_busy_cores)
    monkeypatch.setattr(wait_policy, "read_cpu_times", lambda cpus=None: ("read", sorted(cpus)))
    why = apply_wait_policy({}, threads=2)
    assert seen == {"cpus": 2, "reading": ("read", [1, 2])} and "0.3 cores busy at start + 2 threads, 2 cores" in why


@pytest.mark.parametrize("argv, env, threads", [
    ([], None, DEMO_THREADS), (["--threads", "1"], None, 1), ([], "3", 3), (["--threads=1"], "3", 1),
    (["--threads", "many"], None, DEMO_THREADS),  # the demo's parser reports it
])
def test_python_m_mardini_demo_weighs_the_threads_it_will_run(argv, env, threads, monkeypatch):
    import runpy

    import mardini.demo.main

    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("MARDINI_DEMO_WAIT_POLICY", "")  # what __main__ sets, restored after the test
    seen = {}

    def apply(threads):  # stands in for the policy: records the threads it was given
        seen["threads"] = threads
        return ""

    monkeypatch.setattr(wait_policy, "apply_wait_policy", apply)
    monkeypatch.setattr(mardini.demo.main, "cli", lambda: 0)
    monkeypatch.setattr("sys.argv", ["mardini/demo/__main__.py", *argv])
    with pytest.raises(SystemExit):
        runpy.run_module("mardini.demo", run_name="__main__")
    assert seen == {"threads": threads}


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

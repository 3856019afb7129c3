"""``--threads`` of the demo and the reproduction: OMP_NUM_THREADS when set, else the command's own default."""

from __future__ import annotations

import os
import re

import pytest
import torch

from mardini.demo import main as demo
from mardini.reproduce import main as reproduce


class Stop(Exception):
    """Raised by a stand-in once the command has set its threads, to end it there."""


@pytest.fixture()
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _stop(*args, **kwargs):
    raise Stop


@pytest.mark.parametrize("command", [demo, reproduce], ids=["demo", "reproduce"])
def test_threads_default_to_omp_num_threads_when_set(command, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert command.parse_args([]).threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert command.parse_args([]).threads == 3  # the reproduction used to cap it at 2
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # nested OpenMP levels: the outermost
    assert command.parse_args([]).threads == 4
    assert command.parse_args(["--threads", "2"]).threads == 2  # the option wins


def test_without_omp_num_threads_the_defaults_are_unchanged(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert demo.parse_args([]).threads == min(2, os.cpu_count() or 1)
    assert reproduce.parse_args([]).threads == min(2, torch.get_num_threads())


@pytest.mark.parametrize("command", [demo, reproduce], ids=["demo", "reproduce"])
@pytest.mark.parametrize("env, argv, message", [
    ("many", [], r"OMP_NUM_THREADS='many' is no number of threads: set it to a positive integer, unset it, or give "
                 r"--threads N"),
    ("0", [], "OMP_NUM_THREADS='0' is no number of threads: .*"),
    (None, ["--threads", "0"], r"--threads 0 is impossible: give 1 or more"),
])
def test_bad_thread_counts_are_one_line_errors(command, env, argv, message, monkeypatch, capsys):
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    with pytest.raises(SystemExit) as exit_:
        command.parse_args(argv)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then "prog: error: ..."
    assert re.search(f"error: {message}$", last), last


def test_the_demo_runs_on_omp_num_threads(monkeypatch, tmp_path, threads_restored):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    monkeypatch.setattr(demo, "synthetic_differences", lambda *a, **k: {})
    monkeypatch.setattr(demo, "build_synthetic", _stop)  # the first step after the threads are set
    with pytest.raises(Stop):
        demo.main(["--out", str(tmp_path / "demo")])
    assert torch.get_num_threads() == 1  # before: 2, whatever OMP_NUM_THREADS said


def test_the_reproduction_runs_on_its_threads(monkeypatch, tmp_path, threads_restored):
    from mardini.demo import data

    monkeypatch.setattr(data, "build_synthetic", _stop)  # the first step after the threads are set
    for env, want in (("3", 3), (None, 1)):
        if env is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", env)
        argv = ["--only", "table3", "--out", str(tmp_path)] + ([] if env else ["--threads", "1"])
        with pytest.raises(Stop):
            reproduce.main(argv)
        assert torch.get_num_threads() == want

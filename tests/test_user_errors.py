"""Entry points report a user's mistake as one message and where it was raised; MARDINI_TRACEBACK=1 re-raises."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mardini.evaluation import cli as evaluate_cli
from mardini.user_errors import run_reporting_user_errors

ROOT = Path(__file__).resolve().parents[1]


def _bad_setting() -> int:
    raise ValueError("--frames 0: give at least 2 frames")


def test_a_user_error_prints_the_message_and_where_it_was_raised(capsys, monkeypatch):
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    assert run_reporting_user_errors("prog", _bad_setting) == 2
    err = capsys.readouterr().err
    assert err.startswith("prog: error: --frames 0: give at least 2 frames\n")
    assert "test_user_errors.py:" in err and "in _bad_setting" in err and "Traceback" not in err


def _worker_failure(*errors: BaseException):
    """What ``ddp_spawn`` raises in the main process when worker 1 raised ``errors[-1]`` (each one raised from the
    one before): PyTorch's ProcessRaisedException holding the worker's traceback as text."""
    import traceback

    from torch.multiprocessing.spawn import ProcessRaisedException

    def worker_setup():
        cause = None
        for err in errors:
            try:
                raise err from cause
            except BaseException as raised:  # noqa: BLE001 - the chain is the point
                cause = raised
        raise cause

    try:
        worker_setup()
    except BaseException:  # noqa: BLE001
        text = traceback.format_exc()
    return ProcessRaisedException(f"\n\n-- Process 1 terminated with the following error:\n{text}", 1, 4321)


@pytest.mark.parametrize("errors, reported", [
    ([ValueError("data.epoch_size=2 is smaller than one per-rank batch (4); raise epoch_size")],
     "data.epoch_size=2 is smaller than one per-rank batch (4); raise epoch_size"),
    ([KeyError("internal"), FileNotFoundError("no shards under data/x;\nrun data/make_synthetic.py")],
     "no shards under data/x;\nrun data/make_synthetic.py"),  # the last of a chain, all of its lines
    ([ValueError("a user error"), RuntimeError("then a bug")], None),  # the error raised is the bug: traceback kept
    ([RuntimeError("a bug whose message quotes\nValueError: something")], None),  # not the exception's own line
], ids=["value-error", "chained-multiline", "bug-after-user-error", "bug-quoting-a-user-error"])
def test_a_user_error_in_a_spawned_worker_is_reported_like_one_in_the_main_process(capsys, monkeypatch, errors,
                                                                                    reported):
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    failure = _worker_failure(*errors)

    def fit():
        raise failure

    if reported is None:
        with pytest.raises(type(failure)):
            run_reporting_user_errors("prog", fit)
        return
    assert run_reporting_user_errors("prog", fit) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prog: error: {reported}\n"), err
    assert "test_user_errors.py:" in err and "in worker_setup, process 1" in err and "Traceback" not in err
    monkeypatch.setenv("MARDINI_TRACEBACK", "1")
    with pytest.raises(type(failure)):
        run_reporting_user_errors("prog", fit)


class _RaisesInTheWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise ValueError("data.frames=9: every clip is too short;\nrebuild the shards")


def test_a_user_error_in_a_dataloader_worker_is_reported_like_one_in_the_main_process(capsys, monkeypatch):
    """PyTorch re-raises a loader worker's ValueError in the main process as a ValueError whose message is
    ``Caught ValueError in DataLoader worker process 0.`` and the worker's traceback: the report gives the worker's
    own message and innermost frame instead (before: the whole traceback text as the message)."""
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)

    def fit():
        next(iter(torch.utils.data.DataLoader(_RaisesInTheWorker(), batch_size=None, num_workers=1)))

    assert run_reporting_user_errors("prog", fit) == 2
    err = capsys.readouterr().err
    assert err.startswith("prog: error: data.frames=9: every clip is too short;\nrebuild the shards\n"), err
    assert "test_user_errors.py:" in err and "in __iter__, DataLoader worker process 0;" in err
    assert "Traceback" not in err and "Caught" not in err


def test_the_traceback_switch_re_raises(monkeypatch):
    monkeypatch.setenv("MARDINI_TRACEBACK", "1")
    with pytest.raises(ValueError, match="--frames 0"):
        run_reporting_user_errors("prog", _bad_setting)


def test_other_errors_keep_their_traceback(monkeypatch):
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)

    def bug():
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_reporting_user_errors("prog", bug)


def test_return_values_become_exit_codes():
    assert run_reporting_user_errors("prog", lambda: None) == 0
    assert run_reporting_user_errors("prog", lambda: {"written": 1}) == 0  # sample.py's main returns its outputs
    assert run_reporting_user_errors("prog", lambda: 3) == 3


def test_evaluate_names_where_its_error_was_raised(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    assert evaluate_cli.main(["--data", str(tmp_path / "missing"), "--metrics", "midf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ") and "(raised at mardini/" in err


def test_sample_py_exits_2_with_the_message(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "sample.py"), "interpolate", "--ckpt",
                           str(tmp_path / "none.ckpt"), "--images", "a.png", "b.png"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "sample.py: error:" in done.stderr and "Traceback" not in done.stderr

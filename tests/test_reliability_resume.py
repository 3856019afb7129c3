"""Kill and resume: ``train.py fit`` is SIGKILLed mid-run and mid-checkpoint-write, then rerun with the same command.

The child processes load :mod:`reliability_hooks` (``tests/`` on ``PYTHONPATH``): a callback that writes one JSON
line per training batch, and a hook that holds a ``last.ckpt`` write between its temp file and ``os.replace``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mardini.data.testing import tiny_synthetic
from mardini.lit.checkpoints import check_metadata, read_checkpoint
from mardini.lit.curriculum import Curriculum, Milestone

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 10
KILLED_AT = 7  # the second run is killed in this step, one past its checkpoint of step 6 (checkpoint_every: 2)
MILESTONES = [
    {"step": 0, "keep_ratio": [0.3, 0.9], "frames": 4},
    {"step": 3, "keep_ratio": [0.2, 0.6]},
    {"step": 6, "keep_ratio": [0.15, 0.5], "frames": 5, "attention": "t"},
]


def _config(tmp: Path, data: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "checkpoint_every": 2,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": MAX_STEPS, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp / "out"), "name": "joint", "version": ""}},
            "callbacks": [
                {"class_path": "mardini.lit.curriculum.Curriculum",
                 "init_args": {"milestones": MILESTONES}},
                {"class_path": "reliability_hooks.StepRecorder"},
            ],
        },
        "model": {"class_path": "mardini.lit.MarDiniModule",
                  "init_args": {"size": "tiny", "planner": {"depth": 1}, "generator": {"depth": 1},
                                "planner_resolution": 8, "lr": 1e-3, "ema_decay": 0.9, "ema_warmup": False}},
        "data": {"class_path": "mardini.data.datamodule.VideoDataModule",
                 "init_args": {"train_shards": str(data / "train"), "val_shards": None, "frames": 5, "fps": 8,
                               "resolution": 16, "batch_size": 2, "num_workers": 0, "shuffle_buffer": 8,
                               "epoch_size": 8}},
    }
    path = tmp / "stage.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, tmp: Path, run: str, **env) -> subprocess.Popen:
    full = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{ROOT}",
                MARDINI_TEST_RECORD=str(tmp / "steps.jsonl"), MARDINI_TEST_RUN=run, **env)
    # same command every time; a new session so the whole process group can be killed; the child holds its own
    # copy of the log file
    with open(tmp / f"{run}.log", "w") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config)],
                                cwd=tmp, env=full, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(proc: subprocess.Popen, cond, what: str, log: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _rows(tmp: Path, run: str) -> list[dict]:
    if not (tmp / "steps.jsonl").exists():
        return []
    return [r for r in map(json.loads, (tmp / "steps.jsonl").read_text().splitlines()) if r["run"] == run]


def _step_of(path: Path) -> int:
    ckpt = read_checkpoint(path)  # weights_only=True: a torn file would fail here
    check_metadata(ckpt, ("joint",), path)
    return int(ckpt["global_step"])


def test_sigkill_mid_run_and_mid_checkpoint_write_then_same_command_resumes(tmp_path):
    data = tiny_synthetic(tmp_path / "data", train=24, val=2, frames=12, size=16)
    config = _config(tmp_path, data)
    ckpt_dir = tmp_path / "out" / "joint" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    curriculum = Curriculum([Milestone(**m) for m in MILESTONES])

    # 1) killed in the middle of writing the 2nd last.ckpt: temp file written, os.replace not yet done
    marker = tmp_path / "paused"
    a = _launch(config, tmp_path, "a", MARDINI_TEST_PAUSE_SAVE="2", MARDINI_TEST_PAUSE_SAVE_MARKER=str(marker))
    _wait_for(a, marker.exists, "the paused checkpoint write", tmp_path / "a.log")
    temp = Path(marker.read_text())
    assert temp.exists() and temp.parent == ckpt_dir and temp.name != "last.ckpt"
    _kill(a)
    assert _step_of(last) == 2  # the previous good checkpoint is intact; the half-done save never replaced it
    assert temp.exists()  # the torn write is still there for the next run to survive

    # 2) same command: resumes from step 4, the step checkpoint written in full before that last.ckpt (the highest
    #    step saved; the older last.ckpt of step 2 is not taken); SIGKILLed mid-run, in the step after its newer
    #    checkpoint (held there: left to train while this process read the checkpoint and the rows, it could reach
    #    max_steps before the kill, and the kill found it exited)
    held = tmp_path / "held"
    b = _launch(config, tmp_path, "b", MARDINI_TEST_PAUSE_STEP=str(KILLED_AT),
                MARDINI_TEST_PAUSE_STEP_MARKER=str(held))
    _wait_for(b, held.exists, f"step {KILLED_AT}", tmp_path / "b.log")
    _kill(b)  # mid-run: in the training step after the checkpoint
    rows_b, rows_a = _rows(tmp_path, "b"), _rows(tmp_path, "a")
    assert [r["step"] for r in rows_b] == list(range(4, KILLED_AT + 1)) and rows_a[-1]["step"] == 3  # none lost
    step_b = _step_of(last)
    assert step_b == KILLED_AT - 1  # its checkpoint_every save, before the step it was killed in

    # 3) same command again: resumes from what b left, runs to the end
    c = _launch(config, tmp_path, "c")
    assert c.wait(timeout=180) == 0, (tmp_path / "c.log").read_text()[-3000:]
    log_c = (tmp_path / "c.log").read_text()
    assert f"Restoring states from the checkpoint path at {last}" in log_c
    rows_a, rows_c = _rows(tmp_path, "a"), _rows(tmp_path, "c")

    # step count: every run starts where the last good checkpoint was, the final one ends at max_steps
    assert [r["step"] for r in rows_c] == list(range(step_b, MAX_STEPS))
    assert [r["step"] for r in rows_a] == list(range(len(rows_a))) == list(range(4))
    final = read_checkpoint(last)
    assert final["global_step"] == MAX_STEPS

    # curriculum position: a function of the resumed step, the same as in a straight run
    for r in rows_a + rows_b + rows_c:
        want = curriculum.settings_at(r["step"])
        assert r["keep_ratio"] == pytest.approx(want["keep_ratio"]), r
        assert r["frames"] == want["frames"], r
        assert r["attention"] == want.get("attention", "st"), r

    # data stream: the saved stream state is restored (not reset) and the stream does not restart from its start
    saved_epoch = read_checkpoint(last)["VideoDataModule"]["epoch"]
    assert saved_epoch >= rows_c[-1]["epoch"] >= rows_c[0]["epoch"] > 0
    # exact continuation: a resumed run trains on the very batches the killed run trained on at the same steps (b
    # resumed where a stopped: no step of both)
    seen = {r["step"]: r["keys"] for r in rows_b}
    overlap = [r for r in rows_c if r["step"] in seen]
    assert overlap and all(r["keys"] == seen[r["step"]] for r in overlap), (rows_b, rows_c)
    first_keys = [r["keys"] for r in rows_a]
    assert [r["keys"] for r in rows_c[: len(first_keys)]] != first_keys[: len(rows_c)]
    assert [r["keys"] for r in rows_b[: len(first_keys)]] != first_keys[: len(rows_b)]

    # nothing corrupt or stray is left: every checkpoint loads, no temp file remains
    for path in ckpt_dir.glob("*.ckpt"):
        _step_of(path)
    assert not [p.name for p in ckpt_dir.iterdir() if p.suffix != ".ckpt"], sorted(os.listdir(ckpt_dir))

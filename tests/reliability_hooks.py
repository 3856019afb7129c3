"""Test-only hooks loaded by the training subprocesses of the reliability tests (``trainer.callbacks`` in a YAML).

Not a test module (no ``test_`` prefix): ``tests/`` goes on ``PYTHONPATH`` of the child ``train.py``.

- :class:`StepRecorder` appends one JSON line per training batch (step, curriculum state, batch keys, the data
  stream's epoch and skip count) to ``$MARDINI_TEST_RECORD``, flushed at once, so a SIGKILL loses nothing already
  written.
- With ``$MARDINI_TEST_PAUSE_SAVE=N`` it also holds the N-th atomic write of ``last.ckpt`` between "temp file
  written" and ``os.replace``: it writes ``$MARDINI_TEST_PAUSE_SAVE_MARKER`` (the temp file's path) and sleeps,
  so the parent can SIGKILL the process exactly in the middle of writing a checkpoint.
- With ``$MARDINI_TEST_PAUSE_STEP=N`` it holds the training at step N's batch start, once that row is written: it
  writes ``$MARDINI_TEST_PAUSE_STEP_MARKER`` and sleeps, so the parent kills the run mid-run at a known step (a run
  left to train while the parent reacts may reach ``max_steps`` first).

A marker appears whole (written beside, then renamed): the parent reads it as soon as it exists.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L

import mardini.lit.checkpoint_io as checkpoint_io


class StepRecorder(L.Callback):
    def __init__(self) -> None:
        self.path = os.environ.get("MARDINI_TEST_RECORD")
        self.run = os.environ.get("MARDINI_TEST_RUN", "?")
        pause_at = int(os.environ.get("MARDINI_TEST_PAUSE_SAVE", "0"))
        if pause_at:
            _pause_replace_of_last(pause_at, Path(os.environ["MARDINI_TEST_PAUSE_SAVE_MARKER"]))
        self.hold_at = int(os.environ.get("MARDINI_TEST_PAUSE_STEP", "-1"))
        self.hold_marker = os.environ.get("MARDINI_TEST_PAUSE_STEP_MARKER")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.path:
            return
        dm = trainer.datamodule
        row = {
            "run": self.run,
            "step": trainer.global_step,
            "keep_ratio": list(pl_module.mask_sampler.keep_ratio),
            "frames": pl_module.frames,
            "attention": pl_module.networks["generator"].cfg.attention if "generator" in pl_module.networks else None,
            "keys": list(batch["key"]),
            "epoch": dm.state.epoch if dm is not None else None,
            "skipped": int(batch["skipped"]),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if trainer.global_step == self.hold_at:
            _hold(Path(self.hold_marker), str(self.hold_at))  # the parent kills us here: mid-run, at a known step


def _pause_replace_of_last(n: int, marker: Path) -> None:
    real_replace = os.replace
    seen = {"last": 0}

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "last.ckpt":
            seen["last"] += 1
            if seen["last"] == n:
                _hold(marker, str(src))  # the parent kills us here: temp file complete, target not yet replaced
        return real_replace(src, dst, *args, **kwargs)

    checkpoint_io.os = _OsProxy(replace)


def _hold(marker: Path, text: str) -> None:
    """Tell the parent where we are (``marker`` holding ``text``, renamed into place whole: the parent reads it as
    soon as it exists, and read "" from a file seen between its creation and its write), then wait to be killed."""
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(text)
    os.replace(partial, marker)
    time.sleep(3600)


class _OsProxy:
    """``os`` with ``replace`` swapped, for :mod:`mardini.lit.checkpoint_io` only."""

    def __init__(self, replace) -> None:
        self.replace = replace

    def __getattr__(self, name):
        return getattr(os, name)

"""``make demo`` end to end at a tiny scale: every stage, the evaluation, the pictures and the report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mardini.demo.main import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end_and_rerun_reuses(tmp_path, monkeypatch):
    os.symlink(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    args = ["--scale", "0.01", "--train-clips", "100", "--eval-clips", "4", "--steps", "1", "--show", "1",
            "--no-progress"]
    assert main(args) == 0
    out = tmp_path / "outputs" / "demo"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["01_dm_warmup_4f", "02_dm_warmup_9f", "03_mar_warmup", "04_joint_model",
                                       "05_joint_task"]
    assert not any(s["reused"] for s in summary["stages"].values())
    assert set(summary["results"]) == {"interpolation", "image_to_video"}
    assert {"linear_blend", "nearest_frame", "mardini"} <= set(summary["results"]["interpolation"])
    report = (out / "report.md").read_text()
    for expected in ("## Training chain", "Does the model beat the baselines", "loss_curves.png", "eta 1.0",
                     "samples/interpolation_sheet.png", "samples/image_to_video_sheet.png"):
        assert expected in report
    for name in ("loss_curves.png", "samples/interpolation_sheet.png", "samples/interpolation_0.gif",
                 "samples/image_to_video_0.mp4"):
        assert (out / name).stat().st_size > 0
    # a second run reuses every finished stage
    assert main(args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert all(s["reused"] for s in again["stages"].values())

"""``ContinuedWriter`` (``mardini/lit/resumed_logs.py``) on a metrics.csv of its own: no fit runs."""

from __future__ import annotations

import csv

import pytest

from mardini.lit.resumed_logs import ContinuedWriter

EARLIER = "epoch,step,train/loss,val/loss\n0,0,0.9,\n0,1,0.8,\n0,1,,0.7\n0,2,0.6,\n0,3,0.5,\n"


def _rows(folder) -> list[tuple[str, str]]:
    with open(folder / "metrics.csv", newline="") as file:
        return [(row["step"], row.get("train/loss", "")) for row in csv.DictReader(file)]


def _writer(folder, continue_at: int | None) -> ContinuedWriter:
    (folder / "metrics.csv").write_text(EARLIER)
    writer = ContinuedWriter(log_dir=str(folder))
    writer.continue_at = continue_at
    return writer


def test_a_resume_keeps_the_rows_below_its_step_and_logs_on_in_the_same_columns(tmp_path):
    """Resumed at step 2: the rows of steps 0 and 1 stay (step 2 and 3's, logged after the checkpoint by the run
    that died, go), the validation column too, and the new rows follow under the same header."""
    writer = _writer(tmp_path, continue_at=2)
    assert (tmp_path / "metrics.csv").read_text() == EARLIER  # left until the first save of metrics
    writer.save()
    assert (tmp_path / "metrics.csv").read_text() == EARLIER
    writer.log_metrics({"train/loss": 0.55}, step=2)
    writer.save()
    assert _rows(tmp_path) == [("0", "0.9"), ("1", "0.8"), ("1", ""), ("2", "0.55")]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "epoch,step,train/loss,val/loss"


def test_a_run_that_resumes_nothing_replaces_the_file(tmp_path):
    writer = _writer(tmp_path, continue_at=None)
    writer.log_metrics({"train/loss": 1.0}, step=0)
    writer.save()
    assert _rows(tmp_path) == [("0", "1.0")]

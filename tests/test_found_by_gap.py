"""The trajectory metric split by the distance from the nearest given frame (mardini.evaluation.found_by_gap)."""

import json
import math

import pytest
import torch

from mardini.data.datamodule import first_batch
from mardini.data.testing import tiny_synthetic
from mardini.evaluation.found_by_gap import found_by_gap, main, markdown
from mardini.evaluation.samplers import NearestFrame
from mardini.evaluation.trajectory import TrajectoryError, miss_px
from mardini.masking import image_to_video_mask, interpolation_mask


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    shards = tiny_synthetic(tmp_path_factory.mktemp("synth"), train=2, val=6, frames=12, size=32) / "val"
    return first_batch(str(shards), 6, frames=9, resolution=32, fps=None)


def test_rows_add_up_to_the_trajectory_metric(clips):
    video, positions = clips["video"], clips["positions"]  # (B, 9, 3, 32, 32), (B, 9, K, 2)
    mask = interpolation_mask(9)[None].expand(video.shape[0], -1)  # (B, T)
    fake = NearestFrame()(video, mask).roll(1, dims=-1)  # stale objects, shifted a pixel: errors and some misses
    rows = found_by_gap(fake, video, positions, mask)
    assert [r["gap"] for r in rows] == [1, 2, 3, 4]  # 9 frames, first and last given
    metric = TrajectoryError()
    metric.update(fake, video, positions, mask)
    total = metric.compute()
    n = sum(r["counted"] for r in rows)
    assert n == int(metric.n_counted)
    assert sum(r["found"] * r["counted"] for r in rows) / n == pytest.approx(float(total["traj_detected"]))
    assert sum(r["err_all_px"] * r["counted"] for r in rows) / n == pytest.approx(float(total["traj_err_all_px"]))
    found = [r["found"] * r["counted"] for r in rows]
    assert sum(r["err_px"] * f for r, f in zip(rows, found)) / sum(found) == pytest.approx(float(total["traj_err_px"]))


def test_truth_blank_and_a_frozen_copy(clips):
    video, positions = clips["video"], clips["positions"]
    mask = image_to_video_mask(9)[None].expand(video.shape[0], -1)  # gaps 1..8
    truth = found_by_gap(video, video, positions, mask)
    assert [r["gap"] for r in truth] == list(range(1, 9))
    assert all(r["found"] == 1.0 and r["err_px"] < 0.5 for r in truth)  # centroids of anti-aliased shapes
    blank = found_by_gap(torch.zeros_like(video), video, positions, mask)
    assert all(r["found"] == 0.0 and math.isnan(r["err_px"]) for r in blank)
    assert all(r["err_all_px"] == pytest.approx(miss_px(32, 32)) for r in blank)
    frozen = found_by_gap(NearestFrame()(video, mask), video, positions, mask)
    assert frozen[-1]["err_px"] > frozen[0]["err_px"]  # a copy of frame 0 falls further behind the moving objects
    dimmed = video * 0.85  # every colour off by up to ~0.15: the 0.2 tolerance loses objects, 0.4 keeps them
    strict = found_by_gap(dimmed, video, positions, mask)
    loose = found_by_gap(dimmed, video, positions, mask, tol=0.4)
    assert sum(r["found"] for r in loose) > sum(r["found"] for r in strict)


def test_markdown_has_a_row_per_gap_and_a_column_per_method(clips):
    video, positions = clips["video"], clips["positions"]
    mask = interpolation_mask(9)[None].expand(video.shape[0], -1)
    rows = found_by_gap(video, video, positions, mask)
    text = markdown({"truth": rows, "blank": found_by_gap(torch.zeros_like(video), video, positions, mask)})
    lines = text.splitlines()
    assert "truth: found" in lines[0] and "blank: found" in lines[0]
    assert len(lines) == 2 + len(rows) and lines[2].startswith("| 1 | ")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("synth_cli"), train=2, val=6, frames=12, size=32) / "val"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from mardini.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "joint.ckpt", frames=9, size=32)


def test_cli_scores_a_checkpoint_and_both_baselines(shards, ckpt, tmp_path, monkeypatch, capsys):
    tables = main(["--checkpoint", str(ckpt), "--data", str(shards), "--clips", "4", "--steps", "2", "--json"])
    assert set(tables) == {"linear_blend", "nearest_frame", "mardini"}
    assert tables["nearest_frame"][0]["found"] > 0.9  # a copy of the neighbour keeps every object
    assert tables["mardini"][0]["found"] < 0.5  # an untrained generator draws no object from noise
    assert '"gap": 1' in capsys.readouterr().out
    every_other = main(["--checkpoint", str(ckpt), "--data", str(shards), "--clips", "2", "--steps", "1", "--given",
                        "0,2,4,6,8", "--json"])
    assert [r["gap"] for r in every_other["nearest_frame"]] == [1]  # every generated frame next to a given one
    with pytest.raises(SystemExit, match="outside the window"):
        main(["--checkpoint", str(ckpt), "--given", "0,9"])
    with pytest.raises(SystemExit, match="--tol must be > 0"):
        main(["--checkpoint", str(ckpt), "--tol", "0"])
    with pytest.raises(SystemExit, match="--clips, --steps and --batch-size"):
        main(["--checkpoint", str(ckpt), "--steps", "0"])
    monkeypatch.chdir(tmp_path)  # the real held-out shards, which this folder does not have
    with pytest.raises(SystemExit, match="make_synthetic.py"):
        main(["--checkpoint", str(ckpt), "--clips", "2"])


def test_the_total_over_the_gaps_is_evaluate_py_s_found_share_at_any_batch_size(shards, ckpt, tmp_path):
    """found_by_gap reads the clips evaluate.py reads and samples clip k from evaluate.py's seed of clip k
    (protocol.clip_seeds), so its share found over all gaps is evaluate.py's traj_detected for the same checkpoint,
    seed, steps and eta, and its figures do not depend on --batch-size. Before, it sampled the validation loader's
    windows with seed + b per clip, and its totals differed from evaluate.py's."""
    from mardini.evaluation.cli import main as evaluate

    settings = ["--clips", "6", "--steps", "2", "--eta", "1", "--seed", "3", "--json"]
    by_two, by_four = (main(["--checkpoint", str(ckpt), "--data", str(shards), "--batch-size", b, *settings])
                       for b in ("2", "4"))
    assert by_four.keys() == by_two.keys()
    assert all(by_four[m] == [pytest.approx(r, nan_ok=True) for r in by_two[m]] for m in by_two)
    assert 0 < sum(r["found"] for r in by_two["mardini"])  # the untrained model finds a few: seeds matter
    out = tmp_path / "eval"
    assert evaluate(["--data", str(shards), "--checkpoint", str(ckpt), "--tasks", "interpolation", "--frames", "9",
                     "--resolution", "32", "--num-clips", "6", "--batch-size", "4", "--steps", "2", "--eta", "1",
                     "--seed", "3", "--metrics", "traj", "--cache-dir", "", "--out", str(out)]) == 0
    scored = json.loads((out / "report.json").read_text())["tasks"]["interpolation"]["results"]
    for method, rows in by_two.items():
        counted = sum(r["counted"] for r in rows)
        found = sum(r["found"] * r["counted"] for r in rows) / counted
        err_all = sum(r["err_all_px"] * r["counted"] for r in rows) / counted
        assert found == pytest.approx(scored[method]["traj_detected"]), method
        assert err_all == pytest.approx(scored[method]["traj_err_all_px"]), method  # a mean over the seeded samples


def test_by_size_splits_the_same_counts_by_object_area(clips):
    from mardini.evaluation.found_by_gap import found_by_size, size_markdown

    video, positions = clips["video"], clips["positions"]
    mask = interpolation_mask(9)[None].expand(video.shape[0], -1)
    fake = NearestFrame()(video, mask).roll(1, dims=-1)
    by_gap = found_by_gap(fake, video, positions, mask)
    by_size = found_by_size(fake, video, positions, mask, edges=(20.0, 35.0))
    assert sum(r["counted"] for r in by_size) == sum(r["counted"] for r in by_gap)  # every object in one bin
    for d in (1, 2, 3, 4):  # per gap, the bins add up to the gap's row
        n = sum(r["by_gap"][d][0] for r in by_size if d in r["by_gap"])
        k = sum(r["by_gap"][d][0] * r["by_gap"][d][1] for r in by_size if d in r["by_gap"])
        row = next(r for r in by_gap if r["gap"] == d)
        assert n == row["counted"] and k == pytest.approx(row["found"] * row["counted"])
    assert [r["area"][0] for r in by_size] == sorted(r["area"][0] for r in by_size)
    # A blur keeps the colour of large objects' insides and smears small ones away: the bins must show it.
    blurred = torch.nn.functional.avg_pool2d(video.flatten(0, 1), 3, 1, 1).view_as(video)  # (B, T, 3, H, W)
    small, large = found_by_size(blurred, video, positions, mask, edges=(35.0,))
    assert small["area"] == [0.0, 35.0] and large["area"] == [35.0, float("inf")]
    assert small["found"] < large["found"]
    text = size_markdown({"nearest_frame": by_size})
    assert text.splitlines()[0].startswith("| object area (px) |") and "| 0-20 |" in text
    with pytest.raises(ValueError, match="positive and increasing"):
        found_by_size(fake, video, positions, mask, edges=(35.0, 20.0))


def test_cli_by_size(shards, ckpt):
    out = main(["--checkpoint", str(ckpt), "--data", str(shards), "--clips", "4", "--steps", "1", "--by-size",
                "--size-edges", "30", "--json"])
    assert set(out) == {"by_gap", "by_size"} and set(out["by_size"]) == {"linear_blend", "nearest_frame", "mardini"}
    assert all(r["area"][0] in (0.0, 30.0) for r in out["by_size"]["nearest_frame"])
    with pytest.raises(SystemExit, match="size-edges"):
        main(["--checkpoint", str(ckpt), "--clips", "2", "--steps", "1", "--by-size", "--size-edges", "a,b"])


def test_cli_reads_a_non_square_checkpoints_clips_at_its_height_and_width(tmp_path, monkeypatch):
    """A 16x32 checkpoint is scored on 16x32 clips, not on squares of its height."""
    import mardini.evaluation.found_by_gap as found_by_gap
    from mardini.data.synthetic_shards import write_synthetic_split
    from mardini.testing import make_checkpoint

    write_synthetic_split(tmp_path / "synth", "val", 2, 2, frames=8, height=16, width=32, fps=16.0, progress=False)
    sizes = []
    read = found_by_gap.evaluation_batches

    def batches(data, n, frames, size, fps, batch_size):
        sizes.append(size)
        return read(data, n, frames, size, fps, batch_size)

    monkeypatch.setattr(found_by_gap, "evaluation_batches", batches)
    ckpt = make_checkpoint(tmp_path / "joint.ckpt", frames=5, size=(16, 32))  # records its 16x32 as train.py does
    tables = main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "synth" / "val"), "--clips", "2", "--steps",
                   "1", "--json"])
    assert sizes == [(16, 32)]
    assert set(tables) == {"linear_blend", "nearest_frame", "mardini"}

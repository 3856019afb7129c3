"""``make demo`` end to end at a tiny scale: every stage, the evaluation, the pictures and the report."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mardini import cpu_kernels
from mardini.demo.main import main
from mardini.strict_json import loads_strict

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end_and_rerun_reuses(tmp_path, monkeypatch):
    os.symlink(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    args = ["--scale", "0.01", "--train-clips", "100", "--eval-clips", "4", "--steps", "1", "--show", "1",
            "--no-progress"]
    assert main(args) == 0
    out = tmp_path / "outputs" / "demo"
    summary = loads_strict((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["01_dm_warmup_4f", "02_dm_warmup_9f", "03_mar_warmup", "04_joint_model",
                                       "05_joint_task"]
    assert not any(s["reused"] for s in summary["stages"].values())
    assert set(summary["results"]) == {"interpolation", "image_to_video"}
    assert {"linear_blend", "nearest_frame", "mardini"} <= set(summary["results"]["interpolation"])
    by_gap = summary["interpolation_found_by_gap"]  # 9 frames, first and last given: 1-4 frames from a given one
    assert set(by_gap) == {"linear_blend", "nearest_frame", "mardini"}
    assert all([r["gap"] for r in rows] == [1, 2, 3, 4] for rows in by_gap.values())
    assert by_gap["nearest_frame"][0]["found"] > 0.9  # a copy of the neighbour keeps the objects
    by_size = summary["interpolation_found_by_size"]  # the same objects, split by area
    assert set(by_size) == set(by_gap)
    assert sum(r["counted"] for r in by_size["mardini"]) == sum(r["counted"] for r in by_gap["mardini"])
    report = (out / "report.md").read_text()
    assert cpu_kernels.describe() in summary["machine"] and summary["machine"] in report  # which bf16 kernels ran
    for expected in ("## Training chain", "Does the model beat the baselines", "loss_curves.png", "eta 1.0",
                     "Where are the objects lost?", "| 1 | ", "| object area (px) |",
                     "samples/interpolation_sheet.png", "samples/image_to_video_sheet.png"):
        assert expected in report
    if not all(summary["beats_baselines"].values()):  # a 0.01-scale model fails some: the report says what helps
        assert "--final-steps N" in report
        named = re.search(r"`(configs/tiny/gpu/[\w.]+)`", report)  # the GPU route it names exists
        assert named and (Path(__file__).resolve().parents[1] / named.group(1)).is_file()
    for name in ("loss_curves.png", "samples/interpolation_sheet.png", "samples/interpolation_0.gif",
                 "samples/image_to_video_0.mp4"):
        assert (out / name).stat().st_size > 0
    # a second run reuses every finished stage
    assert main(args) == 0
    again = loads_strict((out / "summary.json").read_text())
    assert all(s["reused"] for s in again["stages"].values())
    # --final-steps lengthens the last stage only: it resumes there, every earlier stage is reused
    final = summary["stages"]["05_joint_task"]["steps"] + 2
    assert main([*args, "--final-steps", str(final)]) == 0
    longer = loads_strict((out / "summary.json").read_text())["stages"]
    assert [s["reused"] for s in longer.values()] == [True, True, True, True, False]
    assert longer["05_joint_task"]["steps"] == final
    from mardini.lit.checkpoints import read_checkpoint
    assert read_checkpoint(tmp_path / "outputs/tiny/05_joint_task/checkpoints/last.ckpt")["global_step"] == final


def test_demo_rejects_impossible_final_steps():
    with pytest.raises(SystemExit, match="--final-steps 0 is impossible"):
        main(["--final-steps", "0"])


def test_demo_rejects_impossible_train_clips_before_deleting_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained = _file(tmp_path / "outputs/tiny/05_joint_task/checkpoints/last.ckpt")
    with pytest.raises(SystemExit, match="--train-clips 0 is impossible"):
        main(["--fresh", "--train-clips", "0"])
    assert trained.exists()


class NoTraining(Exception):
    """Raised by the stand-in for the demo's training: the data step is all these tests run."""


def _no_training(name, **kwargs):
    raise NoTraining(name)


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    return path


def _demo_train_split(root: Path, clips: int) -> None:
    """The demo's synthetic train split under ``root`` (its settings), of ``clips`` clips."""
    from mardini.data import synthetic as S
    from mardini.data.synthetic_shards import write_synthetic_split

    write_synthetic_split(root, "train", clips, S.DEMO_TRAIN_PER_SHARD, frames=S.DEMO_FRAMES, height=S.DEMO_HEIGHT,
                          width=S.DEMO_WIDTH, fps=S.DEMO_FPS, progress=False)


def test_a_set_of_other_settings_is_one_error_naming_them_before_anything_is_deleted(tmp_path, monkeypatch, capsys):
    """``python -m mardini.demo --train-clips N`` over the set of an earlier demo (or ``data/make_synthetic.py``):
    one line naming what differs and what to do, exit code 2, the trained chain kept."""
    import runpy

    import mardini.demo.main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # a policy set: __main__ measures nothing, changes nothing
    monkeypatch.setenv("MARDINI_DEMO_WAIT_POLICY", "")  # what __main__ sets, restored after the test
    _demo_train_split(tmp_path / "data/shards/synthetic", 5)
    trained = _file(tmp_path / "outputs/tiny/05_joint_task/checkpoints/last.ckpt")
    monkeypatch.setattr(mardini.demo.main, "run_stage", _no_training)
    monkeypatch.setattr("sys.argv", ["mardini/demo/__main__.py", "--train-clips", "3", "--no-progress"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("mardini.demo", run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.startswith("python -m mardini.demo: error: data/shards/synthetic holds a synthetic set made with other "
                          "settings (train: clips 5 -> 3): add --fresh to rebuild it")
    assert trained.exists()


def test_fresh_rebuilds_a_set_of_other_settings(tmp_path, monkeypatch, capsys):
    """``--fresh --train-clips N`` over a set of another size starts over on a set of N clips (the synthetic set is
    derived and cheap); the split that agrees is kept."""
    import mardini.demo.main

    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "data/shards/synthetic"
    _demo_train_split(shards, 5)
    trained = _file(tmp_path / "outputs/tiny/05_joint_task/checkpoints/last.ckpt")
    monkeypatch.setattr(mardini.demo.main, "run_stage", _no_training)
    with pytest.raises(NoTraining):  # the data is built; the training comes next
        main(["--fresh", "--train-clips", "3", "--no-progress"])
    manifest = json.loads((shards / "train" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["clips"] == 3
    assert "train: made with other settings (clips 5 -> 3), rebuilt" in capsys.readouterr().out
    assert not trained.exists()
    val = sorted((shards / "val").glob("*.tar"))
    mtimes = [p.stat().st_mtime_ns for p in val]
    with pytest.raises(NoTraining):  # another size again: train rebuilt, val kept
        main(["--fresh", "--train-clips", "4", "--no-progress"])
    assert json.loads((shards / "train" / "manifest.json").read_text())["settings"]["clips"] == 4
    assert [p.stat().st_mtime_ns for p in val] == mtimes


def test_fresh_does_not_delete_data_the_demo_did_not_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = _file(tmp_path / "data/shards/synthetic/train/manifest.json")
    manifest.write_text(json.dumps({"settings": {"clip_frames": 16}}))  # another writer's (videos_to_shards.py)
    trained = _file(tmp_path / "outputs/tiny/05_joint_task/checkpoints/last.ckpt")
    with pytest.raises(ValueError, match="holds data the demo did not write .*; move it elsewhere"):
        main(["--fresh", "--no-progress"])
    assert manifest.exists() and trained.exists()


def test_verdict_checks_each_claim_against_every_baseline():
    from mardini.demo.report import verdict

    def task(model: dict, blend: dict, nearest: dict) -> dict:
        return {"results": {"linear_blend": blend, "nearest_frame": nearest, "mardini": model}}

    rows = verdict({
        "interpolation": task({"midf_psnr": 16.0, "midf_ssim": 0.6, "traj_err_all_px": 5.0},
                              {"midf_psnr": 15.0, "midf_ssim": 0.5, "traj_err_all_px": 14.0},
                              {"midf_psnr": 14.0, "midf_ssim": 0.7, "traj_err_all_px": 4.0}),
        "image_to_video": task({"traj_err_all_px": 9.0, "traj_motion_ratio": 0.8},
                               {"traj_err_all_px": 6.0, "traj_motion_ratio": 0.0},
                               {"traj_err_all_px": 6.0, "traj_motion_ratio": 0.01}),
    })
    got = {(t, m): ok for t, m, ok, _ in rows}
    assert got == {("interpolation", "midf_psnr"): True, ("interpolation", "midf_ssim"): False,
                   ("interpolation", "traj_err_all_px"): False, ("image_to_video", "traj_err_all_px"): False,
                   ("image_to_video", "traj_motion_ratio"): True}


def test_an_undefined_result_read_back_as_null_is_no_win_and_shows_as_a_dash():
    """evaluate.py's report.json is strict JSON: an undefined result (NaN, e.g. the motion ratio of a model that
    finds no object) comes back as None. It must read as NaN did (no win, "–"), not raise TypeError."""
    from mardini.demo.report import verdict

    results = {"linear_blend": {"traj_motion_ratio": 0.0}, "nearest_frame": {"traj_motion_ratio": None},
               "mardini": {"traj_motion_ratio": None}}
    rows = verdict({"image_to_video": {"results": results}})
    assert rows == [("image_to_video", "traj_motion_ratio", False,
                     "MarDini – vs linear_blend 0.0000, nearest_frame –")]


def test_stages_run_in_process_without_lightnings_chatter(tmp_path, monkeypatch):
    """The demo hands each stage its args in-process on purpose: LightningCLI's warning about it, Lightning's
    known harmless warnings and its info lines (tips, devices, seeds) are not shown; other warnings are, and the
    loggers get their levels back after the stage."""
    import logging
    import warnings

    import mardini.cli
    from mardini.demo.chain import run_stage

    class Ran(Exception):
        pass

    seen = {}

    def fake_cli(args):
        seen["info"] = logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.INFO)
        seen["seed_info"] = logging.getLogger("lightning.fabric.utilities.seed").isEnabledFor(logging.INFO)
        seen["warning"] = logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.WARNING)
        warnings.warn("LightningCLI's args parameter is intended to run from within Python like ...", UserWarning)
        warnings.warn('.fit(ckpt_path="last") is set, but there is no last checkpoint available.', UserWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning)
        warnings.warn("another warning", UserWarning)
        raise Ran(args)

    monkeypatch.setattr(mardini.cli, "main", fake_cli)
    monkeypatch.chdir(tmp_path)  # no finished stage here: it runs
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO)  # as Lightning sets it on import
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Ran):
            run_stage("01_dm_warmup_4f", REPO / "configs" / "tiny", max_steps=1, progress=False)
    assert [str(w.message) for w in caught] == ["another warning"]
    assert seen == {"info": False, "seed_info": False, "warning": True}
    assert logging.getLogger("lightning.pytorch").level == logging.INFO  # restored


def test_the_report_quotes_the_command_that_ran(monkeypatch):
    from mardini.demo.main import demo_command

    monkeypatch.setattr("sys.argv", ["mardini/demo/__main__.py", "--final-steps", "3900", "--out", "my dir"])
    assert demo_command(None) == "python -m mardini.demo --final-steps 3900 --out 'my dir'"
    monkeypatch.setattr("sys.argv", ["mardini/demo/__main__.py"])  # `make demo`
    assert demo_command(None) == "python -m mardini.demo"
    assert demo_command(["--scale", "0.05"]) == "python -m mardini.demo --scale 0.05"


def test_a_reused_stage_reports_the_steps_it_was_trained_for(monkeypatch, capsys):
    from mardini.demo import chain
    from mardini.demo.report import stage_table

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(chain, "finished_step", lambda checkpoint: 1300)  # an earlier, longer run
    run = chain.run_stage("05_joint_task", max_steps=500, progress=False)
    assert run.reused and run.steps == 1300  # what is evaluated, not the 500 asked for
    assert "reusing its checkpoint at step 1300, past the 500 asked for" in capsys.readouterr().out
    row = stage_table([run])[-1]
    assert "| 05_joint_task | MarDiniModule | 1300 | 9 | 35-100 % -> 15-60 % |" in row  # the curriculum's range


@pytest.mark.parametrize("out, what", [(".", "the folder the demo runs in"), ("..", "the folder the demo runs in"),
                                       ("home", "the home folder")])
def test_fresh_refuses_to_delete_the_checkout_or_the_home_folder(tmp_path, monkeypatch, out, what):
    """``--fresh --out .`` deleted the folder the demo runs in (the checkout): refused, nothing deleted."""
    import mardini.demo.main

    work = tmp_path / "checkout"
    monkeypatch.chdir(_file(work / "README.md").parent)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    kept = [_file(tmp_path / "home" / ".bashrc"), work / "README.md"]
    monkeypatch.setattr(mardini.demo.main, "run_stage", _no_training)
    out = str(tmp_path / "home") if out == "home" else out
    with pytest.raises(ValueError, match=f"--fresh deletes --out, and {re.escape(out)} is {what} or holds it"):
        main(["--fresh", "--out", out, "--train-clips", "2", "--no-progress"])
    assert all(p.exists() for p in kept)


def test_fresh_deletes_a_report_folder_only(tmp_path, monkeypatch):
    """A folder holding what the demo does not write is refused by name; a report folder (an interrupted run's
    too) is deleted."""
    import mardini.demo.main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mardini.demo.main, "run_stage", _no_training)
    mine = [_file(tmp_path / "mine" / name) for name in ("notes.txt", "report.md", "a.py")]
    with pytest.raises(ValueError, match=r"mine holds what the demo does not write there \(a.py, notes.txt\)"):
        main(["--fresh", "--out", "mine", "--train-clips", "2", "--no-progress"])
    assert all(p.exists() for p in mine)
    with pytest.raises(ValueError, match="--out mine/notes.txt is a file"):
        main(["--out", "mine/notes.txt", "--train-clips", "2", "--no-progress"])
    earlier = _file(tmp_path / "report" / "eval" / "report.json")  # an interrupted run's
    with pytest.raises(NoTraining):
        main(["--fresh", "--out", "report", "--train-clips", "2", "--no-progress"])
    assert not earlier.exists() and (tmp_path / "report").is_dir()


def test_an_eta_above_1_stops_the_demo_before_anything_runs(tmp_path, monkeypatch, capsys):
    """The demo's --eta reaches the evaluation only after the whole chain has trained: --eta 5 is refused first."""
    import mardini.demo.main as demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    monkeypatch.setattr(demo, "build_synthetic", lambda *a, **k: pytest.fail("the demo started with --eta 5"))
    assert demo.cli(["--eta", "5", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m mardini.demo: error: --eta=5.0 is impossible: DDIM's eta is in [0, 1]: "
                          "0 deterministic, 1 ancestral\n")
    assert not (tmp_path / "out").exists()


def _plot_losses_in_a_process(config_dir: Path, log_dir: Path, png: Path) -> subprocess.CompletedProcess:
    """The demo's loss curves of ``log_dir`` drawn to ``png`` by a new process whose matplotlib keeps its font list
    in ``config_dir`` (``MPLCONFIGDIR``); its output."""
    env = {**os.environ, "MPLCONFIGDIR": str(config_dir), "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO)}
    code = ("import sys; from pathlib import Path; from mardini.demo.curves import plot_losses;"
            "plot_losses([('stage', Path(sys.argv[1]))], Path(sys.argv[2]))")
    return subprocess.run([sys.executable, "-c", code, str(log_dir), str(png)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_loss_curves_log_no_findfont_line_under_a_font_list_without_matplotlib_s_fonts(tmp_path):
    """matplotlib trusts the per-user font list any installation writes; the demo machine's listed the system's
    DejaVu alone, and the pictures step logged 21 lines "findfont: Font family ['STIXGeneral'] not found. Falling back
    to DejaVu Sans." (mathtext's fonts, looked up for the log axes' tick labels). The demo's curves now add
    matplotlib's own fonts where the list lacks them: no such line, and the PNG is byte for byte the one a whole
    list gives."""
    import matplotlib
    from matplotlib import font_manager
    from torch.utils.tensorboard import SummaryWriter

    logs = tmp_path / "logs"
    with SummaryWriter(str(logs)) as writer:
        for step in range(20):
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)
        writer.add_scalar("val/loss", 0.2, 10)
    stale = copy.copy(font_manager.fontManager)  # the fonts of the system, none of matplotlib's own
    ours = os.path.join(os.path.realpath(matplotlib.get_data_path()), "")
    stale.ttflist = [f for f in stale.ttflist if not os.path.realpath(f.fname).startswith(ours)]
    stale.afmlist = [f for f in stale.afmlist if not os.path.realpath(f.fname).startswith(ours)]
    (tmp_path / "stale").mkdir()
    font_manager.json_dump(stale, tmp_path / "stale" / f"fontlist-v{font_manager.FontManager.__version__}.json")
    done = _plot_losses_in_a_process(tmp_path / "stale", logs, tmp_path / "stale.png")
    assert done.returncode == 0, done.stderr
    assert "findfont" not in done.stdout + done.stderr, done.stderr
    whole = _plot_losses_in_a_process(tmp_path / "whole", logs, tmp_path / "whole.png")  # a list built afresh
    assert whole.returncode == 0 and "findfont" not in whole.stderr, whole.stderr
    assert (tmp_path / "stale.png").read_bytes() == (tmp_path / "whole.png").read_bytes()

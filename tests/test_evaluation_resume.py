"""``evaluate.py`` rerun into the same ``--out`` resumes a stopped run: finished tasks kept, the unfinished one goes
on from its last save, and the report equals one uninterrupted run's (before, every rerun started from zero)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mardini.data.testing import tiny_synthetic
from mardini.evaluation import cli, task_run
from mardini.metrics.stand_ins import FramePool, VideoPool

METHODS = 3  # linear_blend, nearest_frame, mardini: one check_finite call each per batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mardini.testing import make_checkpoint

    root = tmp_path_factory.mktemp("resume")
    shards = tiny_synthetic(root / "synth", train=2, val=6, frames=12, size=16) / "val"
    ckpt = make_checkpoint(root / "joint.ckpt", "joint", frames=9, size=16)
    return shards, ckpt


@pytest.fixture
def stand_in_networks(monkeypatch):
    """FVD/FID on small stand-in networks, no weight files."""
    run_task = cli.run_task
    monkeypatch.setattr(cli, "metric_weights", lambda args: {})
    monkeypatch.setattr(cli, "run_task", lambda *a, **k: run_task(*a, networks={"fvd": VideoPool(),
                                                                                 "fid": FramePool()}, **k))


def argv(shards, ckpt, out, *extra, cache: str = ""):
    return ["--data", str(shards), "--tasks", "interpolation", "image_to_video", "--frames", "9", "--resolution",
            "16", "--num-clips", "6", "--batch-size", "2", "--save-every", "2", "--metrics", "fvd", "fid", "midf",
            "traj", "--checkpoint", str(ckpt), "--steps", "2", "--eta", "1", "--device", "cpu", "--cache-dir", cache,
            "--out", str(out), *extra]


def stop_at(monkeypatch, call: int) -> list[int]:
    """Make the ``call``-th method output of the run raise (a preemption mid-batch); returns the call counter."""
    check, calls = task_run.check_finite, [0]

    def counted(*a, **k):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("preempted")
        return check(*a, **k)

    monkeypatch.setattr(task_run, "check_finite", counted)  # where run_task calls it
    return calls


def stopped_run(monkeypatch, shards, ckpt, tmp_path) -> Path:
    """``tmp_path / "stopped"``: an evaluation stopped in the first task's 2nd batch, its first batch saved."""
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        stop_at(m, METHODS + 1)
        with pytest.raises(RuntimeError, match="preempted"):
            cli.main(argv(shards, ckpt, out))
    return out


def without_timings(report: dict) -> dict:
    """The report less what a resume may change (sampling seconds: both runs' added; the machine's name) and the
    command (its --out differs here)."""
    tasks = {t: {k: v for k, v in res.items() if k != "seconds_per_clip"} for t, res in report["tasks"].items()}
    return {**{k: v for k, v in report.items() if k not in ("device_name", "command")}, "tasks": tasks}


@pytest.mark.parametrize("cached", [False, True], ids=["real-side-accumulated", "real-side-from-cache"])
def test_a_rerun_resumes_the_stopped_task_and_reports_what_one_run_does(setup, tmp_path, monkeypatch, capsys,
                                                                        stand_in_networks, cached):
    shards, ckpt = setup
    cache = str(tmp_path / "cache") if cached else ""
    for _ in range(1 + cached):  # with a cache: the second run reads the real statistics the first one wrote
        assert cli.main(argv(shards, ckpt, tmp_path / "one", cache=cache)) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert one["tasks"]["image_to_video"]["real_stats_cache"] == ("hit" if cached else "computed")
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:  # interpolation done (3 batches), image_to_video stopped inside its 3rd batch
        stop_at(m, 3 * METHODS + 2 * METHODS + 2)
        with pytest.raises(RuntimeError, match="preempted"):
            cli.main(argv(shards, ckpt, out, cache=cache))
    assert json.loads((out / "report.json").read_text())["status"] == "partial"
    assert (out / "state" / "image_to_video.pt").is_file()
    capsys.readouterr()
    calls = stop_at(monkeypatch, -1)  # counts only
    assert cli.main(argv(shards, ckpt, out, cache=cache)) == 0
    err = capsys.readouterr().err
    assert f"resuming the evaluation in {out}: interpolation finished, kept" in err
    assert f"resuming image_to_video at clip 4 of 6 from {out / 'state' / 'image_to_video.pt'}" in err
    assert calls[0] == METHODS  # only the last batch of image_to_video was sampled again
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["status"] == "complete" and not (out / "state").exists()
    assert without_timings(resumed) == without_timings(one)  # FVD, FID, MidF, traj, clip_list: to the last digit
    assert set(resumed["tasks"]["image_to_video"]["seconds_per_clip"]) == {"linear_blend", "nearest_frame", "mardini"}


def test_a_rerun_with_other_settings_is_refused_until_fresh(setup, tmp_path, monkeypatch, capsys, stand_in_networks):
    shards, ckpt = setup
    out = stopped_run(monkeypatch, shards, ckpt, tmp_path)
    capsys.readouterr()
    assert cli.main(argv(shards, ckpt, out, "--seed", "1", "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert f"{out} holds a stopped evaluation of other settings (seed 0 -> 1; steps 2 -> 1)" in err
    assert "another --out" in err and "--fresh" in err
    assert (out / "state" / "interpolation.pt").is_file()  # nothing of the stopped run was touched
    assert cli.main(argv(shards, ckpt, out, "--seed", "1", "--steps", "1", "--fresh")) == 0
    assert "resuming" not in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["seed"] == 1


def test_a_partial_report_without_resume_state_is_refused_and_a_complete_one_rerun(setup, tmp_path, capsys):
    shards, _ = setup
    out = tmp_path / "r"
    run = ["--data", str(shards), "--tasks", "interpolation", "--resolution", "16", "--num-clips", "2",
           "--metrics", "midf", "--cache-dir", "", "--out", str(out)]
    assert cli.main(run) == 0
    assert "evaluating again" not in capsys.readouterr().err
    assert cli.main(run) == 0  # complete: evaluated again, as before
    assert f"{out} holds a complete report; evaluating again" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    (out / "report.json").write_text(json.dumps({**report, "status": "partial"}))  # an older evaluate.py's
    assert cli.main(run) == 2
    assert "partial report without the state to resume it" in capsys.readouterr().err
    assert cli.main([*run, "--fresh"]) == 0


def test_save_every_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--data", "synthetic", "--save-every", "0"])
    assert "--save-every 0 is impossible" in capsys.readouterr().err


def _videos(root) -> tuple[str, list[str]]:
    """A folder of 6 short videos and an unusable file among them (before the resume point of the test below)."""
    from mardini.data.testing import moving_frames, write_video

    for i in range(6):
        write_video(root / f"v{i}.mp4", moving_frames(10, 16, 16, seed=i), 10)
    (root / "v1_broken.mp4").write_bytes(b"not a video")
    return str(root), sorted(str(p) for p in root.iterdir())


def _count_decodes(monkeypatch, kind: str) -> Counter:
    """Count, per video file or shard sample key, the times a clip is decoded."""
    from mardini.data.stream import ClipStream
    from mardini.evaluation import data

    read: Counter = Counter()
    if kind == "videos":
        window = data.read_video_window
        monkeypatch.setattr(data, "read_video_window", lambda path, *a: read.update([path]) or window(path, *a))
    else:
        decode = ClipStream.decode_pixels
        monkeypatch.setattr(ClipStream, "decode_pixels",
                            lambda self, raw, gen: read.update([raw["__key__"]]) or decode(self, raw, gen))
    return read


@pytest.mark.parametrize("kind", ["videos", "shards"])
def test_a_resumed_run_does_not_decode_the_clips_done_again(tmp_path, monkeypatch, capsys, kind):
    """A rerun decoded every clip done again, only to skip it. It now reads on after the source items of the clips
    done (the video files, or the shards' raw samples, read through them): each clip done is decoded once, by the
    clip count every run makes first, and the report, skipped files included, is still one uninterrupted run's."""
    if kind == "videos":
        source, items = _videos(tmp_path / "videos")
    else:
        source = str(tiny_synthetic(tmp_path / "synth", train=2, val=6, frames=12, size=16) / "val")
    run = ["--data", source, "--tasks", "interpolation", "--frames", "9", "--resolution", "16", "--num-clips", "6",
           "--batch-size", "2", "--save-every", "2", "--metrics", "midf", "--cache-dir", ""]
    assert cli.main([*run, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:  # stopped inside the 3rd batch, the first 4 clips saved
        stop_at(m, 2 * 2 + 1)  # two baselines per batch
        with pytest.raises(RuntimeError, match="preempted"):
            cli.main([*run, "--out", str(out)])
    read = _count_decodes(monkeypatch, kind)
    assert cli.main([*run, "--out", str(out)]) == 0
    assert "resuming interpolation at clip 4 of 6" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    keys = [c["key"] for c in report["clip_list"]]
    if kind == "videos":
        assert sorted(read) == items  # the count reads every file, the unusable one included
    assert {k: n for k, n in read.items() if n > 1} == {k: 2 for k in keys[4:]}  # the count's read, and the task's
    assert without_timings(report) == without_timings(one)
    if kind == "videos":
        assert any("broken" in f for f in one["tasks"]["interpolation"]["skipped_videos"])


def test_a_stopped_run_of_other_code_or_state_format_is_refused_naming_it(setup, tmp_path, monkeypatch, capsys,
                                                                         stand_in_networks):
    """After a `git pull`, a stopped run is refused naming the code that started it and how to finish it (it said
    'rerun it with its own settings', which no setting does); a run.json of a newer state format names it; one of
    format 0 (written before format_version was recorded) holds what format 1 does and resumes."""
    shards, ckpt = setup
    out = stopped_run(monkeypatch, shards, ckpt, tmp_path)
    run_json = out / "state" / "run.json"
    saved = json.loads(run_json.read_text())
    assert saved["format_version"] == 1
    old = "0123456789abcdef0123456789abcdef01234567"
    run_json.write_text(json.dumps({"settings": {**saved["settings"], "code": {"version": "0.1.0", "git_commit": old}},
                                    "report": saved["report"]}))  # an older commit's run.json: no format_version
    capsys.readouterr()
    assert cli.main(argv(shards, ckpt, out)) == 2
    err = capsys.readouterr().err
    assert f"{out} holds a stopped evaluation started by mardini 0.1.0, commit 0123456789ab, this evaluate.py is" in err
    assert f"Finish it with the code that started it (git checkout {old}" in err and "--fresh" in err
    assert "its own settings" not in err
    run_json.write_text(json.dumps({**saved, "format_version": 99}))
    assert cli.main(argv(shards, ckpt, out)) == 2
    assert "saved in resume-state format 99, this evaluate.py reads format 1 (newer code wrote it" in \
        capsys.readouterr().err
    run_json.write_text(json.dumps({**saved, "format_version": "1"}))  # edited by hand: was a TypeError
    assert cli.main(argv(shards, ckpt, out)) == 2
    assert "records resume-state format '1', not a whole number" in capsys.readouterr().err
    run_json.write_text(json.dumps({k: v for k, v in saved.items() if k != "format_version"}))  # format 0, this code
    assert cli.main(argv(shards, ckpt, out)) == 0
    assert f"resuming interpolation at clip 2 of 6 from {out / 'state' / 'interpolation.pt'}" in capsys.readouterr().err


def test_outside_a_git_checkout_a_stopped_run_of_changed_sources_is_refused(setup, tmp_path, monkeypatch, capsys,
                                                                           stand_in_networks):
    """Outside a git checkout (a wheel, a tarball) the code was recorded as the package version alone, so a stopped
    evaluation resumed with changed code, of the same version, was accepted. The sources' digest decides there now."""
    from mardini import run_info

    shards, ckpt = setup
    monkeypatch.setattr(cli, "code_version", lambda: run_info.code_version(tmp_path))  # tmp_path: no repository
    out = stopped_run(monkeypatch, shards, ckpt, tmp_path)
    monkeypatch.setattr(run_info, "source_digest", lambda: "sha256:0123456789abcdef", raising=False)  # code changed
    capsys.readouterr()
    assert cli.main(argv(shards, ckpt, out)) == 2  # was 0: resumed
    err = capsys.readouterr().err
    saved = json.loads((out / "state" / "run.json").read_text())["settings"]["code"]
    assert saved["git_commit"] is None and saved["source"].startswith("sha256:")
    assert (f"started by mardini {saved['version']}, no git commit (not a git checkout), source {saved['source']}, "
            "this evaluate.py is") in err and "source sha256:0123456789abcdef" in err
    assert f"the install or copy of the package whose sources digest to {saved['source']}" in err


def test_the_source_digest_changes_with_any_python_file_of_the_package(tmp_path):
    from mardini.run_info import source_digest

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    before = source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert source_digest(tmp_path) == before  # Python sources only
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert source_digest(tmp_path) != before

"""sample.py --list: many clips in one command, seeded and named by their index in the list, sliced between jobs,
resumed after a kill, unreadable clips skipped and counted (mardini.pipeline.many)."""

from __future__ import annotations

import json
import os
import runpy
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mardini.data.sharding import atomic_tar, json_bytes
from mardini.data.synthetic_shards import write_synthetic_split
from mardini.data.testing import moving_frames, write_video
from mardini.pipeline.cli import main
from pipeline_helpers import killed_on_the_second_gif, make_checkpoint, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    """A tiny joint checkpoint, four good clips (three images and a video) and two unreadable ones."""
    root = tmp_path_factory.mktemp("list")
    frames = moving_frames(8, 16, 16)  # (T, H, W, 3) uint8
    for i in range(3):
        Image.fromarray(frames[2 * i]).save(root / f"img {i}.png")  # a space: the list quotes it
    write_video(root / "clip.mp4", frames, 8)
    (root / "broken.png").write_text("not an image")
    write_synthetic_split(root / "my shards", "val", 3, 2, frames=8, height=16, width=16, fps=8.0, progress=False)
    good = [f'"{root / "img 0.png"}"', f'"{root / "img 1.png"}"', str(root / "clip.mp4"), f'"{root / "img 2.png"}"']
    return {"root": root, "ckpt": str(make_checkpoint(root / "joint.ckpt", "joint", frames=5, size=16)),
            "good": good, "bad": [str(root / "missing.png"), str(root / "broken.png")],
            "shards": str(root / "my shards" / "val")}


def _list(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "clips.txt"
    path.write_text("# one clip per line\n" + "\n".join(lines) + "\n\n")
    return str(path)


def _run(env, out, clips, *args):
    return main(["image_to_video", "--ckpt", env["ckpt"], "--list", clips, "--steps", "1", "--no-progress",
                 "--png", "--out", str(out), *args])


def _frames(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))]).astype(int)


def _manifest(path) -> dict[int, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {e["index"]: e for e in lines if "index" in e}


def test_each_clip_is_seeded_and_named_by_its_index_and_bad_clips_are_skipped_and_counted(env, tmp_path, capsys):
    clips = _list(tmp_path, [env["good"][0], env["bad"][0], env["bad"][1], env["good"][1], env["good"][2]])
    record = _run(env, tmp_path / "out", clips, "--batch", "2", "--seed", "10")
    out = tmp_path / "out"
    assert record["sampled"] == 3 and record["skipped"] == 2 and record["clips"] == 5
    assert [s["index"] for s in record["skipped_clips"]] == [1, 2]
    assert "does not exist" in record["skipped_clips"][0]["error"]
    assert "could not be read as an image" in record["skipped_clips"][1]["error"]
    assert "2 skipped" in capsys.readouterr().out
    entries = _manifest(out / "manifest.jsonl")
    assert {i: e["status"] for i, e in entries.items()} == {0: "done", 1: "skipped", 2: "skipped", 3: "done", 4: "done"}
    assert entries[3]["seed"] == 13 and entries[3]["input"] == [str(env["root"] / "img 1.png")]
    assert entries[3]["files"] == [str(out / "image_to_video_000003_0.mp4"), str(out / "image_to_video_000003_0.gif"),
                                   str(out / "frames" / "image_to_video_000003_0")]
    alone = tmp_path / "alone"  # clip 3 sampled by itself, with its seed: the same frames up to --batch's rounding
    main(["image_to_video", "--ckpt", env["ckpt"], "--images", str(env["root"] / "img 1.png"), "--seed", "13",
          "--steps", "1", "--no-progress", "--png", "--out", str(alone)])
    together = _frames(out / "frames" / "image_to_video_000003_0")
    assert np.abs(together - _frames(alone / "frames" / "image_to_video_000")).max() <= 1


def test_slices_share_one_folder_and_give_what_one_job_gives(env, tmp_path):
    clips = _list(tmp_path, env["good"])
    for i in range(2):
        _run(env, tmp_path / "sliced", clips, "--batch", "1", "--slice-index", str(i), "--num-slices", "2")
    _run(env, tmp_path / "one", clips, "--batch", "1")
    sliced, one = tmp_path / "sliced", tmp_path / "one"
    assert sorted(_manifest(sliced / "manifest_0-of-2.jsonl")) == [0, 2]
    assert sorted(_manifest(sliced / "manifest_1-of-2.jsonl")) == [1, 3]
    for i in range(4):
        name = f"image_to_video_{i:06d}_0"
        assert np.array_equal(_frames(sliced / "frames" / name), _frames(one / "frames" / name))


def test_a_killed_job_resumes_without_redoing_clips_or_leaving_half_written_files(env, tmp_path, monkeypatch):
    import mardini.visualize
    from mardini.pipeline.pipeline import MarDiniPipeline

    clips, out = _list(tmp_path, env["good"]), tmp_path / "out"
    save_gif = mardini.visualize.save_gif
    monkeypatch.setattr(mardini.visualize, "save_gif", killed_on_the_second_gif(save_gif))
    with pytest.raises(KeyboardInterrupt):
        _run(env, out, clips, "--batch", "1")
    assert not list(out.rglob("*.part*")) and not (out / "image_to_video_000001_0.gif").exists()
    assert sorted(_manifest(out / "manifest.jsonl")) == [0]
    monkeypatch.setattr(mardini.visualize, "save_gif", save_gif)
    sampled, generate = [], MarDiniPipeline.generate
    monkeypatch.setattr(MarDiniPipeline, "generate", lambda self, video, mask, **kw: (
        sampled.append(video.shape[0]), generate(self, video, mask, **kw))[1])
    record = _run(env, out, clips, "--batch", "1")
    assert sum(sampled) == 3 and record["done_before"] == 1 and record["sampled"] == 3
    assert sorted(p.name for p in out.glob("*.gif")) == [f"image_to_video_{i:06d}_0.gif" for i in range(4)]


def test_resuming_with_other_options_a_changed_list_or_impossible_slices_is_refused(env, tmp_path):
    clips, out = _list(tmp_path, env["good"][:1]), tmp_path / "out"
    _run(env, out, clips)
    with pytest.raises(ValueError, match="other options \\(manifest.jsonl: --steps 1 there, 2 here\\); resume"):
        main(["image_to_video", "--ckpt", env["ckpt"], "--list", clips, "--steps", "2", "--png", "--out", str(out)])
    _list(tmp_path, env["good"][1:2])  # the line of the clip done names another file now
    with pytest.raises(ValueError, match="changed since clips were sampled from it: clip 0 was .*img 0.png, now"):
        _run(env, out, clips)
    with pytest.raises(ValueError, match="--slice-index 2 is not below --num-slices 2"):
        _run(env, out, clips, "--slice-index", "2", "--num-slices", "2")
    with pytest.raises(ValueError, match="give the clips as --list FILE"):
        main(["image_to_video", "--ckpt", env["ckpt"], "--images", "a.png", "--num-slices", "2"])


def _sample_py(monkeypatch, *argv) -> int:
    """``python sample.py ARGV``'s exit status, run in this process through the script itself."""
    monkeypatch.setattr(sys, "argv", ["sample.py", *argv])
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(Path(__file__).parents[1] / "sample.py"), run_name="__main__")
    return ended.value.code


def test_a_job_that_skipped_clips_exits_with_status_1_unless_max_skipped_allows_them(env, tmp_path, monkeypatch,
                                                                                     capsys):
    """Before, a job whose clips were all skipped exited with status 0: a cluster script could not notice."""
    clips, out = _list(tmp_path, [env["good"][0], env["bad"][0]]), tmp_path / "out"
    argv = ["image_to_video", "--ckpt", env["ckpt"], "--list", clips, "--steps", "1", "--no-progress", "--out",
            str(out)]
    assert _sample_py(monkeypatch, *argv) == 1
    err = capsys.readouterr().err
    assert "sample.py: error: 1 clip(s) of slice 0 of 1 were skipped, more than --max-skipped 0 allows" in err
    assert _manifest(out / "manifest.jsonl")[1]["status"] == "skipped"  # written all the same
    assert json.loads((out / "settings.json").read_text())["skipped"] == 1
    assert _sample_py(monkeypatch, *argv, "--max-skipped", "1") == 0  # the bad clip is tried again, and allowed
    assert "error" not in capsys.readouterr().err
    assert _sample_py(monkeypatch, *argv[:3], "--images", "a.png", "--max-skipped", "1") == 2
    assert "--max-skipped bounds the unreadable clips a --list job may skip" in capsys.readouterr().err


def test_a_second_live_job_of_a_slice_is_refused_and_a_dead_job_s_lock_taken_over(env, tmp_path, monkeypatch):
    """Before, two jobs started with the same --slice-index (a requeue while the first ran) wrote the same files."""
    from mardini.pipeline.pipeline import MarDiniPipeline

    clips, out = _list(tmp_path, env["good"][:2]), tmp_path / "out"
    lock = out / "sample_0-of-2.lock"
    out.mkdir()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": "77",
                                "started": "then", "token": "other"}))  # a live job: this process
    with pytest.raises(ValueError, match=rf"--slice-index 0 --num-slices 2 of --out {out} is being sampled by another "
                       rf"sample.py job \(pid {os.getpid()} on host .*, SLURM job 77, started then; lock file"):
        _run(env, out, clips, "--slice-index", "0", "--num-slices", "2")
    assert not list(out.glob("manifest*"))  # refused before anything was written
    old = time.time() - 3600
    os.utime(lock, (old, old))  # no heartbeat for an hour: that job is gone
    seen, generate = [], MarDiniPipeline.generate
    monkeypatch.setattr(MarDiniPipeline, "generate", lambda self, video, mask, **kw: (
        seen.append(json.loads(lock.read_text())["pid"]), generate(self, video, mask, **kw))[1])
    with pytest.warns(UserWarning, match="taking over the lock of a sample.py job that is gone"):
        record = _run(env, out, clips, "--slice-index", "0", "--num-slices", "2")
    assert record["sampled"] == 1 and seen == [os.getpid()] and not lock.exists()  # held while sampling, then freed


def _live_lock(path) -> None:
    """A lock at ``path`` of a live job (this process) that is not this run's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "then",
                                "token": "other"}))


@pytest.mark.parametrize("theirs", ["sample_0-of-4.lock", "sample.lock"])
def test_a_job_of_another_slicing_is_refused_while_one_lives_in_the_folder_and_not_after_it(env, tmp_path, theirs):
    """Slice 0 of 2 and slice 0 of 4 took different locks, so both ran in one --out: they share clips (0, 4, ...)
    and one's leftovers clean-up removed the other's in-flight .part files. A live lock of another slicing now refuses
    the job before it writes anything (naming it and the fixes); a dead one's does not."""
    clips, out = _list(tmp_path, env["good"][:2]), tmp_path / "out"
    other = out / theirs
    _live_lock(other)
    in_flight = out / "image_to_video_000000_0.part.gif"  # the other job's clip 0, being written
    in_flight.write_bytes(b"half")
    n = 4 if "of-4" in theirs else 1
    with pytest.raises(ValueError, match=rf"--slice-index 0 --num-slices 2 of --out {out}: another sample.py job "
                       rf"\(pid {os.getpid()} on host .*; lock file {other}\) samples this folder in {n} slice"):
        _run(env, out, clips, "--slice-index", "0", "--num-slices", "2")
    assert in_flight.exists() and not list(out.glob("manifest*")) and not (out / "sample_0-of-2.lock").exists()
    old = time.time() - 3600
    os.utime(other, (old, old))  # no heartbeat for an hour: that job is gone
    record = _run(env, out, clips, "--slice-index", "0", "--num-slices", "2")
    assert record["sampled"] == 1 and other.exists()  # the dead job's lock is left to its own slicing's takeover


def test_jobs_of_one_slicing_run_beside_each_other(env, tmp_path):
    clips, out = _list(tmp_path, env["good"][:2]), tmp_path / "out"
    _live_lock(out / "sample_1-of-2.lock")
    assert _run(env, out, clips, "--slice-index", "0", "--num-slices", "2")["sampled"] == 1


def test_a_killed_job_s_part_files_of_the_slice_s_clips_are_removed_never_another_slice_s(env, tmp_path, capsys):
    """Before, a kill left ``x.part.mp4`` / ``.part.gif`` / ``frames/x.part/`` behind for a clip never rerun."""
    clips, out = _list(tmp_path, [env["good"][0], env["good"][1], env["bad"][0]]), tmp_path / "out"
    mine = [out / "image_to_video_000002_0.part.gif", out / "image_to_video_000002_1.part.mp4",
            out / "frames" / "image_to_video_000002_0.part"]  # clip 2 (slice 0's) is skipped: never written again
    others = [out / "image_to_video_000001_0.part.mp4", out / "frames" / "image_to_video_000001_0.part",  # slice 1's
              out / "interpolate_000002_0.part.mp4", out / "image_to_video_000002_0.gif"]  # another task's; a file
    (out / "frames" / "image_to_video_000002_0.part").mkdir(parents=True)
    (out / "frames" / "image_to_video_000001_0.part").mkdir()
    for path in mine + others:
        if not path.is_dir():
            path.write_bytes(b"half")
    record = _run(env, out, clips, "--slice-index", "0", "--num-slices", "2", "--max-skipped", "1")
    assert record["sampled"] == 1 and record["skipped"] == 1
    assert not any(p.exists() for p in mine) and all(p.exists() for p in others)
    assert f"removed {mine[0]}: a killed job's half-written file" in capsys.readouterr().out
def test_a_manifest_line_cut_short_by_a_kill_does_not_swallow_the_next(tmp_path):
    """A kill in the middle of a manifest line left it without its newline, and the next run's first line was
    appended to it: both were one undecodable line, so that clip was counted as not done and sampled again on every
    rerun. The cut line is ended first now."""
    from mardini.pipeline.many import append_line, read_manifests

    manifest = tmp_path / "manifest.jsonl"
    append_line(manifest, {"settings": {"seed": 0}})
    with open(manifest, "a", encoding="utf-8") as f:
        f.write('{"index": 0, "input": ["a.png"], "sta')  # killed mid-line
    append_line(manifest, {"index": 1, "input": ["b.png"], "status": "done", "files": []})
    assert list(read_manifests(tmp_path, {"seed": 0})) == [1]


def _shard_list(env, tmp_path) -> tuple[str, list[str]]:
    """The list ``python -m mardini.pipeline.shard_clips`` writes of the module's shards, and its clips."""
    from mardini.pipeline.many import read_list
    from mardini.pipeline.shard_clips import main as list_clips

    path = tmp_path / "shard clips.txt"
    assert list_clips([env["shards"], "--out", str(path)]) == 0
    return str(path), [" ".join(paths) for paths in read_list(path)]


def test_shard_clips_listed_by_key_are_sampled_slice_by_slice_as_shards_mode_samples_them(env, tmp_path):
    """``--shards DIR --clips N`` held every clip and sample in memory, could not be sliced and wrote no manifest.
    A list of ``SHARD.tar#KEY`` lines (python -m mardini.pipeline.shard_clips) samples them clip by clip, in
    slices, each clip seeded --seed + its line's index: the frames the --shards mode gives it."""
    clips, lines = _shard_list(env, tmp_path)
    shards = sorted(Path(env["shards"]).glob("*.tar"))
    assert lines == [f"{shards[0]}#val-0000000", f"{shards[0]}#val-0000001", f"{shards[1]}#val-0000002"]
    assert "'" in Path(clips).read_text()  # the folder's space is quoted
    sliced = tmp_path / "sliced"
    for i in range(2):
        _run(env, sliced, clips, "--batch", "1", "--seed", "10", "--slice-index", str(i), "--num-slices", "2")
    entries = {**_manifest(sliced / "manifest_0-of-2.jsonl"), **_manifest(sliced / "manifest_1-of-2.jsonl")}
    assert {i: (e["status"], e["seed"], e["input"]) for i, e in entries.items()} == {
        i: ("done", 10 + i, [line]) for i, line in enumerate(lines)}
    assert "clip val-0000002 of" in entries[2]["inputs"][0]
    whole = tmp_path / "whole"
    main(["image_to_video", "--ckpt", env["ckpt"], "--shards", env["shards"], "--clips", "3", "--batch", "1",
          "--seed", "10", "--steps", "1", "--no-progress", "--png", "--out", str(whole)])
    for i in range(3):
        assert np.array_equal(_frames(sliced / "frames" / f"image_to_video_{i:06d}_0"),
                              _frames(whole / "frames" / f"image_to_video_{i:03d}"))


def test_unreadable_shard_clips_are_skipped_and_counted_and_a_rerun_resumes(env, tmp_path):
    """Old code read every ``SHARD.tar#KEY`` line as an image file. Each unreadable shard clip (a key its shard does
    not hold, a missing shard, a corrupt sample, a shard named without a clip) is skipped with its reason now; the
    good ones are sampled once, a rerun samples nothing again."""
    _, lines = _shard_list(env, tmp_path)
    bad_shard = tmp_path / "bad.tar"
    with atomic_tar(bad_shard) as sink:
        sink.write({"__key__": "broken", "json": json_bytes({"fps": 8.0, "frames": 8}), "video.npy": b"not npy"})
    first_shard = lines[0].split("#")[0]
    clips = _list(tmp_path, [f'"{lines[1]}"', f'"{first_shard}#nope"', f"{tmp_path}/gone.tar#val-0000000",
                             f"{bad_shard}#broken", f'"{first_shard}"'])
    out = tmp_path / "out"
    record = _run(env, out, clips, "--max-skipped", "4")
    assert record["sampled"] == 1 and record["skipped"] == 4
    errors = [s["error"] for s in record["skipped_clips"]]
    assert "holds no clip 'nope'" in errors[0] and "gone.tar does not exist" in errors[1]
    assert "clip broken of shard" in errors[2] and "is a shard, not a clip: name one of its clips" in errors[3]
    assert _manifest(out / "manifest.jsonl")[0]["seed"] == 0
    again = _run(env, out, clips, "--max-skipped", "4")
    assert again["sampled"] == 0 and again["done_before"] == 1 and again["skipped"] == 4


def test_shard_clips_are_read_as_their_batch_needs_them_not_all_first(env, tmp_path, monkeypatch):
    """``--shards --clips N`` read all N clips before sampling the first; a list of shard clips reads a clip when its
    batch fills (one read ahead of the batch: the read that shows the batch is full), so memory holds one batch."""
    import mardini.pipeline.cli
    from mardini.pipeline.pipeline import MarDiniPipeline

    clips, _ = _shard_list(env, tmp_path)
    events, read, generate = [], mardini.pipeline.cli.read_shard_clip, MarDiniPipeline.generate
    monkeypatch.setattr(mardini.pipeline.cli, "read_shard_clip", lambda *a: (events.append("read"), read(*a))[1])
    monkeypatch.setattr(MarDiniPipeline, "generate", lambda self, video, mask, **kw: (
        events.append(f"sample {video.shape[0]}"), generate(self, video, mask, **kw))[1])
    _run(env, tmp_path / "out", clips, "--batch", "1")
    assert events == ["read", "read", "sample 1", "read", "sample 1", "sample 1"]


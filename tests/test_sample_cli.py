"""sample.py (mardini.pipeline.cli): every task writes its files from images, a video or shards; clear errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from mardini.data.synthetic_shards import write_synthetic_split
from mardini.data.testing import moving_frames, write_video
from mardini.pipeline.cli import build_parser, main
from mardini.visualize import GENERATED_COLOR, GIVEN_COLOR
from pipeline_helpers import killed_on_the_second_gif, make_checkpoint, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("cli")
    frames = moving_frames(8, 24, 32)  # (T, H, W, 3) uint8, not the checkpoint's 16x16
    images = []
    for i in (0, 7):
        images.append(root / f"f{i}.png")
        Image.fromarray(frames[i]).save(images[-1])
    Image.fromarray(frames[0][:16, :16]).save(root / "small.png")
    write_video(root / "clip.mp4", frames, 8)
    write_synthetic_split(root / "shards", "val", 2, 1, frames=8, height=16, width=16, fps=8.0, progress=False)
    return {"root": root, "ckpt": str(make_checkpoint(root / "joint.ckpt", "joint", frames=5, size=16)),
            "images": [str(p) for p in images], "video": str(root / "clip.mp4"), "small": str(root / "small.png"),
            "shards": str(root / "shards" / "val")}


def _marked(row: np.ndarray) -> list[bool]:
    """Cells along one pixel row of a contact sheet: True = framed in the given-frame colour."""
    out, x = [], 0
    while x < len(row):
        color = tuple(int(c) for c in row[x])
        if color in (GIVEN_COLOR, GENERATED_COLOR):
            end = x
            while end < len(row) and tuple(int(c) for c in row[end]) == color:
                end += 1
            out.append(color == GIVEN_COLOR)
            x = end
        else:
            x += 1
    return out


def _run(env, tmp_path, *args):
    return main([*args, "--ckpt", env["ckpt"], "--steps", "1", "--no-progress", "--resolution", "16",
                 "--out", str(tmp_path)])


@pytest.mark.parametrize("task, args, frames, given", [
    ("interpolate", ["--images", "IMG0", "IMG1"], 5, [0, 4]),
    ("image_to_video", ["--images", "IMG0", "--index", "2"], 5, [2]),
    ("image_to_video", ["--video", "VIDEO", "--index", "3"], 5, [3]),
    ("interpolate", ["--video", "VIDEO", "--keep", "0,2"], 5, [0, 4]),
    ("expand", ["--video", "VIDEO", "--keep", "0-1"], 5, [0, 1]),
    ("long_video", ["--images", "IMG0", "--total", "9", "--context", "2"], 9, [0]),
    ("slow_motion", ["--video", "VIDEO", "--keep", "0-2", "--factor", "2"], 5, [0, 2, 4]),
    ("generate", ["--shards", "SHARDS", "--clips", "2", "--keep", "0,3", "--batch", "1", "--num-samples", "2"], 5,
     [0, 3]),
])
def test_every_task_writes_videos_sheet_and_settings(env, tmp_path, task, args, frames, given):
    names = {"IMG0": env["images"][0], "IMG1": env["images"][1], "VIDEO": env["video"], "SHARDS": env["shards"]}
    record = _run(env, tmp_path, task, *[names.get(x, x) for x in args])
    n = 4 if task == "generate" else 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{task}_{i:03d}.{ext}" for i in range(n) for ext in ("mp4", "gif")] + ["contact_sheet.png", "settings.json"])
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved == record
    for key, value in {"task": task, "checkpoint": env["ckpt"], "seed": 0, "steps": 1, "frames": frames}.items():
        assert saved[key] == value
    assert saved["guidance"] == (2.5 if task == "image_to_video" else 1.0)
    assert saved["given_positions"] == given  # where the given frames are in the written videos
    with Image.open(tmp_path / f"{task}_000.gif") as gif:
        assert gif.n_frames == frames and gif.size == (16, 16)
    sheet = np.asarray(Image.open(tmp_path / "contact_sheet.png"))  # (H, W, 3)
    assert _marked(sheet[2]) == [j in given for j in range(frames)]  # top border of the first row's cells
    if task != "generate":
        assert "centre crop" in saved["inputs"][0]  # 24x32 inputs were cropped and resized, and it says so


def test_long_video_windows_follow_frames(env, tmp_path, monkeypatch):
    from mardini.pipeline.pipeline import MarDiniPipeline

    lengths, generate = [], MarDiniPipeline.generate

    def recording(self, video, mask, **kw):
        lengths.append(video.shape[1])
        return generate(self, video, mask, **kw)

    monkeypatch.setattr(MarDiniPipeline, "generate", recording)
    with pytest.warns(UserWarning, match="--frames 3: sampling windows of 3 frames, not the checkpoint's trained "
                      "window of 5; leave --frames out"):
        record = _run(env, tmp_path, "long_video", "--images", env["images"][0], "--total", "7", "--frames", "3",
                      "--context", "1")
    assert record["frames"] == 7 and lengths == [3, 3, 3]  # windows of --frames, not the trained 5
    assert record["window"] == 5 and record["window_sampled"] == 3


def test_a_rerun_leaves_only_its_own_samples_and_says_when_the_split_is_short(env, tmp_path, capsys):
    _run(env, tmp_path, "generate", "--shards", env["shards"], "--clips", "2", "--keep", "0,3", "--num-samples", "2")
    assert len(list(tmp_path.glob("generate_*.mp4"))) == 4
    (tmp_path / "generate_notes.txt").write_text("mine")  # not a sample: kept
    record = _run(env, tmp_path, "generate", "--shards", env["shards"], "--clips", "5", "--keep", "0,3")
    assert sorted(p.name for p in tmp_path.glob("generate_*")) == [
        "generate_000.gif", "generate_000.mp4", "generate_001.gif", "generate_001.mp4", "generate_notes.txt"]
    assert len(record["files"]) == 4
    assert "--clips 5 asked for, the split gives 2" in record["inputs"][0] and "the split gives 2" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(env, tmp_path):
    with pytest.raises(ValueError, match="finds no CUDA GPU here.*--device cpu"):
        _run(env, tmp_path, "interpolate", "--images", *env["images"], "--device", "cuda")


def test_ignored_or_reversed_inputs_fail(env, tmp_path):
    with pytest.raises(ValueError, match="--keep picks given frames among those of --video or --shards"):
        _run(env, tmp_path, "image_to_video", "--images", env["images"][0], "--keep", "2")
    with pytest.raises(ValueError, match="--resize stretch does not apply to --shards"):
        _run(env, tmp_path, "generate", "--shards", env["shards"], "--keep", "0,3", "--resize", "stretch")
    with pytest.raises(ValueError, match="runs backwards: write the lower index first \\(1-3\\)"):
        _run(env, tmp_path, "expand", "--video", env["video"], "--keep", "3-1")
    with pytest.raises(ValueError, match="outside the window of 5 frames"):
        _run(env, tmp_path, "image_to_video", "--images", env["images"][0], "--index", "-6")


def test_bad_videos_fail_with_the_fix(env, tmp_path):
    with pytest.raises(ValueError, match="decoded to 8 frames, need index 24.*--start 20 .*: lower --start: the "
                       "video ends before it"):
        _run(env, tmp_path, "expand", "--video", env["video"], "--start", "20")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 50)
    with pytest.raises(ValueError, match="could not be decoded.*re-encode it"):
        _run(env, tmp_path, "expand", "--video", str(broken))


def test_unreadable_inputs_and_settings_are_user_errors(env, tmp_path):
    """Each of these ended in a raw traceback (PIL, torch, or a FileExistsError after all the sampling)."""
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad in (env["video"], str(empty)):
        with pytest.raises(ValueError, match=rf"image {bad} could not be read as an image.*--video"):
            _run(env, tmp_path, "image_to_video", "--images", bad)
    tensor = tmp_path / "t.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match="t.pt is not a MarDini checkpoint \\(it holds a Tensor.*written by train.py"):
        main(["image_to_video", "--ckpt", str(tensor), "--images", env["images"][0]])
    missing = str(tmp_path / "no.ckpt")  # never read: these are checked before the checkpoint loads
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N .*got 'gpu'"):
        main(["image_to_video", "--ckpt", missing, "--images", env["images"][0], "--device", "gpu"])
    for out in (empty, empty / "below"):
        with pytest.raises(ValueError, match=f"--out {out}: {empty} is a file, not a folder"):
            main(["image_to_video", "--ckpt", missing, "--images", env["images"][0], "--out", str(out)])


@pytest.mark.parametrize("args, message", [
    (["interpolate", "--images", "IMG0"], "interpolate needs 2 given frame\\(s\\), got 1"),
    (["image_to_video", "--video", "VIDEO", "--keep", "0,3"], "image_to_video needs 1 given frame\\(s\\), got 2"),
    (["slow_motion", "--video", "VIDEO", "--keep", "2"], "slow_motion needs at least 2 given frame\\(s\\), got 1"),
    (["generate", "--video", "VIDEO"], "generate needs --keep"),
    (["generate", "--images", "IMG0", "IMG1", "--keep", "0"], "one --keep index \\(window position\\) per image: 1 for 2"),
    (["interpolate", "--images", "IMG0", "--video", "VIDEO"], "give exactly one input"),
    (["expand", "--video", "VIDEO", "--keep", "0,2,4"],  # packed into the prefix 0,1,2 before
     "expand continues a prefix of consecutive frames.*--keep 0,2,4 .*packed into the frames 0..2.*range like "
     "0-2, or use generate --keep 0,2,4 for a sparse mask"),
    (["long_video", "--video", "VIDEO", "--keep", "1,0"], "long_video continues a prefix of consecutive frames"),
    (["generate", "--images", "IMG0", "IMG1", "--keep", "0,0"],  # IMG0 was silently dropped
     "--keep positions \\[0\\] are repeated \\(two images for one frame.*once, one per image"),
    (["generate", "--video", "VIDEO", "--keep", "0,2,2"], "positions \\[2\\] are repeated \\(one frame given twice"),
])
def test_task_input_mistakes_are_user_errors_before_loading(env, tmp_path, capsys, args, message):
    """They were SystemExits (exit 1, no 'sample.py: error:') raised after the checkpoint loaded."""
    from mardini.user_errors import run_reporting_user_errors

    names = {"IMG0": env["images"][0], "IMG1": env["images"][1], "VIDEO": env["video"]}
    argv = [names.get(x, x) for x in args] + ["--ckpt", str(tmp_path / "never_read.ckpt")]
    assert run_reporting_user_errors("sample.py", lambda: main(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample.py: error: ") and re.search(message, err), err


def test_16_bit_and_float_images_are_scaled_not_saturated(tmp_path):
    """img.convert("RGB") clipped a 16-bit PNG's pixels to 255 (and a float TIFF's to 0)."""
    from mardini.pipeline.inputs import read_images

    grey16, grey_f, bad = tmp_path / "grey16.png", tmp_path / "grey.tiff", tmp_path / "bad.tiff"
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(grey16)
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(grey_f)
    for path in (grey16, grey_f):
        assert read_images([path])[0, 0].tolist() == [[0] * 3, [128] * 3, [255] * 3]
    Image.fromarray(np.array([[0.0, 2.0]], np.float32)).save(bad)
    with pytest.raises(ValueError, match=r"bad.tiff \(F\) has pixels in \[0, 2\], outside \[0, 1\]"):
        read_images([bad])


def test_generate_from_images_fills_the_trained_window_by_default(env, tmp_path, capsys):
    """--keep 0,2 made a 3-frame window although --help says the default is the trained window (5 here)."""
    assert "default: the trained window" in " ".join(build_parser().format_help().split())
    record = _run(env, tmp_path, "generate", "--images", *env["images"], "--keep", "0,2")
    assert record["frames"] == 5 and record["given_positions"] == [0, 2]
    with pytest.warns(UserWarning, match="not the checkpoint's trained window of 5"):
        record = _run(env, tmp_path, "generate", "--images", *env["images"], "--keep", "0,2", "--frames", "3")
    assert record["frames"] == 3


def test_generate_past_the_window_samples_window_by_window_and_prints_the_windows(env, tmp_path, capsys):
    """--keep 0,7 (window 5) failed with "8 frames is more than the checkpoint's trained window ... or use
    long_video / slow_motion", neither of which interpolates between keyframes further apart than a window."""
    record = _run(env, tmp_path, "generate", "--images", *env["images"], "--keep", "0,7", "--context", "2")
    assert record["frames"] == 8 and record["given_positions"] == [0, 7]
    printed = capsys.readouterr().out
    assert "8 frames, more than the trained window of 5: generate_long samples 2 windows of 5" in printed
    assert "window 1: frames 0..4, given [0]" in printed and "window 2: frames 3..7, given [3, 4, 7]" in printed
    record = _run(env, tmp_path, "generate", "--video", env["video"], "--frames", "7", "--keep", "0,6")
    assert record["frames"] == 7 and record["given_positions"] == [0, 6]
    assert "generate_long samples 2 windows of 5" in capsys.readouterr().out


def test_clear_errors(env, tmp_path):
    with pytest.raises(ValueError, match="images have different sizes"):
        _run(env, tmp_path, "interpolate", "--images", env["images"][0], env["small"])
    with pytest.raises(ValueError, match="every one of the 5 frames is given"):
        _run(env, tmp_path, "generate", "--video", env["video"], "--keep", "0-4")
    with pytest.raises(ValueError, match="--resize crop"):
        _run(env, tmp_path, "interpolate", "--images", *env["images"], "--resize", "none")
    planning = make_checkpoint(env["root"] / "planning.ckpt", "planning", frames=5, size=16)
    with pytest.raises(ValueError, match="'planning' warm-up checkpoint.*cannot sample"):
        main(["interpolate", "--ckpt", str(planning), "--images", *env["images"]])
    generation = make_checkpoint(env["root"] / "generation.ckpt", "generation", frames=5, size=16)
    args = ["image_to_video", "--ckpt", str(generation), "--images", env["images"][0], "--resolution", "16",
            "--steps", "1", "--no-progress", "--out", str(tmp_path)]
    assert main(args)["guidance"] == 1.0  # plan-free: the default guidance drops to 1
    with pytest.raises(ValueError, match="no planner.*guidance_scale must be 1"):
        main(args + ["--guidance", "2.5"])


def test_a_video_is_read_at_the_rate_the_model_trained_at(tmp_path, env):
    """A 24 fps video for a model trained at 8 fps: every third frame, as the training loader and evaluate.py read
    it (before, every frame: a window covered a third of the motion it was trained on)."""
    from mardini.pipeline.cli import video_stride

    fast = tmp_path / "fast.mp4"
    write_video(fast, moving_frames(30, 16, 16), 24)
    assert video_stride(str(fast), 8.0, None) == (
        3, "read at 24 fps, every 3 frame(s): 8 fps (round(24 / 8), for the 8 fps the model trained at, as training "
        "reads videos)", 1 / 8)
    assert video_stride(str(fast), 8.0, 2) == (2, "read at 24 fps, every 2 frame(s): 12 fps (--stride)", None)
    assert video_stride(str(fast), None, None)[0] == 1  # a checkpoint that records no rate: every frame
    record = _run(env, tmp_path / "out", "expand", "--video", env["video"], "--keep", "0-1")
    assert any("read at 8 fps, every 1 frame(s)" in note for note in record["inputs"])


def test_a_keep_range_without_an_end_is_refused():
    """--keep 8- was read as 8: the missing end of the range went unnoticed."""
    from mardini.pipeline.inputs import parse_indices

    for text in ("8-", "0,8-"):
        with pytest.raises(ValueError, match="has no end: write both ends"):
            parse_indices(text)
    with pytest.raises(ValueError, match="like 0,4,8 or 0-3"):
        parse_indices("-3")
    assert parse_indices("0,2-4") == [0, 2, 3, 4]


def test_batch_changes_the_samples_by_float_rounding_and_says_so(env, tmp_path, monkeypatch):
    """--help said the batch 'does not change the samples'; batched kernels round differently (not bit-identical)."""
    import mardini.pipeline.cli as cli
    from mardini.pipeline.pipeline import MarDiniPipeline

    helptext = " ".join(build_parser().format_help().split())
    assert "does not change the samples" not in helptext
    assert "only by float rounding: a clip matches its --batch 1 sample within 1e-5" in helptext
    assert "only by float rounding" in " ".join(MarDiniPipeline.generate.__doc__.split())
    written = []
    monkeypatch.setattr(cli, "write_outputs", lambda out, task, videos, *a, **kw: written.append(videos) or {})
    for batch in ("1", "2"):
        _run(env, tmp_path, "generate", "--shards", env["shards"], "--clips", "2", "--keep", "0,3", "--batch", batch)
    torch.testing.assert_close(written[0], written[1], rtol=0, atol=1e-5)


def test_a_video_shorter_than_the_window_is_read_as_far_as_the_task_needs(env, tmp_path, monkeypatch):
    """--frames was both the frames read and the window: a 3-frame video (window 5) failed every task ('decoded to 3
    frames, need index 4 ... lower --frames'), and --frames 3 then sampled 3-frame windows instead of the trained 5."""
    from mardini.pipeline.pipeline import MarDiniPipeline

    short = env["root"] / "short3.mp4"
    write_video(short, moving_frames(3, 16, 16), 8)
    lengths, generate = [], MarDiniPipeline.generate
    monkeypatch.setattr(MarDiniPipeline, "generate", lambda self, video, mask, **kw: lengths.append(video.shape[1])
                        or generate(self, video, mask, **kw))
    for task, args, frames, given in [
        ("expand", [], 5, [0, 1, 2]),  # a short video's frames are the prefix
        ("expand", ["--keep", "0-1"], 5, [0, 1]),
        ("image_to_video", ["--index", "2"], 5, [2]),  # reads one frame
        ("long_video", ["--keep", "0-2", "--total", "7"], 7, [0, 1, 2]),
        ("slow_motion", [], 5, [0, 2, 4]),  # all 3 frames, x2
    ]:
        lengths.clear()
        record = _run(env, tmp_path, task, "--video", str(short), *args)
        assert (record["frames"], record["given_positions"], record["window_sampled"]) == (frames, given, 5), task
        assert lengths and max(lengths) == 5, (task, lengths)  # the trained window, not the 3 frames read
    assert "the video gives 3 frame(s) from --start 0, fewer than the window of 5: all are given" in \
        _run(env, tmp_path, "expand", "--video", str(short))["inputs"][0]
    with pytest.raises(ValueError, match="the default --keep 0,4 of interpolate reaches frame 4: pick frames it has "
                       "with --keep"):
        _run(env, tmp_path, "interpolate", "--video", str(short))
    lengths.clear()
    with pytest.warns(UserWarning, match="sampling windows of 3 frames, not the checkpoint's trained window of 5"):
        _run(env, tmp_path, "slow_motion", "--video", str(short), "--frames", "3")
    assert lengths == [3]  # --frames is slow_motion's window too (it was the frames read)
    lengths.clear()
    with pytest.warns(UserWarning, match=r"--frames 4: sampling windows of 3 frames \(slow motion's windows are odd\)"):
        record = _run(env, tmp_path, "slow_motion", "--video", str(short), "--frames", "4")
    assert lengths and max(lengths) == 3 and record["window_sampled"] == 3  # an even window is sampled odd
    notes = _run(env, tmp_path, "interpolate", "--video", str(short), "--keep", "0,2")["inputs"]
    assert any("--keep 0,2 are 2 frames apart in the video, the 5-frame window places them 4 apart: the motion "
               "between them plays 2x slower than it was read; --frames 3 samples them at their spacing" in n
               for n in notes), notes
    helptext = " ".join(build_parser().format_help().split())
    assert "frames per window" in helptext and "It does not set how many frames are read" in helptext


def test_outputs_play_at_the_rate_the_video_was_read_at(env, tmp_path, capsys):
    """A 12 fps video read every 2nd frame (6 fps) was written at the training 8 fps (1.33x too fast) and
    settings.json recorded no fps; the note said 'nearest to the 8 fps' where the rule is round(src / target)."""
    import av

    from mardini.pipeline.cli import video_stride

    ckpt = torch.load(env["ckpt"], weights_only=True)
    ckpt["datamodule_hyper_parameters"] = {"fps": 8.0}  # as a run of train.py records its data
    torch.save(ckpt, tmp_path / "at8fps.ckpt")
    env = dict(env, ckpt=str(tmp_path / "at8fps.ckpt"))
    video = tmp_path / "twelve.mp4"
    write_video(video, moving_frames(12, 16, 16), 12)
    record = _run(env, tmp_path / "out", "image_to_video", "--video", str(video))
    assert (record["fps_read"], record["fps_written"], record["fps_trained"]) == (6.0, 6.0, 8.0)
    with av.open(str(tmp_path / "out" / "image_to_video_000.mp4")) as f:
        assert f.streams.video[0].average_rate == 6
    with Image.open(tmp_path / "out" / "image_to_video_000.gif") as gif:
        assert sum(gif.info["duration"] for _ in ImageSequence.Iterator(gif)) == 830  # 5 frames at 6 fps
    assert "read at 6 fps, the checkpoint trained at 8 fps: each frame step is 1.33x the motion it learned" in \
        " ".join(record["inputs"]) and "6 fps) to" in capsys.readouterr().out
    assert _run(env, tmp_path / "out", "image_to_video", "--video", str(video), "--fps", "10")["fps_written"] == 10
    shards = _run(env, tmp_path / "out", "image_to_video", "--shards", env["shards"])
    assert (shards["fps_read"], shards["fps_written"]) == (8.0, 8.0) and "read at 8 fps" in shards["inputs"][0]
    assert _run(env, tmp_path / "out", "image_to_video", "--images", env["images"][0])["fps_read"] is None
    twenty = tmp_path / "twenty.mp4"  # 20 / 8 = 2.5 rounds (to even) to 2: 10 fps, where 3 would give 6.67
    write_video(twenty, moving_frames(9, 16, 16), 20)
    assert video_stride(str(twenty), 8.0, None)[1] == (
        "read at 20 fps, every 2 frame(s): 10 fps (round(20 / 8), for the 8 fps the model trained at, as training "
        "reads videos)")


def test_png_writes_every_sample_s_frames_losslessly_where_evaluate_reads_them(env, tmp_path, monkeypatch):
    """The outputs were lossy only (H.264 yuv420p crf 18, palette GIFs): re-feeding one lost quality each round."""
    import mardini.pipeline.outputs as outputs
    from mardini.evaluation.external import GeneratedVideos
    from mardini.visualize import to_uint8

    written, write = [], outputs.write_outputs
    def recording(out, task, videos, *args, **kw):
        written.append(videos)
        return write(out, task, videos, *args, **kw)

    monkeypatch.setattr("mardini.pipeline.cli.write_outputs", recording)
    record = _run(env, tmp_path, "interpolate", "--images", *env["images"], "--num-samples", "2", "--png")
    folders = [tmp_path / "frames" / "interpolate_000", tmp_path / "frames" / "interpolate_001"]
    assert [str(f) for f in folders] == [f for f in record["files"] if not f.endswith((".mp4", ".gif"))]
    pixels = to_uint8(written[0])  # (2, T, H, W, 3): the samples as the writers get them
    for folder, want in zip(folders, pixels):
        assert sorted(p.name for p in folder.iterdir()) == [f"frame_{i:02d}.png" for i in range(5)]
        assert all(np.array_equal(np.asarray(Image.open(folder / f"frame_{i:02d}.png")), want[i]) for i in range(5))
    generated = GeneratedVideos("mine", tmp_path, frames=5, resolution=16)  # evaluate.py --generated mine=DIR
    read = generated.read("frames", "interpolate_000")  # (T, 3, R, R) in [-1, 1]
    assert np.array_equal(to_uint8(read), pixels[0])  # the 8-bit pixels written, exactly
    record = _run(env, tmp_path, "interpolate", "--images", *env["images"])  # a rerun without --png: no stale frames
    assert not any((tmp_path / "frames").iterdir()) and len(record["files"]) == 2


@pytest.mark.parametrize("flags, warned", [
    (frozenset({"avx2", "avx512f"}), "this CPU has no native bf16 matrix multiplies"),
    (frozenset(), "this CPU's bf16 support could not be read"),  # no /proc/cpuinfo: macOS, Windows
    (frozenset({"avx512f", "avx512_bf16"}), None),
], ids=["no-bf16", "unknown", "avx512-bf16"])
def test_bf16_sampling_on_a_cpu_without_native_bf16_warns_and_names_the_fix(env, tmp_path, monkeypatch, recwarn,
                                                                             flags, warned):
    """A bf16-mixed fit on a CPU that emulates bf16 warns (mardini.cpu_kernels.slow_bf16_advice); sample.py --bf16
    there said nothing and sampled several times slower than fp32. It warns now, naming the fix (leave --bf16 out);
    a CPU with native bf16 gets no warning, nor does sampling in fp32."""
    from mardini import cpu_kernels

    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE, raising=False)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda path="/proc/cpuinfo": flags)
    _run(env, tmp_path / "fp32", "interpolate", "--images", *env["images"], "--device", "cpu")
    assert not [w for w in recwarn.list if "bf16" in str(w.message)]
    _run(env, tmp_path / "bf16", "interpolate", "--images", *env["images"], "--device", "cpu", "--bf16")
    messages = [str(w.message) for w in recwarn.list if "bf16" in str(w.message)]
    if warned is None:
        assert not messages, messages
    else:
        assert len(messages) == 1 and warned in messages[0] and "leave --bf16 out" in messages[0], messages
        assert messages[0].startswith("--bf16 on the CPU") and "--trainer.precision" not in messages[0], messages


def test_a_killed_run_leaves_no_half_written_sample(env, tmp_path, monkeypatch):
    """Each file is written under a .part name and renamed when complete: the old code wrote the GIF into its final
    name, so a kill while it was written left a broken generate_001.gif that looked like a sample."""
    import mardini.pipeline.outputs as outputs

    monkeypatch.setattr(outputs, "save_gif", killed_on_the_second_gif(outputs.save_gif))
    with pytest.raises(KeyboardInterrupt):
        _run(env, tmp_path, "generate", "--shards", env["shards"], "--clips", "2", "--keep", "0,3", "--png")
    assert sorted(p.name for p in tmp_path.glob("generate_*")) == ["generate_000.gif", "generate_000.mp4",
                                                                   "generate_001.mp4"]
    assert not list(tmp_path.rglob("*.part*")) and not (tmp_path / "settings.json").exists()

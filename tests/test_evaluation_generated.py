"""External methods: ``evaluate.py --export-inputs`` writes the given frames, ``--generated NAME=DIR`` scores a
method's windows read back (as mp4 or frame folders) exactly as a built-in method is scored."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mardini.data.testing import moving_frames, tiny_synthetic, write_video
from mardini.data.transforms import crop_and_resize
from mardini.evaluation import cli
from mardini.evaluation.external import ClipNames, GeneratedVideos, to_uint8
from mardini.evaluation.samplers import NearestFrame
from test_evaluation_cli import stub_networks  # FVD/FID with stand-in feature networks

TASKS = ["interpolation", "image_to_video"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("synth"), train=2, val=6, frames=12, size=16) / "val"


def write_lossless_mp4(path: Path, frames: np.ndarray) -> Path:
    """``frames`` uint8 ``(T, H, W, 3)`` as an mp4 that decodes to the same pixels (x264 RGB, qp 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264rgb", rate=8, options={"qp": "0"})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for img in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    return path


def nearest_method(inputs: Path, out: Path, task: str, as_video: bool) -> list[str]:
    """An "external method": the nearest given frame, from the exported PNGs only, written in the generated layout
    (its own copies of the given frames blacked out: the scoring takes the real ones). Returns the clip names."""
    info = json.loads((inputs / task / "clips.json").read_text())
    t, given, side = info["frames"], info["given"], info["resolution"]
    mask = torch.ones(1, t, dtype=torch.bool)  # (1, T)
    mask[0, given] = False
    for clip in info["clips"]:
        video = torch.zeros(1, t, 3, side, side)  # (1, T, 3, R, R): only the given frames are known
        for i, rel in zip(given, clip["inputs"], strict=True):
            pixels = np.array(Image.open(inputs / task / rel))  # (R, R, 3) uint8
            video[0, i] = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
        frames = to_uint8(NearestFrame()(video, mask)[0])  # (T, R, R, 3)
        frames[given] = 0
        if as_video:
            write_lossless_mp4(out / task / f"{clip['name']}.mp4", frames)
        else:
            (out / task / clip["name"]).mkdir(parents=True)
            for i, img in enumerate(frames):
                Image.fromarray(img).save(out / task / clip["name"] / f"{i:03d}.png")
    return [c["name"] for c in info["clips"]]


def test_an_external_method_scores_as_the_same_built_in_one(shards, tmp_path, monkeypatch, capsys):
    """Export, run the nearest-frame "method" outside (mp4 for interpolation, PNG folders for I2V), score it:
    every metric (FVD, FID, MidF, trajectory) equals the built-in nearest_frame's, to the last digit."""
    stub_networks(monkeypatch)
    flags = ["--data", str(shards), "--tasks", *TASKS, "--resolution", "16", "--num-clips", "6", "--batch-size", "4",
             "--cache-dir", ""]
    inputs, gen = tmp_path / "inputs", tmp_path / "gen"
    assert cli.main([*flags, "--export-inputs", str(inputs)]) == 0
    assert "then score it with the same flags and --generated NAME=OUT" in capsys.readouterr().out
    interp = json.loads((inputs / "interpolation" / "clips.json").read_text())
    assert interp["given"] == [0, 8] and interp["generate"] == list(range(1, 8)) and len(interp["clips"]) == 6
    first = interp["clips"][0]
    assert first["name"] == first["key"] and first["inputs"] == [f"{first['name']}/frame_00.png",
                                                                   f"{first['name']}/frame_08.png"]
    assert first["frame_indices"] == list(range(1, 10)) and first["shard"].endswith(".tar")
    assert sorted(p.name for p in (inputs / "image_to_video" / first["name"]).iterdir()) == ["frame_00.png"]
    assert not (tmp_path / "report").exists()  # the export scores nothing

    nearest_method(inputs, gen, "interpolation", as_video=True)
    nearest_method(inputs, gen, "image_to_video", as_video=False)
    out = tmp_path / "report"
    assert cli.main([*flags, "--generated", f"nearest={gen}", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["methods"] == ["linear_blend", "nearest_frame", "nearest"]
    for task in TASKS:
        res = report["tasks"][task]["results"]
        assert {"fvd6_9f", "fid6_9f"} <= set(res["nearest"]) and res["nearest"] == res["nearest_frame"]
        assert "nearest" not in report["tasks"][task]["seconds_per_clip"]
    assert "midf_psnr" in report["tasks"]["interpolation"]["results"]["nearest"]
    assert "| nearest |" in (out / "report.md").read_text()
    assert cli.main([*flags, "--methods", "nearest", "--generated", f"nearest={gen}", "--out", str(out)]) == 0
    only = json.loads((out / "report.json").read_text())
    assert only["methods"] == ["nearest"] and only["tasks"]["image_to_video"]["results"]["nearest"] == \
        report["tasks"]["image_to_video"]["results"]["nearest"]


def test_a_resizing_protocol_scores_an_external_method_up_to_8_bit_rounding(shards, tmp_path, monkeypatch):
    """Shards stored at 16 px scored at 12: the real clips are float after the resize, the exported inputs and the
    outputs 8-bit, so the external nearest-frame matches the built-in one up to that rounding, not exactly."""
    stub_networks(monkeypatch)
    flags = ["--data", str(shards), "--tasks", *TASKS, "--resolution", "12", "--num-clips", "6", "--batch-size", "4",
             "--cache-dir", ""]
    inputs, gen, out = tmp_path / "inputs", tmp_path / "gen", tmp_path / "report"
    assert cli.main([*flags, "--export-inputs", str(inputs)]) == 0
    for task in TASKS:
        nearest_method(inputs, gen, task, as_video=False)
    assert cli.main([*flags, "--methods", "nearest_frame", "nearest", "--generated", f"nearest={gen}",
                     "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for task in TASKS:
        res = report["tasks"][task]["results"]
        assert res["nearest"].keys() == res["nearest_frame"].keys()
        assert res["nearest"] == pytest.approx(res["nearest_frame"], rel=1e-2, abs=1e-6), task
    assert report["tasks"]["interpolation"]["results"]["nearest"] != \
        report["tasks"]["interpolation"]["results"]["nearest_frame"]  # the rounding shows: not exact here


def test_generated_outputs_that_cannot_be_scored_are_refused(shards, tmp_path, capsys):
    flags = ["--data", str(shards), "--tasks", "interpolation", "--resolution", "16", "--num-clips", "6",
             "--metrics", "midf", "--cache-dir", "", "--out", str(tmp_path / "report")]
    inputs, gen = tmp_path / "inputs", tmp_path / "gen"
    assert cli.main([*flags, "--export-inputs", str(inputs)]) == 0
    names = nearest_method(inputs, gen, "interpolation", as_video=False)
    folder = gen / "interpolation"
    capsys.readouterr()

    def error(*extra: str) -> str:
        assert cli.main([*flags, "--generated", f"ext={gen}", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("evaluate.py: error: --generated ext: ") and "Traceback" not in err
        return err.splitlines()[0]

    for name in names[:4]:  # four missing: counted, the first three named
        (folder / name).rename(folder / f"{name}.bak")
    line = error()
    assert "4 of 6 interpolation clips have no output: expected " in line and "and 1 more" in line
    assert f"{folder / names[0]}.mp4" in line and str(folder / names[3]) not in line
    for name in names[:4]:
        (folder / f"{name}.bak").rename(folder / name)

    (folder / names[1] / "008.png").unlink()  # 8 frames of 9
    assert f"{folder / names[1]} has 8 frames, the window is 9 (--frames)" in error()
    (folder / names[1] / "008.png").write_bytes(b"not a png")
    assert f"image {folder / names[1] / '008.png'} could not be read as an image" in error()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / names[1] / "008.png")
    assert "the images have different sizes" in error() and f"{folder / names[1] / '008.png'}: 8x8" in error()

    frames = np.stack([np.asarray(Image.open(p)) for p in sorted((folder / names[0]).iterdir())])  # (9, R, R, 3)
    write_lossless_mp4(folder / f"{names[0]}.mp4", frames)
    assert f"2 outputs of clip {names[0]!r}" in error() and "keep one" in error()
    for p in (folder / names[0]).iterdir():
        p.unlink()
    (folder / names[0]).rmdir()
    write_lossless_mp4(folder / f"{names[0]}.mp4", frames[:7])
    assert f"{folder / names[0]}.mp4 has 7 frames, the window is 9" in error()
    (folder / f"{names[0]}.mp4").write_bytes(b"not a video")
    assert f"{folder / names[0]}.mp4 does not read as a video" in error()


@pytest.mark.parametrize("argv, message", [
    (["--generated", "film"], "write NAME=DIR"),
    (["--generated", "nearest_frame={dir}"], "the method name 'nearest_frame' is taken"),
    (["--generated", "a={dir}", "--generated", "a={dir}"], "the method name 'a' is taken"),
    (["--generated", "a={dir}/none"], "is not a folder"),
    (["--export-inputs", "{dir}", "--generated", "a={dir}"], "--export-inputs writes the inputs and scores nothing"),
    (["--methods", "rife", "--generated", "a={dir}"], "choose from ['linear_blend', 'nearest_frame', 'mardini', 'a']"),
])
def test_bad_generated_and_export_flags_are_refused(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--data", "x", *[a.format(dir=tmp_path) for a in argv]])
    assert message in capsys.readouterr().err


def test_a_video_folder_exports_named_inputs_and_outputs_are_resized_as_the_real_clips(tmp_path, capsys):
    """Names are the file's path under --data without its extension, made unique; an output at another size is
    centre-cropped and resized by the real clips' crop_and_resize."""
    videos = tmp_path / "videos"
    for i, rel in enumerate(["a.mp4", "a.avi", "sub/b c.mp4"]):
        write_video(videos / rel, moving_frames(14, 24, 32, seed=i), 10, codec="mpeg4" if rel.endswith("avi") else
                    "libx264")
    inputs = tmp_path / "inputs"
    assert cli.main(["--data", str(videos), "--tasks", "image_to_video", "--resolution", "16", "--metrics", "midf",
                     "--export-inputs", str(inputs)]) == 0
    info = json.loads((inputs / "image_to_video" / "clips.json").read_text())
    assert [(c["name"], c["source"]) for c in info["clips"]] == [
        ("a", str(videos / "a.avi")), ("a-2", str(videos / "a.mp4")), ("sub_b_c", str(videos / "sub" / "b c.mp4"))]
    assert info["clips"][0]["frame_indices"] == list(range(2, 11)) and info["given"] == [0]
    with Image.open(inputs / "image_to_video" / "sub_b_c" / "frame_00.png") as frame:
        assert frame.size == (16, 16)
    names = ClipNames("videos", str(videos))
    assert [names(str(videos / r)) for r in ["a.avi", "a.mp4", "sub/b c.mp4"]] == ["a", "a-2", "sub_b_c"]

    wide = moving_frames(9, 24, 40, seed=5)  # (9, 24, 40, 3): another size and aspect ratio than the protocol's
    write_lossless_mp4(tmp_path / "gen" / "image_to_video" / "a.mp4", wide)
    read = GeneratedVideos("ext", tmp_path / "gen", 9, 16).read("image_to_video", "a")  # (9, 3, 16, 16)
    assert torch.equal(read, crop_and_resize(wide, 16, "center")[0])


def test_the_given_frames_scored_are_the_real_ones(tmp_path):
    """Whatever the method wrote at the given positions, the scored window has the real frames there."""
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)  # (T, R, R, 3)
    write_lossless_mp4(tmp_path / "interpolation" / "c.mp4", frames)
    real = torch.rand(1, 5, 3, 16, 16) * 2 - 1  # (1, T, 3, R, R)
    mask = torch.tensor([[False, True, True, True, False]])  # (1, T)
    fake = GeneratedVideos("ext", tmp_path, 5, 16)("interpolation", ["c"], real, mask)  # (1, T, 3, R, R)
    assert torch.equal(fake[0, [0, 4]], real[0, [0, 4]])
    assert torch.equal(fake[0, 1:4], crop_and_resize(frames, 16)[0][1:4])

"""Real-video sharding on small clips made here with PyAV: odd codecs, frame rates and sizes; corrupt and
truncated files; shard limits; resumable runs; the mp4 shard round trip through the loader; variable-frame-rate
files read by timestamp, and by index where the timestamps cannot be trusted; rotation and mirror flags and
non-square pixels."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from mardini.data import decode, video_shards
from mardini.data.datamodule import VideoDataModule
from mardini.data.decode import decode_mp4
from mardini.data.testing import moving_frames, write_video
from mardini.data.video_shards import ShardSettings, videos_to_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "h264.mp4", moving_frames(40, 48, 64), 24)  # 5 clips of 8
    write_video(d / "sub dir/odd.mpeg4.avi", moving_frames(30, 33, 47, seed=1), 7, codec="mpeg4")  # 3 clips
    write_video(d / "ntsc.mov", moving_frames(50, 36, 50, seed=2), Fraction(30000, 1001))  # 6 clips
    write_video(d / "vp9.webm", moving_frames(20, 32, 32, seed=3), 10, codec="libvpx-vp9")  # 2 clips
    write_video(d / "short.mp4", moving_frames(5, 32, 32), 24)  # too short
    (d / "garbage.mp4").write_bytes(b"definitely not a video " * 50)
    good = (d / "h264.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (d / "notes.txt").write_text("not a video extension: ignored")
    return d


def _keys_and_meta(folder: Path) -> list[tuple[str, dict, bytes]]:
    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(files):
            if name.endswith(".json"):
                key = name[: -len(".json")]
                out.append((key, json.loads(files[name]), files[key + ".video.mp4"]))
    return out


def test_shards_odd_codecs_and_reports_bad_files(video_dir, tmp_path):
    s = videos_to_shards(video_dir, tmp_path, ShardSettings(clip_frames=8, shard_max_count=3), workers=2,
                         progress=False)
    assert s.files == 7 and s.clips == 16 and s.shards == 6 and s.shards_written == 6
    assert set(s.skipped) == {"short.mp4", "garbage.mp4", "truncated.mp4"}
    assert s.skipped["short.mp4"].startswith("too short")
    assert s.skipped["garbage.mp4"].startswith("undecodable")
    assert s.reasons() == {"too short": 1, "undecodable": 2}
    assert "16 clips in 6 shards" in s.text() and "garbage.mp4" in s.text()
    clips = _keys_and_meta(tmp_path)
    assert len(clips) == 16 and len({k for k, _, _ in clips}) == 16 and all("." not in k for k, _, _ in clips)
    by_source = {}
    for key, meta, data in clips:
        by_source.setdefault(meta["source"], []).append(meta)
        frames = decode_mp4(data)
        assert frames.shape == (8, meta["height"], meta["width"], 3)
        assert meta["height"] % 2 == 0 and meta["width"] % 2 == 0
    odd = by_source["sub dir/odd.mpeg4.avi"]
    assert [m["source_frames"] for m in odd] == [[0, 8], [8, 16], [16, 24]]
    assert odd[0]["source_fps"] == pytest.approx(7) and (odd[0]["source_width"], odd[0]["source_height"]) == (47, 33)
    assert by_source["ntsc.mov"][0]["fps"] == pytest.approx(29.97, abs=1e-3)
    assert len(by_source["vp9.webm"]) == 2


def test_files_too_short_for_a_clip_name_the_clip_frames_that_keeps_them(tmp_path):
    """Clips of 5 and 7 frames under --clip-frames 8 were skipped, each listed as 'too short', with no word of the
    setting that keeps them: the summary now names --clip-frames 5 (a clip of each) and 7 (of the longest)."""
    write_video(tmp_path / "in" / "five.mp4", moving_frames(5, 18, 32), 24)  # 16:9 phone-like clips, very short
    write_video(tmp_path / "in" / "seven.mp4", moving_frames(7, 18, 32), 24)
    s = videos_to_shards(tmp_path / "in", tmp_path / "out", ShardSettings(clip_frames=8), workers=1, progress=False)
    assert s.clips == 0 and s.too_short == {"five.mp4": 5, "seven.mp4": 7}
    assert "lower --clip-frames: 5 keeps a clip of each of these 2 files, 7 of the longest" in s.text()
    again = videos_to_shards(tmp_path / "in", tmp_path / "again", ShardSettings(clip_frames=5), workers=1,
                             progress=False)
    assert again.clips == 2 and not again.too_short


def _rgba_video(path: Path, frames: int, height: int, width: int) -> Path:
    """A QuickTime Animation (``argb``) file whose left half is fully transparent: the same colour in every pixel."""
    import av

    image = np.zeros((height, width, 4), np.uint8)  # (H, W, RGBA)
    image[..., :3] = (200, 50, 20)
    image[:, width // 2 :, 3] = 255  # left half alpha 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("qtrle", rate=8)
        s.width, s.height, s.pix_fmt = width, height, "argb"
        for _ in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(image, format="rgba")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_an_rgba_video_is_sharded_with_its_alpha_channel_dropped_as_data_readme_says(tmp_path):
    """The sharder decodes to RGB: an RGBA file's transparent pixels keep their colour (no compositing onto a
    background). data/README.md said nothing of the alpha channel where it describes decoding."""
    _rgba_video(tmp_path / "in" / "rgba.mov", 8, 16, 16)
    s = videos_to_shards(tmp_path / "in", tmp_path / "out", ShardSettings(clip_frames=8), workers=1, progress=False)
    assert s.clips == 1, s.text()
    (_, _, video), = _keys_and_meta(tmp_path / "out")
    frames = decode_mp4(video).astype(int)  # (8, 16, 16, 3)
    assert np.abs(frames - np.array([200, 50, 20])).max() <= 8  # both halves: H.264 rounding only
    details = re.sub(r"\s+", " ", (ROOT / "data" / "README.md").read_text().split("`videos_to_shards.py` details")[1])
    assert "an RGBA video's alpha channel" in details and "is dropped, not composited" in details


def test_a_folder_of_landscape_and_portrait_phone_videos_is_said_to_mix_orientations(tmp_path):
    """A 16:9 file and one flagged 90 degrees (stored portrait) gave one set of clips and no word that a training
    resolution of either shape crops the other to a third of its frame; the summary now counts the orientations."""
    write_video(tmp_path / "in" / "wide.mp4", moving_frames(4, 18, 32), 24)
    write_video(tmp_path / "in" / "phone.mp4", moving_frames(4, 18, 32), 24, rotation=90)
    s = videos_to_shards(tmp_path / "in", tmp_path / "out", ShardSettings(clip_frames=4), workers=1, progress=False)
    assert s.clips == 2 and s.orientations == {"landscape": 1, "portrait": 1}
    assert "files of 2 orientations (1 landscape, 1 portrait): training crops every clip" in s.text()
    write_video(tmp_path / "wide" / "wide.mp4", moving_frames(4, 18, 32), 24)
    one = videos_to_shards(tmp_path / "wide", tmp_path / "one", ShardSettings(clip_frames=4), workers=1,
                           progress=False)
    assert one.orientations == {"landscape": 1} and "orientations" not in one.text()


def test_max_fps_resize_hop_and_byte_limit(video_dir, tmp_path):
    settings = ShardSettings(clip_frames=4, clip_hop=6, max_fps=12, short_side=16, shard_max_count=100,
                             shard_max_bytes=6000, max_clips_per_video=2)
    s = videos_to_shards(video_dir, tmp_path, settings, workers=1, progress=False)
    clips = _keys_and_meta(tmp_path)
    h264 = [m for _, m, _ in clips if m["source"] == "h264.mp4"]
    assert h264[0]["source_stride"] == 2 and h264[0]["fps"] == 12.0  # 24 fps -> every 2nd frame
    assert [m["source_frames"] for m in h264] == [[0, 7], [12, 19]]  # 4 stored frames, hop 6 stored = 12 source
    assert min(h264[0]["width"], h264[0]["height"]) == 16
    sizes = [p.stat().st_size for p in tmp_path.glob("*.tar")]
    assert s.shards == len(sizes) > 1 and max(sizes) < 6000 + 8192  # byte limit (+ tar end padding)


def test_resume_keeps_finished_work(video_dir, tmp_path, monkeypatch):
    settings = ShardSettings(clip_frames=8, shard_max_count=4)
    videos_to_shards(video_dir, tmp_path, settings, workers=1, progress=False, keep_staging=True)
    shards = sorted(tmp_path.glob("*.tar"))
    before = {p.name: p.read_bytes() for p in shards}
    stamp = {p.name: p.stat().st_mtime_ns for p in shards}
    # an interrupted run: the last shard is missing and the manifest is not complete
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    shards[-1].unlink()
    monkeypatch.setattr(video_shards, "stage_file", lambda job: pytest.fail(f"re-decoded {job['rel']}"))
    s = videos_to_shards(video_dir, tmp_path, settings, workers=1, progress=False)
    assert s.shards_written == 1 and s.shards_kept == len(shards) - 1
    for p in shards[:-1]:
        assert p.stat().st_mtime_ns == stamp[p.name]
    assert shards[-1].read_bytes() == before[shards[-1].name]  # deterministic plan: the same shard again
    assert not (tmp_path / ".staging").exists()
    again = videos_to_shards(video_dir, tmp_path, settings, workers=1, progress=False)  # complete: nothing to do
    assert again.clips == s.clips
    with pytest.raises(ValueError, match="other inputs or settings"):
        videos_to_shards(video_dir, tmp_path, ShardSettings(clip_frames=4), workers=1, progress=False)


def test_the_same_videos_give_the_same_shards(tmp_path):
    """Two builds of the same folder give byte-identical tars. Before, their SHA-1s differed: x264 encoded the same
    clip to other bytes from one call to the next (see ``test_encode_mp4_gives_the_same_bytes_call_after_call...``)."""
    src = tmp_path / "v"
    write_video(src / "a.mp4", moving_frames(48, 88, 160, seed=2), 24)
    write_video(src / "b.mp4", moving_frames(48, 90, 160, seed=3), 24)
    rng = np.random.default_rng(0)
    held, tars = [], []  # allocations kept between the builds: each meets another heap
    for build in range(4):
        held += [rng.bytes(int(n)) for n in rng.integers(100, 200_000, 16)][::2]
        videos_to_shards(src, tmp_path / str(build), ShardSettings(clip_frames=8), workers=1, progress=False)
        tars.append({p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in (tmp_path / str(build)).glob("*.tar")})
    assert len(tars[0]) == 1 and all(t == tars[0] for t in tars[1:]), tars


def test_loader_reads_mp4_shards_at_target_fps(video_dir, tmp_path):
    videos_to_shards(video_dir, tmp_path, ShardSettings(clip_frames=8, shard_max_count=2), workers=1, progress=False)
    dm = VideoDataModule(str(tmp_path), str(tmp_path), frames=3, fps=12, resolution=(16, 24), batch_size=4,
                         num_workers=0, val_clips=None)
    dm.setup("fit")
    fps, keys = [], []
    for batch in dm.val_dataloader():
        assert batch["video"].shape[1:] == (3, 3, 16, 24)
        assert -1 <= float(batch["video"].min()) and float(batch["video"].max()) <= 1
        fps += batch["fps"].tolist()
        keys += batch["key"]
    assert len(keys) == 16 and dm.skipped == 0
    # 24 fps -> stride 2 (12), 29.97 -> stride 2 (14.985), 7 -> 1 (7), 10 -> 1 (10)
    assert sorted({round(f, 3) for f in fps}) == [7.0, 10.0, 12.0, 14.985]
    train = next(iter(dm.train_dataloader()))
    assert train["video"].shape == (4, 3, 3, 16, 24) and "positions" not in train


def test_cli_summary_and_exit_code(video_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("videos_to_shards", ROOT / "data" / "videos_to_shards.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    code = cli.main([str(video_dir), str(tmp_path), "--clip-frames", "16", "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "skipped" in out and "truncated.mp4" in out


def _cli():
    spec = importlib.util.spec_from_file_location("videos_to_shards", ROOT / "data" / "videos_to_shards.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def _shard_cli(src: Path, out: Path, *flags: str) -> int:
    return _cli().main([str(src), str(out), "--workers", "1", "--no-progress", *flags])


def test_cli_user_errors_exit_2_without_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    (tmp_path / "empty").mkdir()
    assert _shard_cli(tmp_path / "empty", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("videos_to_shards.py: error: no video files") and "Traceback" not in err
    assert _shard_cli(tmp_path / "missing", tmp_path / "o") == 2
    assert "videos_to_shards.py: error: video folder" in capsys.readouterr().err
    write_video(tmp_path / "v" / "a.mp4", moving_frames(16, 32, 32), 24)
    assert _shard_cli(tmp_path / "v", tmp_path / "o", "--clip-frames", "0") == 2
    assert "error: clip_frames must be >= 1" in capsys.readouterr().err
    assert _shard_cli(tmp_path / "v" / "a.mp4", tmp_path / "o") == 2  # a video file, not its folder
    assert f"error: {tmp_path / 'v' / 'a.mp4'} is a file; pass the folder that holds the videos" in capsys.readouterr().err


def test_a_rerun_with_other_settings_or_inputs_names_what_differs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    src, out = tmp_path / "v", tmp_path / "o"
    for name in ("a", "b"):
        write_video(src / f"{name}.mp4", moving_frames(16, 32, 32), 24)
    assert _shard_cli(src, out, "--clip-frames", "8") == 0
    capsys.readouterr()
    assert _shard_cli(src, out, "--clip-frames", "4", "--crf", "20") == 2
    err = capsys.readouterr().err
    assert "error: " in err and "clip_frames 8 -> 4" in err and "crf 18 -> 20" in err and "inputs:" not in err
    assert "new output folder" in err and f"delete {out}" in err and "Traceback" not in err
    (src / "a.mp4").unlink()
    write_video(src / "c.mp4", moving_frames(16, 32, 32), 24)
    write_video(src / "d.mp4", moving_frames(16, 32, 32), 24)
    assert _shard_cli(src, out, "--clip-frames", "8") == 2
    err = capsys.readouterr().err
    assert "inputs: 2 added (c.mp4, d.mp4), 1 removed (a.mp4)" in err and "clip_frames " not in err


def test_a_run_of_only_bad_videos_leaves_no_manifest_in_the_way(tmp_path, capsys):
    src, out = tmp_path / "v", tmp_path / "o"
    src.mkdir()
    (src / "bad.mp4").write_bytes(b"not a video " * 50)
    assert _shard_cli(src, out, "--clip-frames", "8") == 1  # no clip: the summary, exit 1
    assert "skipped 1 x undecodable" in capsys.readouterr().out and (out / "manifest.json").exists()
    write_video(src / "good.mp4", moving_frames(16, 32, 32), 24)
    assert _shard_cli(src, out, "--clip-frames", "8") == 0  # the same command: the folder held no shard
    assert "2 clips in 1 shards" in capsys.readouterr().out and len(list(out.glob("*.tar"))) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and set(manifest["inputs"]) == {"bad.mp4", "good.mp4"}


def test_a_manifest_replaced_drops_the_staged_results_of_its_settings(tmp_path):
    src, out = tmp_path / "v", tmp_path / "o"
    write_video(src / "a.mp4", moving_frames(16, 32, 32), 24)
    s = videos_to_shards(src, out, ShardSettings(clip_frames=32), workers=1, progress=False, keep_staging=True)
    assert s.clips == 0 and s.skipped["a.mp4"].startswith("too short")  # its staged result says so
    s = videos_to_shards(src, out, ShardSettings(clip_frames=8), workers=1, progress=False)
    assert s.clips == 2 and not s.skipped  # decoded again with the new settings, not the old result reused


def test_staged_clips_of_an_interrupted_run_are_still_protected(tmp_path):
    src, out = tmp_path / "v", tmp_path / "o"
    write_video(src / "a.mp4", moving_frames(16, 32, 32), 24)
    videos_to_shards(src, out, ShardSettings(clip_frames=8), workers=1, progress=False, keep_staging=True)
    for shard in out.glob("*.tar"):  # interrupted before packing: staged clips, no shard
        shard.unlink()
    with pytest.raises(ValueError, match="clip_frames 8 -> 4"):
        videos_to_shards(src, out, ShardSettings(clip_frames=4), workers=1, progress=False)
    assert any((out / ".staging").glob("*.tar"))


# --------------------------------------------------------------------------------------------------
# Variable frame rate: frames kept by timestamp when the timestamps can be trusted, by index otherwise
# --------------------------------------------------------------------------------------------------

VFR_TIMES = [i / 30 for i in range(30)] + [1.0 + i / 10 for i in range(30)]  # 1 s at 30 fps, then 3 s at 10 fps


def _numbered(n: int) -> np.ndarray:
    """uint8 ``(32, 64, 3)``: n in binary, as 8 black or white stripes 8 pixels wide (bit 0 on the left)."""
    bits = (n >> np.arange(8)) & 1  # (8,)
    return np.repeat(np.repeat(255 * bits.astype(np.uint8), 8)[None, :, None], 32, 0).repeat(3, 2)


def _frame_numbers(data: bytes | np.ndarray) -> list[int]:
    """The n of each frame of a clip (mp4 bytes, or uint8 ``(T, 32, 64, 3)``) made of :func:`_numbered` frames."""
    frames = decode_mp4(data) if isinstance(data, bytes) else data  # (T, 32, 64, 3)
    stripes = frames.reshape(-1, 32, 8, 8, 3).mean(axis=(1, 3, 4)) > 128  # (T, 8)
    return (stripes * (1 << np.arange(8))).sum(axis=1).tolist()


def _timed_video(path: Path, times: list[float], codec: str = "libx264", swap: bool = False) -> Path:
    """Frame n shows n (:func:`_numbered`) at ``times[n]`` s (ms timestamps). ``swap`` (intra-only codecs) writes the
    frames in order but swaps neighbours' timestamps, as PyAV reports packed B-frames in AVI."""
    ms = [round(t * 1000) for t in times]
    path.parent.mkdir(parents=True, exist_ok=True)
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height = 64, 32
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        packets = []
        for n, t in enumerate(ms):
            frame = av.VideoFrame.from_ndarray(_numbered(n), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            packets += stream.encode(frame)
        packets += stream.encode()
        for k, packet in enumerate(packets):
            if swap:
                packet.pts, packet.dts = ms[min(k ^ 1, len(ms) - 1)], ms[k] - 100
            container.mux(packet)
    return path


def _numbered_video(path: Path, frames: int, fps: float, **kw) -> Path:
    return write_video(path, np.stack([_numbered(n) for n in range(frames)]), fps, **kw)


def test_a_variable_rate_video_keeps_the_frame_on_screen_at_each_grid_time(tmp_path):
    _timed_video(tmp_path / "src" / "vfr.mkv", VFR_TIMES)
    s = videos_to_shards(tmp_path / "src", tmp_path / "out", ShardSettings(clip_frames=4, max_fps=8), workers=1,
                         progress=False)
    clips = _keys_and_meta(tmp_path / "out")
    for _, meta, data in clips:
        assert meta["fps"] == 7.5 and meta["source_stride"] == 4  # the mkv states 30 fps
        for j, n in enumerate(_frame_numbers(data)):
            t = (meta["clip"] * 4 + j) / 7.5
            on_screen = max(k for k, tk in enumerate(VFR_TIMES) if tk <= t + 1e-3)
            assert n == on_screen, f"clip {meta['clip']} frame {j} at {t:.3f} s shows the frame of {VFR_TIMES[n]:.3f} s"
    assert len(clips) == 7  # 3.9 s at 7.5 fps: 30 grid times (by index: 60 frames / 4 = 15, 3 clips)
    assert {m["timing"] for _, m, _ in clips} == {"pts"}
    assert s.timestamped == 1 and "1 variable-rate read by timestamp" in s.text()
    # its rate is the stream's stated average over the stride (30 fps here, though it shows 30 then 10 fps)
    assert "read by timestamp on a grid at the stream's stated average rate / stride: vfr.mkv at 7.5 fps (30 fps / 4)" \
        in s.text()


def test_constant_rate_videos_keep_exactly_the_index_reading(tmp_path):
    src = tmp_path / "src"
    _numbered_video(src / "h264.mp4", 40, 24)  # B-frames: packets out of order
    _numbered_video(src / "mpeg4.avi", 40, 25, codec="mpeg4")
    _timed_video(src / "ntsc.mkv", [n * 1001 / 30000 for n in range(50)])  # ms timestamps: 33 / 34 ms steps
    s = videos_to_shards(src, tmp_path / "out", ShardSettings(clip_frames=4, max_fps=12), workers=1, progress=False)
    clips = _keys_and_meta(tmp_path / "out")
    assert len(clips) == 5 + 3 + 4
    for _, meta, data in clips:
        stride, first = meta["source_stride"], meta["clip"] * 4 * meta["source_stride"]  # every stride-th frame
        assert stride == {"h264.mp4": 2, "mpeg4.avi": 3, "ntsc.mkv": 3}[meta["source"]]
        assert meta["source_frames"] == [first, first + 3 * stride + 1]
        assert _frame_numbers(data) == [first + j * stride for j in range(4)], meta
    assert {m["timing"] for _, m, _ in clips} == {"index"} and s.timestamped == 0


def test_shuffled_timestamps_fall_back_to_the_index_reading(tmp_path, caplog):
    src = tmp_path / "src"
    _timed_video(src / "swapped.mkv", VFR_TIMES, codec="mjpeg", swap=True)  # variable-rate packets, shuffled frames
    with caplog.at_level("INFO", logger="mardini.data"):
        s = videos_to_shards(src, tmp_path / "out", ShardSettings(clip_frames=4, max_fps=8), workers=1,
                             progress=False, keep_staging=True)
    result = json.loads((tmp_path / "out" / ".staging" / "000000.json").read_text())
    assert result["timing"] == "index" and result["timing_reason"] == "timestamps not increasing"
    assert "swapped.mkv: frames kept by index (timestamps not increasing)" in caplog.text
    clips = _keys_and_meta(tmp_path / "out")
    assert s.timestamped == 0 and len(clips) == 3
    for _, meta, data in clips:  # frames in decoding order, every stride-th: not re-sorted by their timestamps
        stride = meta["source_stride"]
        assert meta["timing"] == "index" and stride == 4
        assert _frame_numbers(data) == [(meta["clip"] * 4 + j) * stride for j in range(4)]


def test_unreadable_timestamps_fall_back_to_the_index_reading(tmp_path, monkeypatch):
    _timed_video(tmp_path / "src" / "vfr.mkv", VFR_TIMES)

    def fail(container):
        raise OSError("corrupt index")

    monkeypatch.setattr(decode, "packet_timestamps", fail)
    s = videos_to_shards(tmp_path / "src", tmp_path / "out", ShardSettings(clip_frames=4, max_fps=8), workers=1,
                         progress=False, keep_staging=True)
    result = json.loads((tmp_path / "out" / ".staging" / "000000.json").read_text())
    assert result["timing"] == "index" and result["timing_reason"] == "timestamps unreadable: OSError: corrupt index"
    assert s.clips == 3 and s.timestamped == 0 and not s.skipped and not s.partial


def test_pts_grid_trusts_only_increasing_variable_rate_timestamps():
    ms, avi = Fraction(1, 1000), Fraction(1, 25)
    assert decode.pts_grid([1, 3, 2, 5, 4, 7, 6, 9], avi, 0.04) == (None, "timestamps not increasing")
    assert decode.pts_grid([0, 40, 40, 120], ms, 0.04) == (None, "timestamps not increasing")
    assert decode.pts_grid([0, 33, None, 100], ms, 0.04) == (None, "frames without a timestamp")
    assert decode.pts_grid([0], ms, 0.04) == (None, "fewer than 2 frames")
    jitter = [round(n * 1001 / 30) for n in range(300)]  # 29.97 fps in ms: 33 or 34 ms apart
    assert decode.pts_grid(jitter, ms, 0.1) == (None, "constant rate")
    assert decode.pts_grid([0, 40, 80, 2000, 2040], ms, 0.04) == (None, "timestamps jump by 1.92 s")
    grid, why = decode.pts_grid([0, 1, 2, 4, 5, 6], avi, 0.04)  # one frame dropped: shown twice
    assert why == "variable rate" and grid.tolist() == [0, 1, 2, 2, 3, 4, 5]
    grid, why = decode.pts_grid([0, 1, 2, 4, 5, 6], avi, 0.08)
    assert grid.tolist() == [0, 2, 3, 5]  # times 0, 2, 4, 6 (x 1/25 s)


def test_evaluation_and_sampling_read_a_variable_rate_video_as_the_shard_writer_cuts_it(tmp_path):
    """evaluate.py's window and sample.py's frames of a VFR file are the shard writer's clips (the same source
    frames, by timestamp); before, they took every 4th frame by index: 0.13 s steps in the 30 fps second, 0.4 s in
    the 10 fps rest, reported as 7.5 fps. A constant-rate file keeps the index reading's frames."""
    from mardini.data.decode import frame_indices, max_start
    from mardini.evaluation.data import read_video_window
    from mardini.pipeline.cli import video_stride
    from mardini.pipeline.inputs import read_video

    vfr = _timed_video(tmp_path / "src" / "vfr.mkv", VFR_TIMES)  # states 30 fps: 7.5 fps is stride 4 by both rules
    videos_to_shards(tmp_path / "src", tmp_path / "out", ShardSettings(clip_frames=9, clip_hop=1, max_fps=7.5),
                     workers=1, progress=False)
    cut = {m["clip"]: _frame_numbers(data) for _, m, data in _keys_and_meta(tmp_path / "out")}  # clip c: grid c..c+8
    assert len(cut) == 22  # 30 grid times
    window = read_video_window(str(vfr), 9, 7.5, 16)  # (video, fps, source frames, timing)
    idx = window[2]
    assert window[1:3] == (7.5, cut[(30 - 9) // 2]) and window[3:] == ("pts",)  # the centred one of 30 grid times
    on_screen = [max(k for k, tk in enumerate(VFR_TIMES) if tk <= (10 + j) / 7.5 + 1e-3) for j in range(9)]
    assert idx == on_screen  # at 1.33, 1.47, ... 2.4 s (by index: frames 13..45, 0.43 s to 2.5 s)
    stride, _, period = video_stride(str(vfr), 7.5, None)
    frames, note = read_video(vfr, 9, 0, stride, period)  # (9, 32, 64, 3)
    assert _frame_numbers(frames) == cut[0] and note.startswith("variable frame rate: read by timestamp")
    frames, _ = read_video(vfr, 9, 0, stride)  # --stride given: every 4th frame, by index
    assert _frame_numbers(frames) == list(range(0, 36, 4))

    cfr = tmp_path / "cfr"
    for path, fps in [(_numbered_video(cfr / "h264.mp4", 40, 24), 12), (_timed_video(
            cfr / "ntsc.mkv", [n * 1001 / 30000 for n in range(50)]), 10)]:  # B-frames; ms timestamps, 33 / 34 ms
        rate = {"h264.mp4": 24.0, "ntsc.mkv": 30.0}[path.name]  # the rates the containers state
        n = {"h264.mp4": 40, "ntsc.mkv": 50}[path.name]
        before, eff = frame_indices(rate, n, fps, 9, max_start(rate, n, fps, 9) // 2)  # the index reading
        _, got_fps, idx, timing = read_video_window(str(path), 9, fps, 16)
        assert (idx, timing) == (before.tolist(), "index") and got_fps == pytest.approx(eff)


def test_the_evaluation_report_says_which_videos_were_read_by_timestamp(tmp_path):
    from mardini.evaluation import cli

    vfr = _timed_video(tmp_path / "videos" / "a_vfr.mkv", VFR_TIMES)
    cfr = _numbered_video(tmp_path / "videos" / "b_cfr.mp4", 40, 30)
    out = tmp_path / "report"
    assert cli.main(["--data", str(tmp_path / "videos"), "--tasks", "interpolation", "--frames", "9", "--fps", "7.5",
                     "--resolution", "16", "--metrics", "midf", "--cache-dir", "", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["clip_list"] == [
        {"key": str(vfr), "frame_indices": [33, 34, 36, 37, 38, 40, 41, 42, 44], "fps": 7.5, "timing": "pts"},
        {"key": str(cfr), "frame_indices": list(range(3, 36, 4)), "fps": 7.5}]  # every 4th, as before
    assert report["timestamped"] == 1 and report["fps_effective"] == {"min": 7.5, "max": 7.5}
    assert "(fps: 7.5; 1 variable-rate read by timestamp)" in (out / "report.md").read_text()


def test_evaluation_at_the_native_rate_reads_a_variable_rate_video_frame_by_frame(tmp_path):
    """``fps`` None ("every frame", VIDIM-Bench's consecutive frames) reads a VFR file by index: the centred 9 of its
    60 frames, each once. Before, it was read by timestamp on a grid at the stated 30 fps, which repeats each frame of
    the file's 10 fps part three times ([38, 38, 38, 39, 39, 39, 40, 40, 40]). At a given fps it is still read by
    timestamp (test_evaluation_and_sampling_read_a_variable_rate_video_as_the_shard_writer_cuts_it)."""
    from mardini.evaluation.data import read_video_window

    vfr = _timed_video(tmp_path / "vfr.mkv", VFR_TIMES)
    video, fps, idx, timing = read_video_window(str(vfr), 9, None, 16)
    assert (idx, timing, fps) == (list(range(25, 34)), "index", 30.0)
    assert video.shape == (9, 3, 16, 16)


def test_a_variable_rate_window_that_does_not_fit_says_what_the_timestamp_reading_gives(tmp_path):
    """A VFR file too short for the window at a given fps is skipped (ClipTooShort) with the timestamp reading's
    count: 30 grid times every 0.133 s. Before, the message was the index reading's, with the grid's count as the
    file's: "need 40 frames at stride 1 (span 40) from frame 0, but the clip has 30 frames" (it has 60; stride 4)."""
    from mardini.data.decode import ClipTooShort
    from mardini.evaluation.data import read_video_window

    vfr = _timed_video(tmp_path / "vfr.mkv", VFR_TIMES)
    with pytest.raises(ClipTooShort) as err:
        read_video_window(str(vfr), 40, 7.5, 16)
    assert str(err.value).startswith(
        "variable frame rate: read by timestamp every 0.133 s it gives 30 frames, fewer than 40")


def test_a_variable_rate_file_is_decoded_for_its_timestamps_once_across_evaluation_passes(tmp_path, monkeypatch):
    """evaluate.py reads a window per pass (usable clips, each task): the whole-file decode for the frames'
    timestamps runs once per file version, and again after the file changes."""
    import os

    from mardini.evaluation.data import read_video_window

    vfr = _timed_video(tmp_path / "vfr.mkv", VFR_TIMES)
    opened = []  # every av.open: the packet pass, the timestamps' whole-stream decode, the window's decode
    real_open = decode.av.open
    monkeypatch.setattr(decode.av, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    first = read_video_window(str(vfr), 9, 7.5, 16)
    after_first = len(opened)
    second = read_video_window(str(vfr), 9, 7.5, 16)
    assert first[2] == second[2] and first[3] == "pts"
    assert after_first >= 3 and len(opened) - after_first == after_first - 1  # all but the timestamps' decode
    os.utime(vfr, ns=(0, 0))  # another file version: its timestamps are decoded again
    before = len(opened)
    read_video_window(str(vfr), 9, 7.5, 16)
    assert len(opened) - before == after_first


def test_the_timestamps_cache_keeps_8_bytes_a_frame_and_the_same_grid(tmp_path):
    """The remembered timestamps of up to 256 files (an hour at 30 fps is 108k frames): an int64 array, not a tuple
    of Python ints (36 bytes a frame), read-only since every later call shares it; the grid is the list's."""
    vfr = _timed_video(tmp_path / "vfr.mkv", VFR_TIMES)
    with decode.av.open(str(vfr)) as container:
        listed = [frame.pts for frame in container.decode(video=0)]
    pts, time_base = decode.frame_timestamps(str(vfr))
    print(f"cached timestamps: {type(pts).__name__} of {len(listed)} frames")
    assert isinstance(pts, np.ndarray) and pts.dtype == np.int64 and pts.nbytes == 8 * len(listed)
    assert pts.tolist() == listed and not pts.flags.writeable
    grid, why = decode.pts_grid(pts, time_base, 1 / 7.5)
    want, want_why = decode.pts_grid(listed, time_base, 1 / 7.5)
    assert why == want_why == "variable rate" and grid.tolist() == want.tolist()
    assert decode.pts_grid(decode.compact_timestamps([0, 33, None, 100]), Fraction(1, 1000), 0.04) == \
        (None, "frames without a timestamp")


# --------------------------------------------------------------------------------------------------
# Display geometry: rotation flags (phone portrait video) and non-square pixels (anamorphic video)
# --------------------------------------------------------------------------------------------------


def _corner_frames(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 ``(T, H, W, 3)``: black with a white top-left quadrant, so each turn or mirror is visible."""
    out = np.zeros((frames, height, width, 3), np.uint8)
    out[:, : height // 2, : width // 2] = 255
    return out


def _bright_corner(image: np.ndarray) -> str:
    """Which quadrant of an ``(H, W, 3)`` image is brightest."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    quads = {"top-left": image[:h, :w], "top-right": image[:h, w:], "bottom-left": image[h:, :w],
             "bottom-right": image[h:, w:]}
    return max(quads, key=lambda k: quads[k].mean())


def _flagged_video(path: Path, frames: np.ndarray, rotation: int = 0, sar: Fraction | None = None,
                   hflip: bool = False, vflip: bool = False) -> Path:
    """An H.264 mp4 of ``frames`` at 24 fps whose stream carries a display matrix (rotation, flips) and / or a sample
    aspect ratio."""
    return write_video(path, frames, 24, rotation=rotation, sar=sar, hflip=hflip, vflip=vflip)


def _coded_frames(path: Path) -> np.ndarray:
    """uint8 ``(T, H, W, 3)``: a file's frames as coded (PyAV's ``to_ndarray``, no display matrix applied)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_rotation_flags_and_non_square_pixels_are_applied_by_the_sharder_and_the_decoder(tmp_path):
    """A landscape-coded file flagged 90 degrees counter-clockwise (a player shows it portrait: the coded top-left
    corner at the bottom left) is stored and read portrait, and one of 4:3 pixels at its 16:9 display shape; before,
    both kept their coded geometry (84x48 from 640x360 rotated; 64x48 from 480x360 at SAR 4/3, 4:3 instead of 16:9).
    A file with neither decodes exactly as PyAV's ``to_ndarray`` did."""
    import av

    from mardini.pipeline.inputs import read_video

    src = tmp_path / "src"
    corner = _corner_frames(8, 32, 64)  # (T, 32, 64, 3) landscape, bright top-left
    files = {
        "ccw.mp4": (_flagged_video(src / "ccw.mp4", corner, rotation=90), (64, 32), "bottom-left"),
        "cw.mp4": (_flagged_video(src / "cw.mp4", corner, rotation=-90), (64, 32), "top-right"),
        "sar.mp4": (_flagged_video(src / "sar.mp4", _corner_frames(8, 36, 48), sar=Fraction(4, 3)), (36, 64),
                    "top-left"),
        "plain.mp4": (_flagged_video(src / "plain.mp4", corner), (32, 64), "top-left"),
    }
    with av.open(str(src / "ccw.mp4")) as container:
        assert next(container.decode(video=0)).rotation == 90  # PyAV's convention: counter-clockwise degrees
    for name, (path, (h, w), bright) in files.items():
        for video in (decode_mp4(str(path)), decode_mp4(path.read_bytes()), read_video(path, 8)[0]):
            assert video.shape == (8, h, w, 3) and _bright_corner(video[0]) == bright, name
    with av.open(str(files["plain.mp4"][0])) as container:
        plain = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # (8, 32, 64, 3)
    assert np.array_equal(decode_mp4(str(files["plain.mp4"][0])), plain)

    s = videos_to_shards(src, tmp_path / "out", ShardSettings(clip_frames=4, short_side=16), workers=1,
                         progress=False)
    assert s.clips == 8 and s.rotated == 2 and s.stretched == 1
    assert "2 turned by a rotation flag, 1 stretched to square pixels" in s.text()
    stored = {"ccw.mp4": (32, 16, 90, "1"), "cw.mp4": (32, 16, 270, "1"), "sar.mp4": (16, 28, 0, "4/3"),
              "plain.mp4": (16, 32, 0, "1")}  # (height, width, rotation, sar); 16 x 28.4 -> 28 (even)
    for _, meta, data in _keys_and_meta(tmp_path / "out"):
        h, w, rotation, sar = stored[meta["source"]]
        assert (meta["height"], meta["width"], meta["source_rotation"], meta["source_sar"]) == (h, w, rotation, sar)
        clip = decode_mp4(data)  # (4, H, W, 3)
        assert clip.shape == (4, h, w, 3) and _bright_corner(clip[0]) == files[meta["source"]][2], meta["source"]


def test_the_rotation_falls_back_to_the_stream_s_rotate_tag(tmp_path):
    """A frame without a display matrix (or whose matrix leaves it as coded) takes the stream's ``rotate`` tag,
    clockwise degrees as older FFmpeg wrote it; none gives no turn, never an error. A matrix's angle between quarter
    turns is rounded to the nearest one; a matrix scaled (a zoom) is read by its direction, a degenerate one as none."""
    import math
    from types import SimpleNamespace

    import av

    def stream(tag=None):
        return SimpleNamespace(metadata={} if tag is None else {"rotate": tag})

    def turn(ccw, scale=1.0):  # av_display_rotation_set(m, -ccw) in 16.16: what frame.rotation reads as ``ccw``
        c, s = scale * math.cos(math.radians(ccw)), scale * math.sin(math.radians(ccw))
        return [round(v * 65536) for v in (c, -s, 0, s, c, 0)] + [0, 0, 1 << 30]

    assert decode.matrix_orientation(turn(-90)) == (270, "")
    assert decode.matrix_orientation(turn(180.4, scale=2.0)) == (180, "")
    assert decode.matrix_orientation(turn(80)) == (90, "")
    assert decode.matrix_orientation([0] * 8 + [1 << 30]) == (0, "")  # degenerate: as coded
    plain = av.VideoFrame(16, 16, "rgb24")  # a PyAV frame without a display matrix
    assert decode.frame_orientation(plain, stream("90")) == (270, "")  # 90 clockwise = 270 counter-clockwise
    assert decode.frame_orientation(plain, stream("-90")) == (90, "")
    assert decode.frame_orientation(plain, stream("junk")) == (0, "")
    assert decode.frame_orientation(SimpleNamespace(), SimpleNamespace()) == (0, "")  # no frame, no metadata
    path = _flagged_video(tmp_path / "vflip.mp4", _corner_frames(2, 16, 16), vflip=True)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))  # frame.rotation 0: only the matrix says vflip
        assert frame.rotation == 0 and decode.frame_orientation(frame, stream("90")) == (0, "vflip")


# (rotation, hflip, vflip) as written (ffmpeg -display_rotation R -display_hflip -display_vflip) -> the filters
# FFmpeg's autorotation inserts for that matrix (fftools get_rotation and the transpose / hflip / vflip it picks),
# as numpy on (H, W, 3) coded frames, and the quadrant the coded top-left one is shown in.
FFMPEG_AUTOROTATION = {
    (0, True, False): ("hflip", np.fliplr, "top-right"),
    (0, False, True): ("vflip", np.flipud, "bottom-left"),
    (90, True, False): ("transpose=clock_flip", lambda x: np.flipud(np.rot90(x, -1)), "bottom-right"),
    (90, False, True): ("transpose=cclock_flip", lambda x: np.transpose(x, (1, 0, 2)), "top-left"),
    (270, True, False): ("transpose=cclock_flip", lambda x: np.transpose(x, (1, 0, 2)), "top-left"),
    (180, True, False): ("vflip", np.flipud, "bottom-left"),
    (0, True, True): ("hflip,vflip", lambda x: np.flipud(np.fliplr(x)), "bottom-right"),
}


def test_mirror_flags_of_the_display_matrix_are_applied_as_ffmpeg_autorotation_applies_them(tmp_path):
    """A display matrix that mirrors (front-camera phone video, ``ffmpeg -display_hflip`` / ``-display_vflip``: a
    negative determinant) is shown flipped back, exactly as ffmpeg / ffplay autorotation shows it, alone and with a
    quarter turn; every one of the 16 (rotation, hflip, vflip) matrices is the coded frames turned counter-clockwise
    then flipped. Before, the flips were dropped: an hflip file (PyAV's ``frame.rotation`` -180) came out turned a
    half turn (top-left -> bottom-right instead of top-right), a vflip one as coded, a 90-degree + hflip one as a
    plain 90-degree turn (bottom-left instead of bottom-right). Decoding keeps no frame alive after it returns."""
    import gc

    import av

    from mardini.pipeline.inputs import read_video

    frames = _corner_frames(4, 32, 64)  # (T, 32, 64, 3) landscape, bright top-left: every flip or turn shows
    frames[:, :4] = 128  # and a grey top edge: symmetric under no flip or turn
    for (rotation, hflip, vflip), (filters, op, corner) in FFMPEG_AUTOROTATION.items():
        path = _flagged_video(tmp_path / f"r{rotation}h{hflip:d}v{vflip:d}.mp4", frames, rotation, hflip=hflip,
                              vflip=vflip)
        coded = _coded_frames(path)  # (4, 32, 64, 3)
        want = np.stack([op(f) for f in coded])  # (4, H', W', 3) as ffmpeg autorotation shows it
        for video in (decode_mp4(str(path)), decode_mp4(path.read_bytes()), read_video(path, 4)[0]):
            assert np.array_equal(video, want), (rotation, hflip, vflip, filters)
            assert _bright_corner(video[0]) == corner, (rotation, hflip, vflip, filters)
    for rotation in (0, 90, 180, 270):
        for hflip in (False, True):
            for vflip in (False, True):
                path = _flagged_video(tmp_path / f"g{rotation}{hflip:d}{vflip:d}.mp4", frames, rotation,
                                      hflip=hflip, vflip=vflip)
                want = np.rot90(_coded_frames(path), rotation // 90, axes=(1, 2))  # (4, H', W', 3) ccw turn
                want = want[:, :, ::-1] if hflip else want  # then the flips, as the matrix was written
                want = want[:, ::-1] if vflip else want
                assert np.array_equal(decode_mp4(str(path)), want), (rotation, hflip, vflip)

    gc.collect()
    gc.disable()  # a frame kept alive by a reference cycle (frame.side_data) stays listed; one freed does not
    try:
        decode_mp4(str(path))
        kept = [o for o in gc.get_objects() if type(o) is av.VideoFrame]
    finally:
        gc.enable()
    assert not kept, f"{len(kept)} decoded frames (and their decoder's threads) wait for the garbage collector"


def test_the_sharder_stores_mirrored_files_flipped_back_and_records_the_flip(tmp_path):
    """The sharder stores a mirrored file as a player shows it and its clips' json say ``source_flip`` (with
    ``source_rotation``, the turn before it); the summary counts mirrored files. Before, the hflip file was stored
    turned a half turn (``source_rotation`` 180, counted as turned), the vflip one as coded."""
    src = tmp_path / "src"
    frames = _corner_frames(8, 32, 64)  # (T, 32, 64, 3), bright top-left
    _flagged_video(src / "hflip.mp4", frames, hflip=True)
    _flagged_video(src / "vflip.mp4", frames, vflip=True)
    _flagged_video(src / "ccw_hflip.mp4", frames, rotation=90, hflip=True)
    _flagged_video(src / "plain.mp4", frames)
    s = videos_to_shards(src, tmp_path / "out", ShardSettings(clip_frames=4, short_side=16), workers=1,
                         progress=False)
    assert s.clips == 8 and s.rotated == 1 and s.mirrored == 3
    assert "1 turned by a rotation flag, 3 mirrored by a display matrix" in s.text()
    stored = {"hflip.mp4": (16, 32, 0, "hflip", "top-right"), "vflip.mp4": (16, 32, 0, "vflip", "bottom-left"),
              "ccw_hflip.mp4": (32, 16, 90, "hflip", "bottom-right"), "plain.mp4": (16, 32, 0, "", "top-left")}
    for _, meta, data in _keys_and_meta(tmp_path / "out"):
        h, w, rotation, flip, corner = stored[meta["source"]]
        assert (meta["height"], meta["width"], meta["source_rotation"], meta["source_flip"]) == (h, w, rotation, flip)
        clip = decode_mp4(data)  # (4, H, W, 3)
        assert clip.shape == (4, h, w, 3) and _bright_corner(clip[0]) == corner, meta["source"]


# --------------------------------------------------------------------------------------------------
# Which files are read
# --------------------------------------------------------------------------------------------------


def test_camera_and_broadcast_containers_are_read_and_other_files_are_counted(tmp_path, capsys):
    """AVCHD (.MTS), Windows Media (.wmv), phone (.3gp) files are read like .mp4; a file of another extension is
    counted and named in the summary, and ``--ext`` reads it. Before, only ok.MP4 was read: "2 clips in 1 shards
    ... from 1 files; 0 skipped", no word on the other three."""
    src, frames = tmp_path / "v", moving_frames(16, 32, 32)
    write_video(src / "ok.MP4", frames, 24)
    write_video(src / "cam" / "x.MTS", frames, 24, fmt="mpegts")
    write_video(src / "y.wmv", frames, 24, codec="wmv2", fmt="asf")
    write_video(src / "z.3gp", frames, 24, fmt="3gp")
    write_video(src / "capture.xyz", frames, 24, fmt="mpegts")  # a video under an extension no list knows
    (src / "notes.txt").write_text("not a video")
    assert _shard_cli(src, tmp_path / "o", "--clip-frames", "8") == 0
    out = capsys.readouterr().out
    assert "8 clips in 1 shards (1 written, 0 kept) from 4 files; 0 skipped, 0 partly decoded, 2 other files not read" in out
    assert "not read (1 x .txt, 1 x .xyz; e.g. capture.xyz, notes.txt)" in out and "--ext" in out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert sorted(manifest["inputs"]) == ["cam/x.MTS", "ok.MP4", "y.wmv", "z.3gp"]
    assert _shard_cli(src, tmp_path / "o2", "--clip-frames", "8", "--ext", "XYZ") == 0
    assert "10 clips in 1 shards (1 written, 0 kept) from 5 files; 0 skipped, 0 partly decoded, 1 other files" \
        in capsys.readouterr().out
    assert _shard_cli(src, tmp_path / "o3", "--ext", "a/b") == 2
    assert "error: --ext 'a/b' is not a file extension" in capsys.readouterr().err


def test_a_folder_of_no_known_video_extension_names_its_files(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    write_video(tmp_path / "v" / "a.xyz", moving_frames(16, 32, 32), 24, fmt="mpegts")
    assert _shard_cli(tmp_path / "v", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "error: no video files (" in err and "it holds 1 other files (a.xyz): if they are videos, add their " \
        "extension with --ext" in err


def test_a_file_cut_short_is_listed_as_partly_decoded(tmp_path):
    """A 4-s mkv cut at 60 % still states 4.0 s and decodes without an error to 2.4 s: it keeps its clips and is
    listed as partial, naming where its frames end; cut shorter than a clip, its skip says so. Before, the summary
    said "0 partly decoded". Whole files of several containers, one with a longer audio track, are not flagged."""
    import av

    src = tmp_path / "v"
    whole = write_video(tmp_path / "whole.mkv", moving_frames(120, 32, 32), 30, codec="mjpeg",
                        pix_fmt="yuvj420p").read_bytes()  # intra-only, the same bytes every time
    (src / "cut.mkv").parent.mkdir(parents=True)
    (src / "cut.mkv").write_bytes(whole[: int(len(whole) * 0.6)])
    for name, fmt in (("whole.mkv", None), ("whole.ts", "mpegts"), ("whole.avi", None)):
        write_video(src / name, moving_frames(40, 32, 32), 25, fmt=fmt)
    with av.open(str(src / "audio.mp4"), "w") as container:  # video 1.6 s, audio 4 s: the container says 4 s
        video, audio = container.add_stream("libx264", rate=25), container.add_stream("aac", rate=48000)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        for img in moving_frames(40, 32, 32):
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        for k in range(4 * 48000 // 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, k * 1024
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)

    s = videos_to_shards(src, tmp_path / "out", ShardSettings(clip_frames=16), workers=1, progress=False)
    assert s.partial == {"cut.mkv": "truncated: the frames end at 2.4 s of the 4.0 s the file states; 4 clips kept"}
    assert not s.skipped and s.clips == 4 + 4 * 2 and "1 partly decoded" in s.text()
    s = videos_to_shards(src, tmp_path / "out80", ShardSettings(clip_frames=80), workers=1, progress=False)
    assert s.skipped["cut.mkv"] == ("too short: 73 frames give 73 stored frames, fewer than one clip of 80 "
                                    "(truncated: the frames end at 2.4 s of the 4.0 s the file states)")


def test_the_same_command_on_a_finished_folder_says_it_was_already_complete(tmp_path, capsys):
    """Before, the re-run printed the first run's "2 clips in 1 shards (1 written, 0 kept)" though it wrote
    nothing."""
    write_video(tmp_path / "v" / "a.mp4", moving_frames(16, 32, 32), 24)
    assert _shard_cli(tmp_path / "v", tmp_path / "o", "--clip-frames", "8") == 0
    assert capsys.readouterr().out.startswith("2 clips in 1 shards (1 written, 0 kept) from 1 files")
    stamp = (tmp_path / "o" / "clips-000000.tar").stat().st_mtime_ns
    assert _shard_cli(tmp_path / "v", tmp_path / "o", "--clip-frames", "8") == 0
    assert capsys.readouterr().out.startswith(
        "already complete, nothing done: 2 clips in 1 shards (0 written, 1 kept) from 1 files")
    assert (tmp_path / "o" / "clips-000000.tar").stat().st_mtime_ns == stamp


def test_a_folder_of_the_older_shard_format_is_not_kept_or_completed(tmp_path, capsys, monkeypatch):
    """A folder written before rotation flags were applied (format 1, no "format" in its manifest) held the same
    fingerprint as this run's, so the same command kept its landscape clips as "already complete" (or completed an
    unfinished one with clips of the other layout); now the format is part of the fingerprint and the refusal names it.
    So is a folder of format 2, written before mirror flags were applied (a mirrored file's clips differ)."""
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    src, out = tmp_path / "v", tmp_path / "o"
    write_video(src / "a.mp4", moving_frames(16, 32, 32), 24)
    assert _shard_cli(src, out, "--clip-frames", "8") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == video_shards.SHARD_FORMAT
    old = hashlib.sha256(json.dumps(manifest["settings"], sort_keys=True).encode())  # the fingerprint before formats
    for rel, size in manifest["inputs"].items():
        old.update(f"{rel}\0{size}\n".encode())
    manifest = {k: v for k, v in manifest.items() if k != "format"} | {"fingerprint": old.hexdigest()[:16]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert _shard_cli(src, out, "--clip-frames", "8") == 2
    err = capsys.readouterr().err
    assert f"format 1 -> {video_shards.SHARD_FORMAT} (written by an older version of the sharder" in err
    assert "already complete" not in err

    format2 = hashlib.sha256(json.dumps({**manifest["settings"], "format": 2}, sort_keys=True).encode())
    for rel, size in manifest["inputs"].items():
        format2.update(f"{rel}\0{size}\n".encode())
    (out / "manifest.json").write_text(json.dumps(manifest | {"format": 2, "fingerprint": format2.hexdigest()[:16]}))
    assert _shard_cli(src, out, "--clip-frames", "8") == 2
    err = capsys.readouterr().err
    assert video_shards.SHARD_FORMAT == 3
    assert "format 2 -> 3 (written by an older version of the sharder, before mirror flags were applied)" in err


def _config_clips() -> list[tuple[str, int, float]]:
    """``(config, frames, fps)`` of each shipped config under configs/ that sets its clips' frames and fps."""
    import yaml

    out = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        data = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("init_args") or {}
        if "frames" in data and "fps" in data:
            out.append((str(path.relative_to(ROOT)), int(data["frames"]), float(data["fps"])))
    return out


def test_the_script_s_defaults_are_the_library_s():
    """``ShardSettings()`` cut 32 frames at each source's rate, while ``python data/videos_to_shards.py IN OUT`` cut
    65 at 30 fps at most (the clips every shipped config reads): a library caller got shards the 17-frame stages
    refuse. The script's defaults are now read from the dataclass, whose defaults are the script's."""
    from dataclasses import asdict, fields

    cli = _cli()
    a = cli.parse_args(["IN", "OUT"])
    assert {f.name: getattr(a, f.name) for f in fields(ShardSettings)} == asdict(ShardSettings())
    assert cli.settings_from(a) == ShardSettings()


def test_the_cli_defaults_cut_clips_every_shipped_config_reads():
    """``python data/videos_to_shards.py IN OUT`` with no options cut 32-frame clips at each source's rate: a 30 fps
    source gave clips the 17-frame stages at 8 fps (a span of 65 stored frames) refused, a 187 fps one clips no
    stage read. The defaults now keep at most --max-fps and cut --clip-frames that span every config's frames at its
    fps, whatever the source's rate (the writer's stride, then the stage's: keep_stride, frame_stride)."""
    from mardini.data.decode import ClipTooShort, max_start
    from mardini.data.video_shards import keep_stride

    a = _cli().parse_args(["IN", "OUT"])
    configs = _config_clips()
    assert len(configs) >= 20 and {fps for _, _, fps in configs} >= {4.0, 8.0}
    assert a.max_fps, "--max-fps must default to a rate: at each source's own no clip length fits every source"
    short = []
    for source in (7.5, 12, 23.976, 24, 25, 29.97, 30, 48, 50, 59.94, 60, 90, 120, 187, 240, a.max_fps):
        stored = source / keep_stride(source, a.max_fps)
        for config, frames, fps in configs:
            try:
                max_start(stored, a.clip_frames, fps, frames)
            except ClipTooShort as err:
                short.append(f"{source} fps source, {config}: {err}")
    assert not short, "\n".join(short[:5])

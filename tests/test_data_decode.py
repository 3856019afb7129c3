"""Frame selection at a target fps, decoding of mp4/npy members with clear errors, crops and the shared resize."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from av.codec.context import CodecContext

from mardini.data.decode import (
    BadMetadata,
    BadShape,
    ClipTooShort,
    CorruptVideo,
    decode_json,
    decode_mp4,
    decode_npy,
    frame_indices,
    frame_stride,
    max_start,
)
from mardini.data.encode import encode_mp4
from mardini.data.sharding import npy_bytes, pack
from mardini.data.testing import moving_frames
from mardini.data.transforms import crop_and_resize, crop_box, resize_video

# --------------------------------------------------------------------------------------------------
# fps resampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src,target,stride,eff",
    [(16, 8, 2, 8.0), (24, 8, 3, 8.0), (29.97, 8, 4, 29.97 / 4), (7, 8, 1, 7.0), (30, None, 1, 30.0),
     (60, 25, 2, 30.0)],
)
def test_stride_comes_from_the_clips_own_fps(src, target, stride, eff):
    assert frame_stride(src, target) == stride
    idx, fps = frame_indices(src, 1000, target, 5, start=3)
    assert idx.tolist() == [3 + stride * i for i in range(5)]
    assert fps == pytest.approx(eff)


def test_clip_too_short_and_max_start():
    assert max_start(16, 32, 8, 9) == 32 - 17  # span of 9 frames at stride 2 is 17
    frame_indices(16, 17, 8, 9, start=0)  # exactly fits
    with pytest.raises(ClipTooShort, match="span 17"):
        frame_indices(16, 16, 8, 9)
    with pytest.raises(ClipTooShort):
        max_start(16, 16, 8, 9)
    with pytest.raises(BadMetadata, match="fps"):
        frame_stride(0.0, 8)


# --------------------------------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------------------------------


def test_decode_mp4_picks_the_requested_frames():
    frames = moving_frames(20, 32, 48)  # (T, H, W, 3)
    data = encode_mp4(frames, 12.0, crf=10)
    full = decode_mp4(data)
    assert full.shape == frames.shape
    idx = np.array([1, 5, 9, 13])
    part = decode_mp4(data, idx)
    assert np.array_equal(part, full[idx])
    err = np.abs(part.astype(int) - frames[idx].astype(int)).mean(axis=(1, 2, 3))
    wrong = np.abs(part.astype(int) - frames[idx + 1].astype(int)).mean(axis=(1, 2, 3))
    assert (err < wrong).all()  # the moving square is where frame idx has it, not idx+1
    with pytest.raises(ClipTooShort, match="20 frames"):
        decode_mp4(data, np.array([0, 25]))


def test_decode_errors_name_the_problem():
    data = encode_mp4(moving_frames(6, 16, 16), 8)
    with pytest.raises(CorruptVideo):
        decode_mp4(b"\x00" * 300)
    with pytest.raises((CorruptVideo, ClipTooShort)):
        decode_mp4(data[: len(data) // 3])  # truncated
    with pytest.raises(BadShape, match="uint8"):
        decode_npy(npy_bytes(np.zeros((2, 4, 4, 3), np.float32)))
    with pytest.raises(CorruptVideo):
        decode_npy(b"junk")
    with pytest.raises(ClipTooShort):
        decode_npy(npy_bytes(np.zeros((2, 4, 4, 3), np.uint8)), np.array([0, 2]))
    with pytest.raises(BadMetadata, match="parse"):
        decode_json(b"{not json")
    with pytest.raises(BadMetadata, match="frames"):
        decode_json(json.dumps({"fps": 8}).encode())


def test_a_too_short_video_s_error_leaves_no_decoder_for_the_garbage_collector():
    """decode_mp4's ClipTooShort was a local of the frame its traceback holds: a reference cycle that kept the decoder
    (and its threads) until the garbage collector ran, and a loader worker forked meanwhile hung in its own collector
    freeing it (tests/test_data_empty_shards.py's one-worker stream, run after this file)."""
    data = encode_mp4(moving_frames(20, 32, 48), 12.0)

    def decoders() -> set[int]:
        # (by type: isinstance reads __class__, which one of torch's objects answers with a FutureWarning)
        return {id(o) for o in gc.get_objects() if issubclass(type(o), CodecContext)}

    gc.collect()
    before = decoders()
    gc.disable()  # what the call leaves is freed by reference counts alone, or not at all
    try:
        with pytest.raises(ClipTooShort, match="20 frames") as caught:
            decode_mp4(data, np.array([0, 25]))
        assert caught.value.decoded == 20
        del caught
        left = decoders() - before
        assert not left, f"{len(left)} decoder(s) left to the garbage collector"  # (with their threads)
    finally:
        gc.enable()


def test_encode_mp4_gives_the_same_bytes_call_after_call_and_in_another_process():
    """The same frames encode to the same bytes whatever the process did before. Before, x264's SIMD macroblock-tree
    propagation made the bytes depend on the process's memory: 88x160 and 90x160 frames encoded 8 times in one
    process, with other allocations between the calls, gave several different files."""
    rng = np.random.default_rng(0)
    held = []  # allocations kept between the calls: each encode meets another heap
    for height, width in [(88, 160), (90, 160)]:
        frames = moving_frames(16, height, width, seed=2)  # (16, H, W, 3)
        outs = set()
        for _ in range(8):
            held += [rng.bytes(int(n)) for n in rng.integers(100, 200_000, 16)][::2]
            outs.add(encode_mp4(frames, 24))
        assert len(outs) == 1, f"{height}x{width} frames gave {len(outs)} different files"
    code = ("import sys; from mardini.data.encode import encode_mp4; from mardini.data.testing import moving_frames; "
            "sys.stdout.buffer.write(encode_mp4(moving_frames(16, 88, 160, seed=2), 24))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env=env).stdout
    assert other == encode_mp4(moving_frames(16, 88, 160, seed=2), 24)


def test_npy_round_trip():
    v = moving_frames(5, 8, 10)
    assert np.array_equal(decode_npy(npy_bytes(v), np.array([0, 4])), v[[0, 4]])


def test_pack_respects_count_and_bytes():
    shards = pack([10, 10, 10, 50, 10, 10], max_count=2, max_bytes=30)
    assert shards == [[0, 1], [2], [3], [4, 5]]


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def test_resize_video_shapes_identity_and_constant():
    v = torch.rand(2, 3, 3, 20, 30) * 2 - 1
    assert resize_video(v, (20, 30)) is v
    assert resize_video(v, 8).shape == (2, 3, 3, 8, 8)
    assert resize_video(v, (10, 15)).shape == (2, 3, 3, 10, 15)
    c = torch.full((1, 2, 3, 16, 16), 0.25)
    assert torch.allclose(resize_video(c, 5), torch.full((1, 2, 3, 5, 5), 0.25))
    # anti-aliased: a 1-pixel checkerboard averages to its mean instead of aliasing
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 2.0 - 1  # (32, 32) in {-1, 1}
    small = resize_video(checker.expand(1, 1, 3, 32, 32), 8)
    assert small.abs().max() < 0.05
    with pytest.raises(ValueError, match="B, T"):
        resize_video(torch.zeros(3, 8, 8), 4)


def test_crop_box_center_and_random():
    assert crop_box(48, 64, 32, "center") == (0, 8, 48, 48)  # largest centred square
    assert crop_box(48, 64, (24, 64), "center") == (12, 0, 24, 64)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    boxes = [crop_box(48, 64, 16, "random", g1, (0.5, 1.0)) for _ in range(20)]
    assert boxes == [crop_box(48, 64, 16, "random", g2, (0.5, 1.0)) for _ in range(20)]
    assert len(set(boxes)) > 5
    for top, left, h, w in boxes:
        assert h == w and 24 <= h <= 48 and top + h <= 48 and left + w <= 64
    with pytest.raises(ValueError, match="crop mode"):
        crop_box(8, 8, 4, "middle")


def test_crop_and_resize_range_and_layout():
    frames = moving_frames(3, 20, 40)
    video, box = crop_and_resize(frames, 10, "center")
    assert video.shape == (3, 3, 10, 10) and video.dtype == torch.float32
    assert -1 <= float(video.min()) and float(video.max()) <= 1
    assert box == (0, 10, 20, 20)
    ref = resize_video(torch.from_numpy(frames[:, :, 10:30]).permute(0, 3, 1, 2)[None].float() / 127.5 - 1, 10)[0]
    assert torch.allclose(video, ref, atol=1e-5)

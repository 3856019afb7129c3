"""Encoding clips to H.264 bytes with PyAV (used by the video sharder and ``visualize.save_mp4``)."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np


def as_rate(fps: float | Fraction) -> Fraction:
    """A frame rate as a Fraction (29.97 -> 30000/1001), as the muxer wants it."""
    if isinstance(fps, Fraction):
        return fps
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return Fraction(fps).limit_denominator(1001)


# x264 settings that make the bytes a function of the frames and the arguments alone: one thread (x264's output
# depends on its thread count, by default the machine's cores: sliced threads cut each frame into that many slices),
# and cpu-independent (the SIMD versions of its macroblock-tree propagation gave bytes that changed with the
# process's memory state: the same 88x160 frames encoded several times in one process gave several different files;
# cpu-independent takes the C versions). The explicit yuv420p conversion (the pixels PyAV's encoder converted to
# before) did not, alone, make the bytes stable.
DETERMINISTIC_X264 = {"threads": "1", "x264-params": "cpu-independent=1"}


def encode_mp4(frames: np.ndarray, fps: float | Fraction, crf: int = 18, preset: str = "veryfast") -> bytes:
    """uint8 ``(T, H, W, 3)`` RGB frames -> MP4 (H.264, yuv420p) bytes. H and W must be even.

    ``crf`` 18 is visually near-lossless; raise it for smaller shards. The same frames and arguments give the same
    bytes, call after call and process after process (:data:`DETERMINISTIC_X264`), so the same videos give the same
    shards.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t < 1 or h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs >= 1 frame and even sizes, got {t} frames of {h}x{w}; crop or resize")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=as_rate(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset, **DETERMINISTIC_X264}
        for img in frames:  # (H, W, 3)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")  # Y (H, W); U, V /2
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)
    return buf.getvalue()

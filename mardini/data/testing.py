"""Small videos and shard sets for tests and examples: moving frames, PyAV writers, a tiny synthetic set."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def moving_frames(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 ``(T, H, W, 3)``: a bright square moving right over a gradient, so frame order is visible."""
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 120, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    base = base + rng.uniform(0, 20, size=3).astype(np.float32)  # (H, W, 3)
    out = np.repeat(base[None], frames, axis=0)  # (T, H, W, 3)
    side = max(2, min(height, width) // 4)
    for t in range(frames):
        x = int(t * (width - side) / max(1, frames - 1))
        out[t, :side, x : x + side] = 250.0
    return out.astype(np.uint8)


def write_video(path: Path, frames: np.ndarray, fps: float | Fraction, codec: str = "libx264",
                pix_fmt: str = "yuv420p", fmt: str | None = None, rotation: int = 0,
                sar: Fraction | None = None, hflip: bool = False, vflip: bool = False) -> Path:
    """Write ``frames`` (T, H, W, 3) with PyAV in any codec/container; ``rotation``: a display rotation flag
    (PyAV's counter-clockwise degrees, what ``frame.rotation`` reads back), ``hflip`` / ``vflip``: mirror flags after
    it in the same display matrix (as ``ffmpeg -display_rotation R -display_hflip -display_vflip`` writes it),
    ``sar``: a sample aspect ratio."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if rotation or hflip or vflip:
            s.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        if sar is not None:
            s.codec_context.sample_aspect_ratio = sar
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


# --------------------------------------------------------------------------------------------------
# Tiny shard sets
# --------------------------------------------------------------------------------------------------


def tiny_synthetic(root: Path, train: int = 24, val: int = 16, frames: int = 12, size: int = 16) -> Path:
    """A small synthetic set: train in 6-clip shards, val in 2-clip shards (8 shards for 16 clips)."""
    from mardini.data.synthetic_shards import write_synthetic_split

    write_synthetic_split(root, "train", train, 6, frames=frames, height=size, width=size, fps=16.0, progress=False)
    write_synthetic_split(root, "val", val, 2, frames=frames, height=size, width=size, fps=16.0, progress=False)
    return root

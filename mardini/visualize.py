"""Looking at clips: a PNG contact sheet (given frames framed in colour), GIF and MP4 writers."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

GIVEN_COLOR = (40, 200, 60)  # border of reference (given) frames
GENERATED_COLOR = (70, 70, 70)  # border of generated frames
BACKGROUND = (20, 20, 20)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """``(..., 3, H, W)`` in [-1, 1] -> uint8 ``(..., H, W, 3)``."""
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (..., 3, H, W)
    return x.movedim(-3, -1).numpy()  # (..., H, W, 3)


def contact_sheet(
    video: torch.Tensor,
    path: str | Path | None,
    mask: torch.Tensor | None = None,
    row_labels: list[str] | None = None,
    min_cell: int = 64,
    border: int = 2,
) -> Path | Image.Image:
    """Write a grid PNG: one row per clip, one column per frame.

    Args:
        video: ``(B, T, 3, H, W)`` in [-1, 1].
        path: output ``.png``; None returns the ``PIL.Image`` instead of writing it.
        mask: ``(B, T)`` bool, True = generated; given frames (False) get a green border. None = no borders.
        row_labels: one text label per row, drawn left of the row.
        min_cell: frames smaller than this are enlarged (nearest, integer factor) so they stay visible.
    """
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"contact_sheet expects video (B, T, 3, H, W), got {tuple(video.shape)}")
    b, t, _, h, w = video.shape
    if mask is not None and tuple(mask.shape) != (b, t):
        raise ValueError(f"mask must be (B, T) = {(b, t)}, got {tuple(mask.shape)}")
    if row_labels is not None and len(row_labels) != b:
        raise ValueError(f"row_labels needs {b} labels (one per clip), got {len(row_labels)}")
    frames = to_uint8(video)  # (B, T, H, W, 3)
    k = max(1, -(-min_cell // max(h, w)))  # integer enlargement
    frames = frames.repeat(k, axis=2).repeat(k, axis=3)  # (B, T, kH, kW, 3)
    ch, cw = h * k + 2 * border, w * k + 2 * border  # cell size with its border
    gap = 2
    label_w = 0 if row_labels is None else 8 + 7 * max(len(s) for s in row_labels)
    sheet = np.empty((b * (ch + gap) + gap, label_w + t * (cw + gap) + gap, 3), np.uint8)  # (H_s, W_s, 3)
    sheet[:] = BACKGROUND
    for i in range(b):
        for j in range(t):
            y, x = gap + i * (ch + gap), label_w + gap + j * (cw + gap)
            if mask is not None:
                sheet[y : y + ch, x : x + cw] = GENERATED_COLOR if bool(mask[i, j]) else GIVEN_COLOR
            sheet[y + border : y + ch - border, x + border : x + cw - border] = frames[i, j]
    img = Image.fromarray(sheet)
    if row_labels is not None:
        draw = ImageDraw.Draw(img)
        for i, label in enumerate(row_labels):
            draw.text((4, gap + i * (ch + gap) + ch // 2 - 5), label, fill=(230, 230, 230))
    if path is None:
        return img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def gif_durations(frames: int, fps: float) -> list[int]:
    """Per-frame GIF delays in ms: GIF stores hundredths of a second, so each frame ends at its time rounded to
    10 ms (8 fps: 130, 120, 130, ... ms, 125 on average, where one rounded delay would play 120 ms, 4 % fast)."""
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    ends = [math.floor(100 * i / fps + 0.5) for i in range(frames + 1)]  # hundredths of a second
    return [10 * max(1, b - a) for a, b in zip(ends, ends[1:])]


def save_gif(video: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    """``(T, 3, H, W)`` in [-1, 1] -> looping GIF that plays at ``fps`` on average (:func:`gif_durations`), one GIF
    frame per frame: each frame gets the adaptive palette Pillow's GIF writer gives it (:func:`_palette_frame`), and
    FFmpeg's gif encoder (PyAV) writes them, because Pillow's writer merges identical consecutive frames into one."""
    import av

    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"save_gif expects (T, 3, H, W), got {tuple(video.shape)}")
    frames = to_uint8(video)  # (T, H, W, 3)
    starts = np.cumsum([0, *gif_durations(len(frames), fps)]) // 10  # (T + 1,) hundredths of a second
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    muxer = {"loop": "0", "final_delay": str(starts[-1] - starts[-2])}  # loop forever; the last frame's delay
    with av.open(str(path), "w", format="gif", options=muxer) as out:
        stream = out.add_stream("gif", rate=100)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "pal8"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 100)
        for img, start in zip(frames, starts):
            frame = av.VideoFrame.from_ndarray(_palette_frame(img), format="pal8")
            frame.pts, frame.time_base = int(start), stream.time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():  # flush
            out.mux(packet)
    return path


def _palette_frame(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(H, W, 3)`` -> palette indices ``(H, W)`` and ARGB palette ``(256, 4)``: the adaptive palette (median
    cut, no dithering) that Pillow's GIF writer quantizes an RGB frame with."""
    indexed = Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE)
    rgb = np.asarray(indexed.getpalette("RGB"), np.uint8).reshape(-1, 3)  # (N, 3), N <= 256
    palette = np.zeros((256, 4), np.uint8)  # (256, 4) ARGB, opaque
    palette[:, 0] = 255
    palette[: len(rgb), 1:] = rgb
    return np.asarray(indexed), palette


def save_mp4(video: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    """``(T, 3, H, W)`` in [-1, 1] -> H.264 MP4 (PyAV); odd sizes are padded by one pixel to even."""
    from mardini.data.encode import encode_mp4

    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"save_mp4 expects (T, 3, H, W), got {tuple(video.shape)}")
    frames = to_uint8(video)  # (T, H, W, 3)
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # (T, H', W', 3) even
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, fps))
    return path

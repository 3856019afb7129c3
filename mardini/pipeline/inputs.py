"""Given frames for ``sample.py``: image files, frames of a video file, or clips from shards, at one resolution.

Every reader returns uint8 or float frames as a float ``(B, n, 3, H, W)`` tensor in [-1, 1] and says what it
did to the resolution (crop / resize), so that a changed input never goes unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mardini.data.decode import BadSample, ClipTooShort, choose_frames, decode_mp4, stream_fps
from mardini.data.transforms import as_size, crop_and_resize, resize_video, to_unit_range

RESIZE_MODES = ("crop", "stretch", "none")


def parse_size(text: str | None, flag: str = "--resolution") -> tuple[int, int] | None:
    """``"32"`` -> (32, 32); ``"48x64"`` -> (48, 64) (height x width); None stays None. ``flag`` names the option
    in the error."""
    if text is None:
        return None
    parts = str(text).lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{flag} must be N or HxW (pixels, each >= 1; e.g. 256 or 36x64), got {text!r}")
    return as_size(int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1])))


def fit_frames(frames: np.ndarray, size: tuple[int, int] | None, mode: str, what: str) -> tuple[torch.Tensor, str]:
    """uint8 ``(n, H, W, 3)`` -> float ``(n, 3, h, w)`` in [-1, 1] at ``size`` (None = keep), and a message.

    ``crop``: centre crop to the aspect ratio of ``size``, then resize; ``stretch``: resize only;
    ``none``: the frames must already have that size.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"--resize must be one of {RESIZE_MODES}, got {mode!r}")
    n, h, w, _ = frames.shape
    if size is None or (h, w) == tuple(size):
        video = to_unit_range(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))  # (n, 3, H, W)
        return video, f"{what}: {h}x{w}, used as is"
    if mode == "none":
        raise ValueError(
            f"{what} are {h}x{w} (HxW) but sampling runs at {size[0]}x{size[1]}; pass --resize crop (centre crop "
            f"+ resize) or --resize stretch, or --resolution {h}x{w} (sides must suit the autoencoder)"
        )
    if mode == "crop":
        video, (top, left, ch, cw) = crop_and_resize(frames, size, "center")  # (n, 3, h, w)
        return video, f"{what}: {h}x{w} -> centre crop {ch}x{cw} at ({top}, {left}) -> resized to {size[0]}x{size[1]}"
    video = to_unit_range(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))  # (n, 3, H, W)
    return resize_video(video[None], size)[0], f"{what}: {h}x{w} -> stretched to {size[0]}x{size[1]}"


def read_images(paths: list[str | Path]) -> np.ndarray:
    """Image files -> uint8 ``(n, H, W, 3)``; all images must have one size."""
    from PIL import Image

    arrays, sizes = [], {}
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image {p} does not exist")
        try:
            with Image.open(p) as img:
                arrays.append(_rgb8(img, p))  # (H, W, 3)
        except OSError as e:  # PIL.UnidentifiedImageError (a video, an empty file) or a truncated image
            raise ValueError(f"image {p} could not be read as an image ({type(e).__name__}: {e}); give image files "
                             "(PNG, JPEG, ...), or a video with --video") from e
        sizes[str(p)] = arrays[-1].shape[:2]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{p}: {h}x{w}" for p, (h, w) in sizes.items())
        raise ValueError(f"the images have different sizes ({listing}); give images of one size "
                         "(e.g. frames of one video), or resize them to one size first")
    return np.stack(arrays)  # (n, H, W, 3)


def _rgb8(img, path) -> np.ndarray:
    """uint8 ``(H, W, 3)`` of a PIL image. 16-bit grey (modes ``I;16*``, ``I``: 16-bit PNG, TIFF) is scaled from
    [0, 65535] and float grey (``F``) from [0, 1], which ``img.convert("RGB")`` would clip to white or black."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return np.asarray(img.convert("RGB"))
    x = np.asarray(img, dtype=np.float64)  # (H, W)
    top = 1.0 if img.mode == "F" else 65535.0
    if x.size and (x.min() < 0 or x.max() > top):
        raise ValueError(f"image {path} ({img.mode}) has pixels in [{x.min():g}, {x.max():g}], outside [0, {top:g}]; "
                         "save it as an 8-bit RGB image")
    return np.repeat(np.round(x * (255 / top)).astype(np.uint8)[..., None], 3, axis=-1)  # (H, W, 3)


def video_fps(path: str | Path) -> float | None:
    """The frame rate a video file's first video stream records (None when it records none or does not open:
    :func:`read_video` then says what is wrong)."""
    import av

    try:
        with av.open(str(path)) as container:
            return stream_fps(container.streams.video[0])
    except (av.FFmpegError, IndexError, OSError):
        return None


def read_video(
    path: str | Path, frames: int, start: int = 0, stride: int = 1, period: float | None = None,
    at_most: bool = False, fix: str = "lower --start or --stride",
) -> tuple[np.ndarray, str]:
    """``frames`` frames ``start, start + stride, ...`` of a video file -> uint8 ``(frames, H, W, 3)`` and a note.

    With ``period`` (seconds: the stride chosen by a rate), a variable-frame-rate file is read by timestamp, as the
    shard writer and evaluate.py read it (:func:`mardini.data.decode.choose_frames`): the frame on screen at each
    time of a ``period`` grid, from the first grid time showing frame ``start`` or a later one; the note says so.
    ``at_most``: a file with fewer frames (but at least one) gives those, ``(n, H, W, 3)``; else it is a ValueError
    ending in ``fix``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    if start < 0 or stride < 1:
        raise ValueError(f"--start must be >= 0 and --stride >= 1, got {start}, {stride}")
    idx, note = start + stride * np.arange(frames), ""  # (frames,) source frames, by index
    grid, _ = (None, "") if period is None else choose_frames(str(path), period)  # (m,) or None: by index
    if grid is not None:
        first = int(np.searchsorted(grid, start))  # grid position of the first frame >= start
        if len(grid) - first < frames and not (at_most and len(grid) > first):
            raise ValueError(f"video {path}: it is variable-frame-rate, read by timestamp every {period:.4g} s it "
                             f"gives {len(grid) - first} frames from --start {start}, fewer than {frames}: {fix}")
        idx = grid[first:first + frames]  # (n,) a held frame repeats
        note = f"variable frame rate: read by timestamp, source frames {idx.tolist()}"
    data = Path(path).read_bytes()
    try:
        try:
            return decode_mp4(data, idx), note  # (frames, H, W, 3)
        except ClipTooShort as e:
            if not (at_most and e.decoded > idx[0]):
                raise
            return decode_mp4(data, idx[idx < e.decoded]), note  # (n, H, W, 3): the frames the file has
    except ClipTooShort as e:
        raise ValueError(f"video {path}: {e}; it has too few frames for {frames} frames from --start {start} "
                         f"every --stride {stride}: {fix}") from e
    except BadSample as e:
        raise ValueError(f"video {path} could not be decoded ({e}); re-encode it (e.g. ffmpeg -i IN -c:v libx264 "
                         "OUT.mp4) or give its frames as --images") from e


def read_shard_clips(shards: str, clips: int, frames: int, fps: float | None, size: tuple[int, int]):
    """The first ``clips`` clips of a shard split (centre crop, like validation) -> ``(B, frames, 3, H, W)``, keys and
    the rate each clip was read at (its fps over its stride)."""
    from mardini.data.batching import skip_only
    from mardini.data.sharding import list_shards
    from mardini.data.stream import ClipStream

    stream = ClipStream(list_shards(shards), frames=frames, fps=fps, resolution=size, batch_size=1, train=False,
                        max_clips=clips)
    videos, keys, rates = [], [], []
    for batch in stream:
        if skip_only(batch):
            continue
        videos.append(batch["video"])  # (1, T, 3, H, W)
        keys += batch["key"]
        rates += batch["fps"].tolist()
        if len(keys) >= clips:
            break
    if not videos:
        raise ValueError(f"no clip of {frames} frames at fps {fps} could be read from {shards}")
    return torch.cat(videos)[:clips], keys[:clips], rates[:clips]


def read_shard_clip(shard: str, key: str, frames: int, fps: float | None, size: tuple[int, int]):
    """Clip ``key`` of the local ``shard`` as :func:`read_shard_clips` reads it (centred start, centre crop: the same
    frames) -> ``(frames, 3, H, W)`` and the rate it was read at, reading its members alone
    (:func:`mardini.pipeline.shard_clips.read_sample`); an unreadable clip is a ValueError or OSError naming it."""
    from mardini.data.stream import ClipStream
    from mardini.pipeline.shard_clips import read_sample

    raw = read_sample(shard, key)
    stream = ClipStream([shard], frames=frames, fps=fps, resolution=size, batch_size=1, train=False)
    try:
        out = stream.decode_pixels(raw, torch.Generator())  # a finite split's draws: none (centred)
    except BadSample as e:
        raise ValueError(f"clip {key} of shard {shard} could not be read: {e}") from e
    return out["video"], float(out["fps"])


def parse_indices(text: str | None) -> list[int] | None:
    """``"0,4,8"`` -> [0, 4, 8]; ``"0-3"`` -> [0, 1, 2, 3] (a range needs both ends); None stays None."""
    if text is None:
        return None
    out: list[int] = []
    for part in str(text).split(","):
        a, dash, b = part.strip().partition("-")
        if dash and a.isdigit() and not b:
            raise ValueError(f"--keep range {part.strip()!r} has no end: write both ends ({a}-N), or the index "
                             f"alone ({a})")
        if not a.isdigit() or (dash and not b.isdigit()):
            raise ValueError(f"--keep must list frame indices like 0,4,8 or 0-3, got {text!r}")
        if b and int(b) < int(a):
            raise ValueError(f"--keep range {part.strip()!r} runs backwards: write the lower index first ({b}-{a})")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out

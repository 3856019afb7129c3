"""Decoding shard members: frame selection at a target fps (by index, or by timestamp for a variable-frame-rate
video file), ``video.mp4`` (PyAV, turned, mirrored and stretched to its display geometry) and ``video.npy``.

Every failure raises a :class:`BadSample` subclass whose message names the problem; the loader catches
exactly these, skips the sample and counts it.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
from fractions import Fraction

import av
import numpy as np
try:  # PyAV's side-data container, built per frame below (a PyAV without it: the frame's own, see display_matrix)
    from av.sidedata.sidedata import SideDataContainer
except ImportError:  # pragma: no cover - the pinned PyAV has it
    SideDataContainer = None

# --------------------------------------------------------------------------------------------------
# Errors: what a bad sample can be
# --------------------------------------------------------------------------------------------------


class BadSample(Exception):
    """A sample the loader must skip (and count). ``reason`` is a short key for the counters."""

    reason = "bad sample"


class CorruptVideo(BadSample):
    reason = "corrupt video"


class ClipTooShort(BadSample):
    reason = "too few frames"


class BadMetadata(BadSample):
    reason = "bad json"


class BadShape(BadSample):
    reason = "wrong shape"


# Limits on what a member may claim, so a corrupt header fails as a BadSample instead of allocating it.
MAX_SOURCE_FRAMES = 10_000_000  # frames a clip's json may declare (about 4 days at 30 fps)
MAX_FRAME_PIXELS = 8192 * 8192  # pixels of one decoded frame (mp4 stream size, npy H x W)
MAX_PTS_GAP_S = 1.0  # a longer gap between two frames' timestamps reads as a timestamp jump, not a held frame


# --------------------------------------------------------------------------------------------------
# Frame selection
# --------------------------------------------------------------------------------------------------


def frame_stride(src_fps: float, target_fps: float | None) -> int:
    """Integer stride ``round(src_fps / target_fps)`` (>= 1; 1 when ``target_fps`` is None; Python's round, halves to
    even): the stride nearest to the ratio, which is not always the rate nearest to ``target_fps`` (25 -> 10 fps
    takes stride 2, 12.5 fps, where 3 would give 8.33).

    An integer stride keeps the frames evenly spaced; the effective rate is ``src_fps / stride`` (what the batch's
    ``fps`` reports).
    """
    if not (src_fps > 0 and math.isfinite(src_fps)):
        raise BadMetadata(f"clip fps must be a positive number, got {src_fps!r}")
    if target_fps is None:
        return 1
    if not target_fps > 0:
        raise ValueError(f"target fps must be > 0 or None (native), got {target_fps}")
    return max(1, int(round(src_fps / target_fps)))


def frame_indices(
    src_fps: float, n_src_frames: int, target_fps: float | None, frames: int, start: int = 0
) -> tuple[np.ndarray, float]:
    """Indices of ``frames`` evenly spaced frames at about ``target_fps``, from frame ``start``.

    Args:
        src_fps: the clip's own frame rate.
        n_src_frames: frames in the clip.
        target_fps: wanted rate; None keeps every frame (native rate). Higher than ``src_fps`` gives stride 1.
        frames: how many frames to take (>= 1).
        start: first index; ``0 <= start <= n_src_frames - span`` (see :func:`max_start`).
    Returns ``(indices (frames,) int64, effective_fps)``; raises :class:`ClipTooShort` if they do not fit.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    stride = frame_stride(src_fps, target_fps)
    span = (frames - 1) * stride + 1
    if start < 0 or start + span > n_src_frames:
        raise ClipTooShort(
            f"need {frames} frames at stride {stride} (span {span}) from frame {start}, "
            f"but the clip has {n_src_frames} frames; use fewer frames, a higher fps, or longer clips"
        )
    return start + stride * np.arange(frames, dtype=np.int64), src_fps / stride


def max_start(src_fps: float, n_src_frames: int, target_fps: float | None, frames: int) -> int:
    """Largest valid ``start`` for :func:`frame_indices` (raises :class:`ClipTooShort` if none fits)."""
    stride = frame_stride(src_fps, target_fps)
    last = n_src_frames - ((frames - 1) * stride + 1)
    if last < 0:
        frame_indices(src_fps, n_src_frames, target_fps, frames, 0)  # raises with the full message
    return last


# --------------------------------------------------------------------------------------------------
# Frame selection by timestamp (variable-frame-rate files; the shard writer, evaluate.py and sample.py)
# --------------------------------------------------------------------------------------------------


def pts_grid(pts: list[int | None] | np.ndarray, time_base: Fraction, period: float) -> tuple[np.ndarray | None, str]:
    """Source frames on a grid of ``period`` seconds chosen by timestamp, or None (read by index) and why.

    ``pts`` are the frames' timestamps in output order. They are used only when every frame has one, they
    increase strictly (packed B-frames in AVI give shuffled ones) and the file is variable-rate: some interval
    differs from the median by more than a tenth of it plus one tick of timestamp rounding. A constant-rate file
    is read by index, exactly as before, and so is one whose timestamps jump by more than ``MAX_PTS_GAP_S``.
    Returns ``(indices (m,) int64, reason)``: for each grid time from the first frame, the frame on screen then
    (the last frame with pts <= t, with half a median interval of slack for rounded timestamps).
    """
    if len(pts) < 2:
        return None, "fewer than 2 frames"
    if not _whole_ticks(pts) and any(p is None for p in pts):
        return None, "frames without a timestamp"
    ticks = np.asarray(pts, dtype=np.int64)  # (n,) in time_base units
    steps = np.diff(ticks)  # (n - 1,)
    if not (steps > 0).all():
        return None, "timestamps not increasing"
    median = float(np.median(steps))
    if np.abs(steps - median).max() <= 0.1 * median + min(1.0, 0.5 * median):
        return None, "constant rate"
    if (gap := float(steps.max() * time_base)) > MAX_PTS_GAP_S:
        return None, f"timestamps jump by {gap:.3g} s"
    times = (ticks - ticks[0]) * float(time_base)  # (n,) seconds from the first frame
    slack = 0.5 * median * float(time_base)
    grid = period * np.arange(int((times[-1] + slack) // period) + 1)  # (m,)
    return np.searchsorted(times, grid + slack, side="right") - 1, "variable rate"


def packet_timestamps(container) -> tuple[list[int | None], Fraction]:
    """An open container's first video stream: its packets' timestamps, sorted (a demux, no decoding; one per
    packet with data, so their count is the frame count), and its time base."""
    stream = container.streams.video[0]
    pts = [packet.pts for packet in container.demux(stream) if packet.size]
    return (pts if None in pts else sorted(pts)), stream.time_base


def frame_timestamps(path: str) -> tuple[np.ndarray, Fraction]:
    """The first video stream's decoded frames' timestamps, in output order (:func:`compact_timestamps`: read-only
    int64 ``(n,)``, 8 bytes a frame), and its time base (a decode of the whole stream; no image is kept).
    Remembered per file version (path, size, modification time): evaluate.py reads a variable-rate file's window in
    several passes (usable clips, each task, the model's size)."""
    stat = os.stat(path)
    return _frame_timestamps(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _frame_timestamps(path: str, size: int, mtime_ns: int) -> tuple[np.ndarray, Fraction]:
    """:func:`frame_timestamps` of one file version (``size`` and ``mtime_ns`` only key the cache)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return compact_timestamps([frame.pts for frame in container.decode(stream)]), stream.time_base


def compact_timestamps(pts: list[int | None]) -> np.ndarray:
    """Timestamps as the cache keeps them, read-only: int64 ``(n,)`` (a tuple of Python ints took 36 bytes a frame,
    about 4 MB for an hour at 30 fps, kept for up to 256 files), or, where a frame has none, an object array holding
    the Nones (:func:`pts_grid` refuses such a file)."""
    out = np.array(pts, dtype=object if None in pts else np.int64)  # (n,)
    out.flags.writeable = False  # shared by every later call on the file
    return out


def _whole_ticks(pts: list[int | None] | np.ndarray) -> bool:
    """Whether ``pts`` is an integer array (so it holds no None, and need not be scanned for one)."""
    return isinstance(pts, np.ndarray) and np.issubdtype(pts.dtype, np.integer)


def choose_frames(
    path: str, period: float, packets: tuple[list[int | None], Fraction] | None = None
) -> tuple[np.ndarray | None, str]:
    """:func:`pts_grid` on the packets' timestamps (``packets``: :func:`packet_timestamps`, when already read) and,
    if they say variable rate, on the decoded frames' own. ``(None, why)``: read the file by index."""
    try:
        if packets is None:
            with av.open(path) as container:
                packets = packet_timestamps(container)
        grid, why = pts_grid(*packets, period)
        if grid is not None:
            grid, why = pts_grid(*frame_timestamps(path), period)
    except Exception as e:  # noqa: BLE001 -- read by index: a file failing midway keeps its clips up to the error
        return None, f"timestamps unreadable: {type(e).__name__}: {e}"
    return grid, why


# --------------------------------------------------------------------------------------------------
# Display geometry: display matrix (rotation, mirror) and non-square pixels (the shard writer, decode_mp4)
# --------------------------------------------------------------------------------------------------


def display_matrix(frame) -> np.ndarray | None:
    """A PyAV frame's display matrix side data: int32 ``(9,)``, FFmpeg's row-major 3x3 matrix in 16.16 fixed point
    (the last column 2.30), or None when it has none (or is no PyAV frame).

    Read through a container of its own, not ``frame.side_data``: that one is kept on the frame, a reference cycle
    that holds every frame read (and its decoder's threads) until the garbage collector runs, and loader workers
    forked meanwhile deadlock.
    """
    try:
        container = frame.side_data if SideDataContainer is None else SideDataContainer(frame)
        data = bytes(container["DISPLAYMATRIX"])
    except (KeyError, TypeError, AttributeError):  # no display matrix; not a (PyAV) frame
        return None
    return np.frombuffer(data, np.int32) if len(data) == 36 else None  # (9,) native byte order, as FFmpeg's int32_t


def matrix_orientation(matrix) -> tuple[int, str]:
    """``(rotation, flip)`` a player applies for a display matrix (9 ints, FFmpeg's layout): a counter-clockwise turn
    of 0, 90, 180 or 270 degrees, then ``flip``: ``"hflip"`` (mirror left-right), ``"vflip"`` (top-bottom) or ``""``.

    Decided as FFmpeg's autorotation (ffmpeg's and ffplay's ``get_rotation`` and the ``transpose`` / ``hflip`` /
    ``vflip`` filters they insert), so a mirrored file shows as in a player; an angle between quarter turns is
    rounded to the nearest one (FFmpeg turns by the exact angle). A flip is given with no half turn: a half turn
    then a horizontal flip is the vertical flip.
    """
    m = [float(v) for v in matrix]  # (9,) row-major; only the ratios matter, so no fixed-point scaling
    scale = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if not (scale[0] and scale[1]):
        return 0, ""  # a degenerate matrix: no rotation FFmpeg can read (av_display_rotation_get is NaN)
    clockwise = round(math.degrees(math.atan2(m[1] / scale[1], m[0] / scale[0])))  # FFmpeg's theta (get_rotation)
    quarter = round(clockwise / 90) % 4  # clockwise quarter turns
    if quarter == 1:  # theta 90: transpose=cclock_flip (the transpose) if m[3] > 0, else transpose=clock
        return (270, "hflip") if m[3] > 0 else (270, "")
    if quarter == 3:  # theta 270: transpose=clock_flip (anti-transpose) if m[3] < 0, else transpose=cclock
        return (90, "hflip") if m[3] < 0 else (90, "")
    hflip, vflip = quarter == 2 and m[0] < 0, m[4] < 0  # theta 180: hflip if m[0] < 0; 0 or 180: vflip if m[4] < 0
    if hflip and vflip:
        return 180, ""
    return 0, "hflip" if hflip else "vflip" if vflip else ""


def frame_orientation(frame, stream) -> tuple[int, str]:
    """``(rotation, flip)`` a player applies to ``frame`` (see :func:`matrix_orientation`): from the frame's display
    matrix, else the stream's ``rotate`` tag (clockwise degrees, no flip; older FFmpeg), else ``(0, "")``."""
    matrix = display_matrix(frame)
    orientation = (0, "") if matrix is None else matrix_orientation(matrix)
    if orientation == (0, ""):
        try:
            degrees = -float(stream.metadata.get("rotate", 0))
        except (AttributeError, TypeError, ValueError):
            degrees = 0
        orientation = (int(round(degrees / 90)) % 4 * 90, "")
    return orientation


def pixel_aspect(stream) -> Fraction:
    """A video stream's sample (pixel) aspect ratio, a pixel's width over its height: the container's or the codec's
    (PyAV's guess), 1 when it records none."""
    try:
        sar = stream.sample_aspect_ratio
    except AttributeError:
        sar = stream.codec_context.sample_aspect_ratio
    return Fraction(sar) if sar and sar > 0 else Fraction(1)


def display_size(width: int, height: int, sar: Fraction, rotation: int) -> tuple[int, int]:
    """``(width, height)`` a player shows a coded ``width`` x ``height`` frame at: the width stretched by the pixel
    aspect ``sar`` (as ``ffmpeg -vf scale=iw*sar:ih``), then swapped by a quarter turn."""
    width = max(1, round(width * sar))
    return (height, width) if rotation % 180 else (width, height)


def to_display(frame, width: int, height: int, rotation: int, flip: str = "") -> np.ndarray:
    """A decoded frame as a player shows it, resized to ``width`` x ``height`` (the displayed size), turned
    counter-clockwise by ``rotation`` degrees, then flipped by ``flip`` (``"hflip"``, ``"vflip"`` or ``""``; see
    :func:`matrix_orientation`): uint8 ``(height, width, 3)`` RGB. Without either this is PyAV's ``to_ndarray`` at
    that size, unchanged."""
    if not rotation % 180:
        image = frame.to_ndarray(width=width, height=height, format="rgb24")  # (H, W, 3)
    else:
        image = frame.to_ndarray(width=height, height=width, format="rgb24")  # (W, H, 3): turned below
    if rotation:
        image = np.rot90(image, rotation // 90)  # (H, W, 3), counter-clockwise as the flag says
    if flip:
        image = np.fliplr(image) if flip == "hflip" else np.flipud(image)  # (H, W, 3), mirrored after the turn
    return np.ascontiguousarray(image)  # the array itself when not turned or flipped


# --------------------------------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------------------------------


def decode_json(data: bytes) -> dict:
    """The ``json`` member; must be an object with a positive ``fps`` and ``frames``."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise BadMetadata(f"json member does not parse: {e}") from None
    if not isinstance(meta, dict):
        raise BadMetadata(f"json member must be an object, got {type(meta).__name__}")
    for key in ("fps", "frames"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise BadMetadata(f"json member needs a positive finite number '{key}', got {value!r}")
    if meta["frames"] != int(meta["frames"]) or meta["frames"] > MAX_SOURCE_FRAMES:
        raise BadMetadata(f"json 'frames' must be a whole number <= {MAX_SOURCE_FRAMES}, got {meta['frames']!r}")
    return meta


def decode_npy(data: bytes, indices: np.ndarray | None = None) -> np.ndarray:
    """``video.npy`` bytes -> uint8 ``(len(indices) or T, H, W, 3)``."""
    shape, dtype = npy_header(data, "video.npy")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or min(shape) < 1:
        raise BadShape(f"video.npy must be uint8 (T, H, W, 3) with T, H, W >= 1, got {dtype} {shape}")
    if shape[1] * shape[2] > MAX_FRAME_PIXELS:
        raise BadShape(f"video.npy frames of {shape[1]}x{shape[2]} exceed {MAX_FRAME_PIXELS} pixels")
    try:
        video = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises many types on corrupt input
        raise CorruptVideo(f"video.npy does not load: {type(e).__name__}: {e}") from None
    if indices is None:
        return video
    if len(indices) and int(indices.max()) >= video.shape[0]:
        raise ClipTooShort(f"video.npy has {video.shape[0]} frames, need index {int(indices.max())}")
    return video[indices]  # (len(indices), H, W, 3)


def npy_header(data: bytes, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an ``.npy`` header, checked against the bytes present before anything is allocated."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)  # v3 (utf-8 field names) never holds uint8 video; it fails as corrupt
    except Exception as e:  # noqa: BLE001 - a corrupt header raises ValueError, SyntaxError, UnicodeError ...
        raise CorruptVideo(f"{name} has no valid npy header: {type(e).__name__}: {e}") from None
    need = math.prod(shape) * dtype.itemsize
    if dtype.hasobject or need > len(data) - f.tell():
        raise CorruptVideo(f"{name} header claims {dtype} {shape} ({need} bytes) but holds {len(data) - f.tell()} bytes")
    return shape, dtype


def stream_fps(stream) -> float | None:
    """A PyAV video stream's frame rate: its average rate, else the guessed one, else the time base's (what the shard
    writer reads too); None when it records none."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate and float(rate) > 0 else None


def decode_mp4(data: bytes | str, indices: np.ndarray | None = None) -> np.ndarray:
    """Encoded video bytes (or a video file's path) -> uint8 ``(len(indices) or T, H, W, 3)``, decoding only up to
    the last index.

    Frames are counted in presentation order from the first decoded frame; an index may repeat (a frame held over
    several times of a timestamp grid). A :class:`ClipTooShort` carries the frames decoded in ``decoded``. Frames
    come as a player shows them: turned and mirrored by the display matrix (:func:`frame_orientation`) and
    stretched to square pixels (:func:`display_size`); a file with neither decodes exactly as PyAV's ``to_ndarray``.
    """
    wanted: dict[int, list[int]] | None = None if indices is None else {}  # source index -> its places in the output
    for n, i in enumerate([] if indices is None else indices):
        wanted.setdefault(int(i), []).append(n)
    last = None if indices is None else (int(np.max(indices)) if len(indices) else -1)
    out: list[np.ndarray | None] = [] if indices is None else [None] * len(indices)
    count = 0
    try:
        source = str(data) if isinstance(data, str) else io.BytesIO(data)
        with av.open(source, mode="r") as container:
            if not container.streams.video:
                raise CorruptVideo("the video member has no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            width, height = getattr(ctx, "width", 0) or 0, getattr(ctx, "height", 0) or 0
            sar = pixel_aspect(stream)
            shown = display_size(width, height, sar, 0) if width and height else (width, height)
            if max(width * height, shown[0] * shown[1]) > MAX_FRAME_PIXELS:
                size = f"{width}x{height}" + ("" if shown == (width, height) else f" (shown at {shown[0]}x{shown[1]})")
                raise BadShape(f"video stream of {size} exceeds {MAX_FRAME_PIXELS} pixels")
            for frame in container.decode(video=0):
                if last is not None and count > last:
                    break
                if wanted is None or count in wanted:
                    rotation, flip = frame_orientation(frame, stream)
                    size = display_size(frame.width, frame.height, sar, rotation)
                    image = to_display(frame, *size, rotation, flip)
                if wanted is None:
                    out.append(image)  # (H, W, 3)
                elif count in wanted:
                    for n in wanted[count]:
                        out[n] = image
                count += 1
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - FFmpegError, and UnicodeDecodeError/... from corrupt metadata
        raise CorruptVideo(f"video does not decode: {type(e).__name__}: {e}") from None
    if any(f is None for f in out) or (indices is None and not out):
        need = "any frame" if last is None else f"index {last}"
        err = ClipTooShort(f"video decoded to {count} frames, need {need}")
        err.decoded = count
        try:
            raise err
        finally:
            # the error's traceback holds this frame: a local naming the error made a reference cycle that kept the
            # decoder (and its threads) until the garbage collector ran, and a loader worker forked meanwhile hung
            # in the collector freeing it (a forked process has none of its parent's threads)
            del err
    if len({f.shape for f in out}) > 1:
        raise BadShape(f"video frames change size mid-stream: {sorted({f.shape for f in out})}")
    return np.stack(out)  # (T', H, W, 3)

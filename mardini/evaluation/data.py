"""Evaluation clips from shards (synthetic or real) or straight from a folder of video files.

Each clip is one centred window of ``frames`` frames at ``fps`` (None = every frame, as VIDIM-Bench takes
consecutive frames), centre-cropped to the aspect ratio of ``resolution`` (a side: a square; or ``(H, W)``) and
resized to it with the project's resize (``mardini.data.transforms``), in [-1, 1]; R x R below is then H x W. At a given ``fps``, a variable-frame-rate video file is read by
timestamp, as the shard writer reads it (:func:`mardini.data.decode.choose_frames`); with ``fps`` None every file
is read by index (consecutive frames, whatever their timestamps). Batches: ``video (B, T, 3, R, R)``, ``key`` list,
``fps (B,)`` (the rate each clip was read at), ``meta`` (each clip's ``frame_indices``: the source frames of its
window; ``timing``: "pts" for a file read by timestamp), and ``positions (B, T, K, 2)`` for synthetic shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import torch

from mardini.data.batching import collate, skip_only
from mardini.data.decode import (
    BadSample, ClipTooShort, CorruptVideo, choose_frames, decode_mp4, frame_indices, frame_stride, max_start,
    packet_timestamps, stream_fps,
)
from mardini.data.shard_checks import count_samples
from mardini.data.sharding import list_shards
from mardini.data.stream import ClipStream
from mardini.data.transforms import Size, crop_and_resize
from mardini.data.video_shards import VIDEO_EXTENSIONS, find_videos

SYNTHETIC_VAL = "data/shards/synthetic/val"


def resolve_source(data: str) -> tuple[str, list[str]]:
    """``("shards" | "videos", files)`` for a shard folder/pattern or a folder of videos; clear errors otherwise (a
    single video file is refused, naming its folder: the protocol needs at least two clips)."""
    if data == "synthetic":
        data = SYNTHETIC_VAL
        if not Path(data).exists():
            raise FileNotFoundError(
                f"the embedded synthetic validation split {data} does not exist; write it with "
                "`python data/make_synthetic.py` (or `make demo`)"
            )
    p = Path(data)
    if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
        raise ValueError(f"--data {data} is a video file; evaluate.py reads a folder of videos (the protocol needs at "
                         f"least 2 clips): pass the folder that holds it (--data {p.parent}), or put the videos to "
                         "score in a folder of their own and pass that")
    if p.is_dir() and not any(p.glob("*.tar")):
        try:
            return "videos", [str(p / v) for v in find_videos(p)]
        except FileNotFoundError:
            raise FileNotFoundError(f"{data} holds neither .tar shards nor video files (mp4, avi, mov, ...)") from None
    try:
        return "shards", list_shards(data)
    except (FileNotFoundError, ValueError) as err:
        raise FileNotFoundError(f"--data {data!r}: not a folder of videos or shards ({err})") from err


def count_clips(kind: str, files: list[str]) -> int:
    """Clips available: video files, or samples in the shards (tar headers only)."""
    if kind == "videos":
        return len(files)
    return sum(count_samples(shard) for shard in files)


def read_video_clip(path: str, frames: int, fps: float | None, resolution: Size) -> torch.Tensor:
    """One centred window of a video file: ``(T, 3, R, R)`` in [-1, 1] (see :func:`read_video_window`)."""
    return read_video_window(path, frames, fps, resolution)[0]


def read_video_window(
    path: str, frames: int, fps: float | None, resolution: Size
) -> tuple[torch.Tensor, float, list[int], str]:
    """One centred window of a video file, ``(T, 3, R, R)`` in [-1, 1], the rate it was read at (source fps /
    integer stride: the source's own rate when it is slower than ``fps``), the source frames it took and how:
    ``"index"`` (every stride-th frame) or ``"pts"`` (a variable-frame-rate file read at a given ``fps``: the frame
    on screen at each time of a grid at that rate, as the shard writer keeps it; a held frame repeats). With ``fps``
    None every file is read by index: consecutive frames, as "every frame" says (a grid at the stated rate would
    repeat the held frames of a VFR file's slower parts).

    The frame count and timestamps come from a packet pass (no decoding), so only the frames up to the window's
    last one are decoded into images: memory holds the window, not the file (a 60-s 720p file decoded whole took
    8.6 GB). A variable-rate file read at a given ``fps`` is decoded once more for its frames' own timestamps,
    keeping no image."""
    src_fps, packets = video_rate_and_timestamps(path)
    n = len(packets[0])
    eff_fps = src_fps / frame_stride(src_fps, fps)  # the rate read at
    grid = None  # fps None: every frame, consecutive, by index
    if fps is not None:
        grid, _ = choose_frames(path, 1 / eff_fps, packets)  # (m,) source frame at each grid time, or None: by index
    if grid is not None:
        if len(grid) < frames:  # the grid's own count, not the file's frames nor the index reading's stride
            raise ClipTooShort(
                f"variable frame rate: read by timestamp every {1 / eff_fps:.3g} s it gives {len(grid)} frames, "
                f"fewer than {frames}; use fewer frames, a higher fps, or longer clips"
            )
        idx = grid[_window(eff_fps, len(grid), None, frames)[0]]  # (T,) the centred window of the grid
        arr = decode_mp4(path, idx)  # (T, H, W, 3) uint8
        return crop_and_resize(arr, resolution, "center")[0], eff_fps, idx.tolist(), "pts"
    idx, eff_fps = _window(src_fps, n, fps, frames)
    try:
        arr = decode_mp4(path, idx)  # (T, H, W, 3) uint8, the window's frames only
    except ClipTooShort as err:
        decoded = getattr(err, "decoded", n)
        if decoded >= n:
            raise
        # packets that decode to no frame: centre the window on the frames there are (decoding stops as they end)
        idx = _window(src_fps, decoded, fps, frames)[0]
        arr = decode_mp4(path, idx)
    video, _ = crop_and_resize(arr, resolution, "center")  # (T, 3, R, R)
    return video, eff_fps, idx.tolist(), "index"


def _window(src_fps: float, n: int, fps: float | None, frames: int):
    """``(indices, effective fps)`` of the centred window of ``frames`` frames at ``fps`` in ``n`` source frames."""
    start = max_start(src_fps, n, fps, frames) // 2
    return frame_indices(src_fps, n, fps, frames, start)


def video_rate_and_timestamps(path: str) -> tuple[float, tuple[list[int | None], Fraction]]:
    """``(fps, (packet timestamps, time base))`` of a file's first video stream: one timestamp per packet with data,
    sorted (demuxed, not decoded; their count is the frame count)."""
    with av.open(path) as container:
        if not container.streams.video:
            raise CorruptVideo("no video stream")
        return stream_fps(container.streams.video[0]) or 0.0, packet_timestamps(container)


UNUSABLE = (BadSample, av.FFmpegError, OSError, IndexError)  # a file that does not decode, or is too short


def usable_videos(
    files: list[str], frames: int, fps: float | None, resolution: Size, limit: int, skipped: dict[str, str],
) -> list[str]:
    """The first ``limit`` files that give a clip (each read as :func:`iter_batches` will); the unusable ones
    before them go to ``skipped`` with the reason."""
    usable: list[str] = []
    for path in files:
        if len(usable) >= limit:
            break
        try:
            read_video_clip(path, frames, fps, resolution)  # (T, 3, R, R), dropped
        except UNUSABLE as err:
            skipped[path] = str(err)
            continue
        usable.append(path)
    return usable


def usable_shard_clips(
    files: list[str], frames: int, fps: float | None, resolution: Size, limit: int, keys: list[str] | None = None,
) -> tuple[int, int]:
    """``(usable clips, bad samples skipped)`` of the first ``limit`` clips the shards give, each decoded as
    :func:`iter_batches` will (the reasons of the first few bad ones are logged as warnings); their keys are
    appended to ``keys``, in :func:`iter_batches`' order."""
    stream = ClipStream(files, frames=frames, fps=fps, resolution=resolution, batch_size=32, train=False,
                        max_clips=limit)
    usable = bad = 0
    for batch in stream:
        bad += int(batch.get("skipped", 0))
        if not skip_only(batch):
            usable += batch["video"].shape[0]  # (B, T, 3, R, R)
            if keys is not None:
                keys += batch["key"]
    return usable, bad


def iter_batches(
    kind: str, files: list[str], frames: int, fps: float | None, resolution: Size, num_clips: int, batch_size: int,
    skipped: dict[str, str] | None = None, start: int = 0,
) -> Iterator[dict]:
    """Batches of the first ``num_clips`` usable clips, in a fixed order; unusable videos go to ``skipped``. Each
    batch's ``read`` is the source items read through it (video files, or the shards' raw samples): a resumed run
    passes the last one done as ``start`` and goes on after it, the items before it neither read nor decoded."""
    if kind == "shards":
        stream = ClipStream(files, frames=frames, fps=fps, resolution=resolution, batch_size=batch_size,
                            train=False, max_clips=num_clips, keep_meta=True,  # meta: each clip's frame_indices
                            start_raw=start)
        for batch in stream:
            if not skip_only(batch):
                batch["read"] = batch.pop("raw_read")  # counted from the first sample, those skipped included
                yield batch
        return
    buf: list[dict] = []
    used = 0
    for index in range(start, len(files)):
        path = files[index]
        if used >= num_clips:
            break
        try:
            video, eff_fps, idx, timing = read_video_window(path, frames, fps, resolution)  # (T, 3, R, R)
        except UNUSABLE as err:
            if skipped is not None:
                skipped[path] = str(err)
            continue
        buf.append({"video": video, "fps": eff_fps, "key": path, "indices": idx, "meta": {"timing": timing}})
        used, read = used + 1, index + 1
        if len(buf) == batch_size:
            yield {**collate(buf), "read": read}
            buf = []
    if buf:
        yield {**collate(buf), "read": read}

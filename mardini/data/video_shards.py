"""A folder of videos -> WebDataset shards of fixed-length H.264 clips (the logic of ``data/videos_to_shards.py``).

Two phases, both resumable:

1. **Stage** (parallel, one job per source file): decode with PyAV, optionally drop frames to a maximum fps
   (integer stride; a variable-frame-rate file with trustworthy timestamps keeps the frame on screen at each
   time of that grid instead, see :func:`mardini.data.decode.pts_grid`), turn and stretch each frame to its
   display geometry (display matrix: rotation and mirror; non-square pixels) and resize, cut clips of
   ``clip_frames`` frames every ``clip_hop`` frames, encode each to H.264 and write the file's clips to
   ``<out>/.staging/<n>.tar`` plus a result ``<n>.json`` (written last, atomically: a file with a result json is
   done). A file that cannot be decoded gets a result with its reason and is skipped; one that fails midway, or
   whose frames end well before the duration it states (cut short), keeps its clips and is listed as partial.
2. **Pack** (deterministic): all clips, in source-file order, are packed into shards of at most
   ``shard_max_count`` clips and about ``shard_max_bytes`` bytes, ``<out>/<prefix>-NNNNNN.tar``, each written
   to a temp name and renamed. Existing shards are kept (same inputs, same plan, same shard).

``<out>/manifest.json`` fingerprints the settings and the input files (relative path + size) and records both; a
re-run with other inputs or settings is refused instead of mixing two data sets, naming what differs. A manifest
with no shard and no staged clip beside it (a run whose every file was skipped) holds nothing to mix: it is replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import webdataset as wds
from tqdm import tqdm

from mardini.data.decode import choose_frames, display_size, frame_orientation, pixel_aspect, to_display
from mardini.data.encode import encode_mp4
from mardini.data.sharding import atomic_tar, json_bytes, pack, write_json_atomic

# Read by default (any case): common containers of cameras, phones, broadcast, screen capture and the web.
VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".qt", ".avi", ".mkv", ".webm", ".ogv", ".mpg", ".mpeg", ".mpe", ".m2v", ".vob",
    ".ts", ".mts", ".m2ts", ".m2t", ".3gp", ".3g2", ".flv", ".f4v", ".wmv", ".asf", ".mxf", ".dv", ".y4m",
)

log = logging.getLogger("mardini.data")


@dataclass
class ShardSettings:
    """How clips are cut and stored (part of the manifest fingerprint); the defaults are ``data/videos_to_shards.py``'s.

    ``clip_frames`` and ``max_fps`` default to clips every shipped stage config reads (its frames at its fps) from a
    source of any rate: stored at 30 fps at most, the 17-frame stages at 8 fps take every ``round(30 / 8)`` = 4th
    frame, a span of ``(17 - 1) * 4 + 1`` = 65 (checked against ``configs/`` by ``tests/test_data_videos.py``).
    Before 2026-12-07 they were 32 frames at the source's rate, which the script's defaults had already replaced.
    """

    clip_frames: int = 65  # frames per stored clip
    clip_hop: int | None = None  # stored frames between clip starts (None = clip_frames: no overlap)
    max_fps: float | None = 30.0  # keep every k-th frame so the stored rate is <= this (None = source rate)
    short_side: int | None = None  # resize so the short side is this (None = source size, made even)
    max_clips_per_video: int | None = None
    crf: int = 18
    shard_max_count: int = 256
    shard_max_bytes: int = 1 << 30
    prefix: str = "clips"

    def check(self) -> None:
        if self.clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {self.clip_frames}")
        if self.clip_hop is not None and self.clip_hop < 1:
            raise ValueError(f"clip_hop must be >= 1, got {self.clip_hop}")
        if self.max_fps is not None and self.max_fps <= 0:
            raise ValueError(f"max_fps must be > 0, got {self.max_fps}")
        if self.short_side is not None and self.short_side < 2:
            raise ValueError(f"short_side must be >= 2, got {self.short_side}")
        if self.shard_max_count < 1 or self.shard_max_bytes < 1:
            raise ValueError("shard_max_count and shard_max_bytes must be >= 1")


def keep_stride(rate: float, max_fps: float | None) -> int:
    """The writer keeps every k-th frame of a source at ``rate`` fps: the smallest k with ``rate / k <= max_fps``
    (1 for None: the source's rate)."""
    return 1 if max_fps is None else max(1, int(-(-rate // max_fps)))


@dataclass
class Summary:
    files: int = 0
    clips: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_kept: int = 0
    timestamped: int = 0  # files read by timestamp (variable frame rate)
    timestamped_rates: dict[str, str] = field(default_factory=dict)  # the first 3 of them -> their grid's rate
    rotated: int = 0  # files turned upright by their rotation flag
    mirrored: int = 0  # files flipped back by their display matrix (a horizontal or vertical flip)
    stretched: int = 0  # files of non-square pixels resized to their display shape
    orientations: dict[str, int] = field(default_factory=dict)  # landscape / portrait / square -> files of clips
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason (no clip kept)
    too_short: dict[str, int] = field(default_factory=dict)  # skipped as too short -> the frames it would store
    partial: dict[str, str] = field(default_factory=dict)  # file -> reason (clips before the error kept)
    not_read: int = 0  # files under the folder not read: not of a video extension
    not_read_kinds: dict[str, int] = field(default_factory=dict)  # their extension -> count
    not_read_examples: list[str] = field(default_factory=list)  # the first few of them
    already_complete: bool = False  # a re-run on a finished folder: the first run's counts, every shard kept

    def reasons(self) -> Counter:
        return Counter(_reason_kind(r) for r in self.skipped.values())

    def text(self) -> str:
        lines = [
            ("already complete, nothing done: " if self.already_complete else "")
            + f"{self.clips} clips in {self.shards} shards ({self.shards_written} written, {self.shards_kept} kept) "
            f"from {self.files} files; {len(self.skipped)} skipped, {len(self.partial)} partly decoded"
            + (f", {self.not_read} other files not read" if self.not_read else "")
            + (f", {self.timestamped} variable-rate read by timestamp" if self.timestamped else "")
            + (f", {self.rotated} turned by a rotation flag" if self.rotated else "")
            + (f", {self.mirrored} mirrored by a display matrix" if self.mirrored else "")
            + (f", {self.stretched} stretched to square pixels" if self.stretched else "")
        ]
        if self.not_read:
            kinds = ", ".join(f"{n} x {ext}" for ext, n in sorted(self.not_read_kinds.items()))
            lines.append(f"  not read ({kinds}; e.g. {', '.join(self.not_read_examples)}): not a video extension; "
                         "if they are videos, add their extension with --ext")
        if self.timestamped_rates:
            more = self.timestamped - len(self.timestamped_rates)
            lines.append("  read by timestamp on a grid at the stream's stated average rate / stride: " + ", ".join(
                f"{name} at {rate}" for name, rate in sorted(self.timestamped_rates.items()))
                + (f", and {more} more" if more > 0 else ""))
        if len(self.orientations) > 1:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.orientations.items()))
            lines.append(f"  files of {len(self.orientations)} orientations ({kinds}): training crops every clip to "
                         "data.resolution's aspect ratio, so clips of another orientation lose most of their frame "
                         "(a 16:9 one keeps the middle 32 % of a 9:16 clip); shard each orientation into its own "
                         "folder to train or evaluate it at its own shape")
        for kind, n in sorted(self.reasons().items()):
            lines.append(f"  skipped {n} x {kind}")
        for name, reason in sorted(self.skipped.items()):
            lines.append(f"    {name}: {reason}")
        if self.too_short:
            lines.append(self.too_short_fix())
        for name, reason in sorted(self.partial.items()):
            lines.append(f"  partial {name}: {reason}")
        return "\n".join(lines)

    def too_short_fix(self) -> str:
        """The ``--clip-frames`` that would keep clips of the files skipped as too short."""
        n = sorted(v for v in self.too_short.values() if v >= 2)  # a clip of one frame is no video
        if not n:
            return "  the files too short store fewer than 2 frames: no clip can be cut from them"
        return (f"  to keep them, lower --clip-frames: {n[0]} keeps a clip of each of these {len(n)} files, {n[-1]} "
                "of the longest (the clips' length caps the frames a model trains on, data.frames)")


def _orientation(width: int, height: int) -> str:
    return "landscape" if width > height else "portrait" if height > width else "square"


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


# --------------------------------------------------------------------------------------------------
# Listing inputs
# --------------------------------------------------------------------------------------------------


def video_extensions(extra: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """:data:`VIDEO_EXTENSIONS` and ``extra`` (``"xyz"`` or ``".xyz"``, any case), lower-case with their dot."""
    added = []
    for given in extra:
        ext = "." + given.strip().lstrip(".").lower()
        if ext == "." or any(c in ext for c in "/\\*?"):
            raise ValueError(f"--ext {given!r} is not a file extension; give one like 'mts' or '.mts'")
        added.append(ext)
    return VIDEO_EXTENSIONS + tuple(e for e in dict.fromkeys(added) if e not in VIDEO_EXTENSIONS)


def list_inputs(root: str | Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> tuple[list[str], list[str]]:
    """``(video files, other files)`` under ``root`` (recursive; a video is a file of one of ``extensions``, any
    case), as sorted paths relative to ``root``. Raises when ``root`` is not a folder or holds no video file."""
    root = Path(root)
    if root.is_file():
        raise ValueError(f"{root} is a file; pass the folder that holds the videos (e.g. {root.parent}), or put the "
                         "file in a folder of its own")
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} does not exist")
    found, others = [], []
    for p in root.rglob("*"):
        if p.is_file():
            (found if p.suffix.lower() in extensions else others).append(str(p.relative_to(root)))
    if not found:
        hint = ""
        if others:
            names = ", ".join(sorted(others)[:3]) + (", ..." if len(others) > 3 else "")
            hint = f"; it holds {len(others)} other files ({names}): if they are videos, add their extension with --ext"
        raise FileNotFoundError(f"no video files ({' '.join(extensions)}) under {root}{hint}")
    return sorted(found), sorted(others)


def find_videos(root: str | Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> list[str]:
    """Video files under ``root`` (recursive, by extension, any case), as sorted paths relative to ``root``."""
    return list_inputs(root, extensions)[0]


def _slug(relpath: str) -> str:
    """A key-safe name: WebDataset splits keys at the first dot, so no dots (or slashes) survive."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(relpath).with_suffix("").as_posix())[-48:].strip("_") or "video"


# --------------------------------------------------------------------------------------------------
# Phase 1: one source file -> staged clips
# --------------------------------------------------------------------------------------------------


def _even_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """The stored size of a ``width`` x ``height`` (display) frame: short side ``short_side`` (aspect kept), even."""
    if short_side is not None:
        s = short_side / min(width, height)
        width, height = round(width * s), round(height * s)
    return max(2, width - width % 2), max(2, height - height % 2)


def _stated_duration(container, stream) -> float | None:
    """Seconds a file says its video stream lasts: the stream's duration, else its ``DURATION`` tag (Matroska), else
    the container's when the video is its only stream (another stream may last longer); None when it says none."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    try:
        hours, minutes, seconds = stream.metadata["DURATION"].split(":")  # "00:00:04.000000000"
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except (KeyError, ValueError):
        pass
    if container.duration and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _ends_early(container, stream, span: list[float], rate: float) -> str:
    """Why a file decoded to its end looks truncated: its frames (``span``: the first one's time and the last one's
    end, s) end more than two frame periods before the duration it states. "" when they do not, or it states none."""
    stated = _stated_duration(container, stream)
    if stated is None or not np.isfinite(span[0]):
        return ""
    decoded = span[1] - span[0]  # (s)
    if stated - decoded <= 2 / rate:
        return ""
    return f"truncated: the frames end at {decoded:.1f} s of the {stated:.1f} s the file states"


def stage_file(job: dict) -> dict:
    """Decode one file and write its clips to ``job['tar']``; returns (and writes) its result dict."""
    s = ShardSettings(**job["settings"])
    rel, index = job["rel"], job["index"]
    result = {"file": rel, "index": index, "status": "ok", "reason": "", "clips": []}
    hop = s.clip_hop or s.clip_frames
    emitted = 0
    # Not an atomic write: the result json, written last, is what marks the file done.
    f = open(job["tar"], "wb")
    sink = wds.TarWriter(f, mtime=0.0)
    try:
        with av.open(job["path"]) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or float(rate) <= 0:
                raise ValueError("unknown frame rate")
            rate = Fraction(rate)
            stride = keep_stride(float(rate), s.max_fps)
            out_rate = rate / stride
            src_w, src_h = stream.codec_context.width, stream.codec_context.height  # coded size
            if not src_w or not src_h:
                raise ValueError("unknown frame size")
            sar = pixel_aspect(stream)
            rotation = flip = width = height = None  # the display geometry, from the first frame's display matrix
            # Every stride-th frame (index reading), unless the timestamps say the file is variable-rate: then the
            # frame on screen at each time of the 1 / out_rate grid, a frame held over several grid times repeated.
            grid, why = choose_frames(job["path"], 1 / float(out_rate))
            timing = "index" if grid is None else "pts"
            result.update(timing=timing, timing_reason=why,
                          rate=f"{float(out_rate):.4g} fps ({float(rate):.4g} fps / {stride})")
            log.log(logging.DEBUG if why == "constant rate" else logging.INFO, "%s: frames kept by %s (%s)",
                    rel, timing, why)
            copies = None if grid is None else np.bincount(grid)  # (n_src,) times each source frame is stored
            buf: list = []  # [(source index, (H, W, 3) uint8)]
            skip = 0
            n_src = n_stored = 0
            span = [np.inf, -np.inf]  # (s) the first decoded frame's time, the last one's end
            truncated = ""
            for frame in container.decode(stream):
                i, n_src = n_src, n_src + 1
                if frame.time is not None:  # a frame lasts its duration, else one period (a held last frame counts)
                    tb = getattr(frame, "time_base", None) or stream.time_base or 0
                    shown = float(getattr(frame, "duration", 0) or 0) * float(tb) or 1 / float(rate)
                    span = [min(span[0], frame.time), max(span[1], frame.time + shown)]
                n = (i % stride == 0) if copies is None else (copies[i] if i < len(copies) else 0)
                image = None
                if rotation is None:
                    rotation, flip = frame_orientation(frame, stream)
                    width, height = _even_size(*display_size(src_w, src_h, sar, rotation), s.short_side)
                    result.update(rotation=rotation, flip=flip, sar=str(sar), size=[width, height])
                for _ in range(int(n)):
                    n_stored += 1
                    if skip:
                        skip -= 1
                        continue
                    if image is None:
                        image = to_display(frame, width, height, rotation, flip)  # (H, W, 3), as a player shows it
                    buf.append((i, image))
                    if len(buf) < s.clip_frames:
                        continue
                    frames = np.stack([f for _, f in buf])  # (T, H, W, 3)
                    key = f"{index:06d}-{_slug(rel)}-c{emitted:04d}"
                    meta = {
                        "source": rel, "source_fps": float(rate), "source_frames": [buf[0][0], buf[-1][0] + 1],
                        "source_stride": stride, "source_width": src_w, "source_height": src_h,
                        "source_rotation": rotation, "source_flip": flip, "source_sar": str(sar),
                        "fps": float(out_rate), "frames": s.clip_frames, "width": width, "height": height,
                        "clip": emitted, "codec": "h264", "timing": timing,
                    }
                    data = encode_mp4(frames, out_rate, crf=s.crf)
                    sink.write({"__key__": key, "video.mp4": data, "json": json_bytes(meta)})
                    result["clips"].append({"key": key, "bytes": len(data) + len(json_bytes(meta)) + 1536})
                    emitted += 1
                    if s.max_clips_per_video is not None and emitted >= s.max_clips_per_video:
                        break
                    buf = buf[hop:] if hop < s.clip_frames else []
                    skip = max(0, hop - s.clip_frames)
                if s.max_clips_per_video is not None and emitted >= s.max_clips_per_video:
                    break
            else:  # decoded to the end: does the end come where the file says it does?
                truncated = _ends_early(container, stream, span, float(rate))
            if emitted == 0:
                result["stored_frames"] = n_stored
                raise ValueError(
                    f"too short: {n_src} frames give {n_stored} stored frames, fewer than one clip of {s.clip_frames}"
                    + (f" ({truncated})" if truncated else "")
                )
            if truncated:
                result.update(status="partial", reason=f"{truncated}; {emitted} clips kept")
    except Exception as e:  # noqa: BLE001 -- any file PyAV cannot read is reported and skipped, never fatal
        kind = "too short" if str(e).startswith("too short") else "undecodable"
        reason = str(e)[len("too short: "):] if kind == "too short" else f"{type(e).__name__}: {e}"
        if emitted == 0:
            result.update(status="skipped", reason=f"{kind}: {reason}", clips=[])
        else:  # the clips written before the error are complete tar members: keep them
            result.update(status="partial", reason=f"error after {emitted} clips: {reason}")
    finally:
        sink.close()
        f.close()
    if not result["clips"]:
        Path(job["tar"]).unlink(missing_ok=True)
    write_json_atomic(job["result"], result)
    return result


# --------------------------------------------------------------------------------------------------
# Phase 2: pack staged clips into shards
# --------------------------------------------------------------------------------------------------


def _read_staged(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    except tarfile.ReadError:  # a partial staging tar ends early: keep the complete members
        pass
    return samples


def input_sizes(root: Path, files: list[str]) -> dict[str, int]:
    """``{relative path: size in bytes}`` of the input files (what the fingerprint covers)."""
    return {rel: (root / rel).stat().st_size for rel in files}


# How frames are read and written: 3 since a display matrix's flips are applied too (a mirrored file's clips
# differ from format 2's: an hflip was stored turned a half turn, a vflip as coded); 2 since display geometry
# (rotation flags, sample aspect ratio) is applied and encode_mp4 is deterministic (1: coded frames as stored).
# Part of the fingerprint, so a folder of another format is never completed or kept as if it were this one's.
SHARD_FORMAT = 3
FORMAT_LACKS = {1: "rotation flags, non-square pixels and mirror flags", 2: "mirror flags"}  # what older ones lack


def fingerprint(root: Path, files: list[str], settings: ShardSettings) -> str:
    h = hashlib.sha256(json.dumps({**asdict(settings), "format": SHARD_FORMAT}, sort_keys=True).encode())
    for rel in files:
        h.update(f"{rel}\0{(root / rel).stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def manifest_differences(old: dict, settings: ShardSettings, inputs: dict[str, int]) -> list[str]:
    """What differs between an output folder's manifest and this run: ``clip_frames 12 -> 16`` per setting, and
    ``inputs: 2 added (a.mp4, b.mp4), 1 removed (c.mp4)`` (names of at most 3 each)."""
    def names(rels: list[str]) -> str:
        return ", ".join(rels[:3]) + (", ..." if len(rels) > 3 else "")

    new = asdict(settings)
    was = old.get("settings", {})
    diffs = [f"{k} {was.get(k)} -> {new[k]}" for k in new if k in was and was[k] != new[k]]
    if (was_format := old.get("format", 1)) != SHARD_FORMAT:
        lacks = FORMAT_LACKS.get(was_format)
        diffs.insert(0, f"format {was_format} -> {SHARD_FORMAT} (written by "
                        + (f"an older version of the sharder, before {lacks} were applied)" if lacks
                           else "another version of the sharder)"))
    before = old.get("inputs")
    if before is None:
        diffs.append("inputs: not recorded by that manifest (written by an older version)")
        return diffs
    parts = []
    for label, rels in (
        ("added", sorted(set(inputs) - set(before))),
        ("removed", sorted(set(before) - set(inputs))),
        ("changed size", sorted(r for r in set(inputs) & set(before) if inputs[r] != before[r])),
    ):
        if rels:
            parts.append(f"{len(rels)} {label} ({names(rels)})")
    if parts:
        diffs.append("inputs: " + ", ".join(parts))
    return diffs


def holds_data(out: Path) -> bool:
    """Whether ``out`` holds a shard, or a staged clip of an interrupted run (work a manifest protects)."""
    return any(out.glob("*.tar")) or any((out / ".staging").glob("*.tar"))


def videos_to_shards(
    src: str | Path,
    out: str | Path,
    settings: ShardSettings | None = None,
    workers: int = 2,
    progress: bool = True,
    keep_staging: bool = False,
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
) -> Summary:
    """Shard every video (file of one of ``extensions``) under ``src`` into ``out`` (resumable). Returns the
    :class:`Summary`, which counts the other files, not read."""
    settings = settings or ShardSettings()
    settings.check()
    src, out = Path(src), Path(out)
    files, others = list_inputs(src, extensions)
    others = [r for r in others if not (src / r).resolve().is_relative_to(out.resolve())]  # not our own output
    fp = fingerprint(src, files, settings)
    inputs = input_sizes(src, files)
    manifest = out / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text(encoding="utf-8"))
        if old.get("fingerprint") != fp:
            if holds_data(out):
                diffs = manifest_differences(old, settings, inputs) or ["inputs or settings (not named by it)"]
                raise ValueError(
                    f"{out} holds shards of other inputs or settings than this run: {'; '.join(diffs)}; write to a "
                    f"new output folder, or delete {out} to rebuild it with these"
                )
            # no shard and no staged clip (every file was skipped): nothing to mix; start over
            shutil.rmtree(out / ".staging", ignore_errors=True)  # results of other inputs or settings
        elif old.get("complete"):  # the same command again: report the folder, not the first run's writes
            return Summary(**{**old["summary"], "shards_written": 0, "shards_kept": old["summary"]["shards"],
                              "already_complete": True})
    record = {"fingerprint": fp, "format": SHARD_FORMAT, "settings": asdict(settings), "inputs": inputs}
    write_json_atomic(manifest, {**record, "complete": False})
    staging = out / ".staging"
    staging.mkdir(parents=True, exist_ok=True)

    # -- phase 1 -----------------------------------------------------------------------------------
    jobs = [
        {"path": str(src / rel), "rel": rel, "index": i, "settings": asdict(settings),
         "tar": str(staging / f"{i:06d}.tar"), "result": str(staging / f"{i:06d}.json")}
        for i, rel in enumerate(files)
    ]
    results: dict[int, dict] = {}
    for job in jobs:
        if Path(job["result"]).exists():
            results[job["index"]] = json.loads(Path(job["result"]).read_text(encoding="utf-8"))
    todo = [j for j in jobs if j["index"] not in results]
    bar = tqdm(total=len(jobs), initial=len(results), desc="videos", unit="file", disable=not progress)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(stage_file, todo):
                results[r["index"]] = r
                bar.update(1)
    else:
        for job in todo:
            r = stage_file(job)
            results[r["index"]] = r
            bar.update(1)
    bar.close()

    # -- phase 2 -----------------------------------------------------------------------------------
    clips = [(i, c) for i in sorted(results) for c in results[i]["clips"]]
    plan = pack([c["bytes"] for _, c in clips], settings.shard_max_count, settings.shard_max_bytes)
    kept = [r for r in results.values() if r["status"] != "skipped"]  # files that gave clips
    vfr = [results[i] for i in sorted(results) if results[i].get("timing") == "pts" and "rate" in results[i]]
    summary = Summary(files=len(files), clips=len(clips), shards=len(plan),
                      timestamped=sum(r.get("timing") == "pts" for r in results.values()),
                      timestamped_rates={r["file"]: r["rate"] for r in vfr[:3]},
                      rotated=sum(bool(r.get("rotation")) for r in kept),
                      mirrored=sum(bool(r.get("flip")) for r in kept),
                      stretched=sum(r.get("sar", "1") != "1" for r in kept), not_read=len(others),
                      orientations=dict(Counter(_orientation(*r["size"]) for r in kept if r.get("size"))),
                      not_read_kinds=dict(Counter(Path(r).suffix.lower() or "(none)" for r in others)),
                      not_read_examples=others[:3])
    cache: tuple[int, dict] | None = None
    for s_idx, members in enumerate(tqdm(plan, desc="shards", unit="shard", disable=not progress)):
        path = out / f"{settings.prefix}-{s_idx:06d}.tar"
        if path.exists():
            summary.shards_kept += 1
            continue
        with atomic_tar(path) as sink:
            for m in members:
                file_index, clip = clips[m]
                if cache is None or cache[0] != file_index:
                    cache = (file_index, _read_staged(staging / f"{file_index:06d}.tar"))
                sink.write({"__key__": clip["key"], **cache[1][clip["key"]]})
        summary.shards_written += 1
    for r in results.values():
        if r["status"] == "skipped":
            summary.skipped[r["file"]] = r["reason"]
            if r["reason"].startswith("too short") and "stored_frames" in r:
                summary.too_short[r["file"]] = r["stored_frames"]
        elif r["status"] == "partial":
            summary.partial[r["file"]] = r["reason"]
    write_json_atomic(manifest, {**record, "complete": True, "summary": asdict(summary),
                                 "shards": [f"{settings.prefix}-{i:06d}.tar" for i in range(len(plan))]})
    if not keep_staging:
        shutil.rmtree(staging, ignore_errors=True)
    return summary

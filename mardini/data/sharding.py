"""Shard bookkeeping shared by every writer and the loader: listing shards, atomic writes, rank/worker splits.

Writers never leave a half-written shard under its final name: each shard is written to a temp file of its own
beside it (``.NAME.<random>.tmp``, so processes writing one folder never share one) and renamed when complete, so a
resumed run can trust every ``.tar`` it finds. A process killed mid-write leaves its hidden temp file, never read.
"""

from __future__ import annotations

import glob
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import webdataset as wds

# --------------------------------------------------------------------------------------------------
# Finding shards
# --------------------------------------------------------------------------------------------------


def list_shards(pattern: str) -> list[str]:
    """Shard paths of ``pattern``: a directory (its ``*.tar``), a brace pattern (``a-{000..009}.tar``),
    a glob (``dir/*.tar``), or several of these joined by ``::``. Sorted, unique; raises if nothing matches.
    """
    if not pattern:
        raise ValueError("empty shard pattern: give a directory, a brace pattern or a glob of .tar files")
    found: list[str] = []
    videos: list[str] = []  # video files given where shards were asked for
    for part in wds.shardlists.expand_urls(pattern):  # splits '::' and expands braces
        if os.path.isfile(part) and _is_video(part):
            videos.append(part)
        elif os.path.isdir(part):
            found.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
        elif any(ch in part for ch in "*?["):
            found.extend(sorted(glob.glob(part)))
        elif os.path.isfile(part) or "://" in part or part.startswith("pipe:"):
            found.append(part)
    found = sorted(set(found))
    if not found:
        videos += [part for part in wds.shardlists.expand_urls(pattern) if os.path.isdir(part)
                   and any(_is_video(str(f)) for f in Path(part).rglob("*"))]
    if videos:
        raise FileNotFoundError(
            f"shard pattern {pattern!r}: {videos[0]} holds video files, not .tar shards; these are videos: turn "
            "them into shards first with `python data/videos_to_shards.py VIDEOS SHARDS` and give SHARDS here"
        )
    if not found:
        raise FileNotFoundError(
            f"shard pattern {pattern!r} matches no shard; check the path, or build the shards first "
            "(python data/make_synthetic.py, data/videos_to_shards.py or data/cache_latents.py)"
        )
    return found


def first_shard_per_folder(shards: list[str]) -> list[str]:
    """The first of ``shards`` in each folder, in order: one shard per cache (a latent cache is one folder, whose
    manifest keeps every shard's settings alike), what a check of a pattern joining caches (``::``, a brace list of
    folders) reads to see all of them, one json each."""
    firsts: dict[str, str] = {}
    for shard in shards:
        firsts.setdefault(os.path.dirname(os.path.abspath(shard)), shard)
    return list(firsts.values())


def _is_video(path: str) -> bool:
    from mardini.data.video_shards import VIDEO_EXTENSIONS  # lazy: video_shards imports this module

    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def split_shards(shards: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The disjoint share of ``shards`` for (rank, worker): together the shares cover every shard once."""
    slots = world_size * num_workers
    if len(shards) < slots:
        raise ValueError(
            f"a finite split of {len(shards)} shards cannot feed {world_size} ranks x {num_workers} workers "
            f"= {slots} readers; write the split in at least {slots} (smaller) shards or lower num_workers"
        )
    return shards[rank * num_workers + worker :: slots]


# --------------------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------------------


def temp_beside(path: Path) -> Path:
    """A new temp file's name beside ``path``, unique to this call: writers of one file in several processes (caching
    into one folder) never write or rename each other's (with one fixed name, the second rename failed)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_tar(path: str | Path) -> Iterator[wds.TarWriter]:
    """A ``wds.TarWriter`` on a temp file of its own (:func:`temp_beside`), renamed to ``path`` only if the block
    finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        with open(tmp, "xb") as f:  # x: never an existing file; the mode of any file written here (umask)
            writer = wds.TarWriter(f, mtime=0.0)  # fixed mtime: same content, same bytes
            try:
                yield writer
            finally:
                writer.close()  # also when the block raises: not later, from the garbage collector, into a closed file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (what ``np.load`` reads back)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, separators=(",", ":")).encode("utf-8")


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` to ``path`` through a temp file of its own beside it (:func:`temp_beside`) and one ``os.replace``: a
    crash leaves the last whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # not the locale's (cp1252 on Windows has no arrows)
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def pack(sizes: Iterable[int], max_count: int, max_bytes: int) -> list[list[int]]:
    """Greedy, order-keeping packing of items (by byte size) into shards of at most ``max_count`` items and
    about ``max_bytes`` bytes (a single item larger than ``max_bytes`` gets a shard of its own).
    Returns the item indices of each shard. Deterministic: same sizes, same shards.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be >= 1, got {max_count}, {max_bytes}")
    shards: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, size in enumerate(sizes):
        if current and (len(current) >= max_count or used + size > max_bytes):
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        shards.append(current)
    return shards

"""Writes the synthetic set as WebDataset shards: ``<out>/<split>/<split>-NNNNNN.tar``.

Each sample: ``__key__`` = ``<split>-<index:07d>``, ``video.npy`` (uint8 ``(T, H, W, 3)``) and ``json``
(:func:`mardini.data.synthetic.render_clip` metadata plus ``split`` and ``index``).

Clip ``i`` of a split has seed ``SPLIT_OFFSET[split] + base_seed + i`` and goes to shard ``i // per_shard``,
so the output depends only on the arguments; train and val seeds never meet (offset 2**31 apart).
Finished shards are kept on a re-run (resumable); a ``manifest.json`` records the arguments and refuses a
re-run with different ones, naming them (``clips 2000 -> 500``).
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from mardini.data import synthetic
from mardini.data.sharding import atomic_tar, json_bytes, npy_bytes, write_json_atomic

SPLIT_OFFSET = {"train": 0, "val": 2**31}


def clip_seed(split: str, index: int, base_seed: int = 0) -> int:
    """Seed of clip ``index`` of ``split`` (train and val ranges are disjoint)."""
    if split not in SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_OFFSET)}")
    if not 0 <= base_seed + index < 2**31:
        raise ValueError(f"base_seed + index must be in [0, 2**31), got {base_seed + index}")
    return SPLIT_OFFSET[split] + base_seed + index


def _write_shard(job: dict) -> tuple[str, int]:
    path = Path(job["path"])
    with atomic_tar(path) as sink:
        for i in range(job["start"], job["stop"]):
            seed = clip_seed(job["split"], i, job["base_seed"])
            video, meta = synthetic.render_clip(seed, **job["render"])  # (T, H, W, 3) uint8
            meta.update(split=job["split"], index=i)
            sink.write({"__key__": f"{job['split']}-{i:07d}", "video.npy": npy_bytes(video), "json": json_bytes(meta)})
    return str(path), job["stop"] - job["start"]


def split_settings(split: str, clips: int, per_shard: int, frames: int = synthetic.DEMO_FRAMES,
                   height: int = synthetic.DEMO_HEIGHT, width: int = synthetic.DEMO_WIDTH,
                   fps: float = synthetic.DEMO_FPS, base_seed: int = 0) -> dict:
    """What a split's ``manifest.json`` records of :func:`write_synthetic_split`'s arguments (checked)."""
    if clips < 1 or per_shard < 1:
        raise ValueError(f"clips and per_shard must be >= 1, got {clips}, {per_shard}")
    return {
        "kind": "synthetic", "split": split, "clips": clips, "per_shard": per_shard, "frames": frames,
        "height": height, "width": width, "fps": fps, "base_seed": base_seed,
    }


def manifest_settings(folder: str | Path) -> dict | None:
    """The settings ``folder/manifest.json`` records, None without a manifest."""
    manifest = Path(folder) / "manifest.json"
    if not manifest.exists():
        return None
    return json.loads(manifest.read_text(encoding="utf-8")).get("settings") or {}


def settings_differences(old: dict | None, new: dict) -> list[str]:
    """``clips 2000 -> 500`` for each setting in which a manifest's ``old`` differs from ``new`` (none when
    ``old`` is None: no manifest)."""
    if old is None:
        return []
    keys = [*new, *(k for k in old if k not in new)]
    return [f"{k} {old.get(k, 'unset')} -> {new.get(k, 'unset')}" for k in keys if old.get(k) != new.get(k)]


def write_synthetic_split(
    out: str | Path,
    split: str,
    clips: int,
    per_shard: int,
    frames: int = synthetic.DEMO_FRAMES,
    height: int = synthetic.DEMO_HEIGHT,
    width: int = synthetic.DEMO_WIDTH,
    fps: float = synthetic.DEMO_FPS,
    base_seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write (or complete) one split under ``out/split``. Returns a summary dict (shards written / kept)."""
    folder = Path(out) / split
    settings = split_settings(split, clips, per_shard, frames, height, width, fps, base_seed)
    diffs = settings_differences(manifest_settings(folder), settings)
    if diffs:
        raise ValueError(f"{folder} holds a synthetic split made with other settings ({', '.join(diffs)}); "
                         "remove it or choose another output folder")
    manifest = folder / "manifest.json"
    write_json_atomic(manifest, {"settings": settings, "complete": False})
    render = {"frames": frames, "height": height, "width": width, "fps": fps}
    jobs = []
    n_shards = (clips + per_shard - 1) // per_shard
    for s in range(n_shards):
        path = folder / f"{split}-{s:06d}.tar"
        start, stop = s * per_shard, min(clips, (s + 1) * per_shard)
        jobs.append({"path": str(path), "split": split, "start": start, "stop": stop, "base_seed": base_seed,
                     "render": render})
    todo = [j for j in jobs if not Path(j["path"]).exists()]
    bar = tqdm(total=clips, desc=f"synthetic/{split}", unit="clip", disable=not progress,
               initial=clips - sum(j["stop"] - j["start"] for j in todo))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _, n in pool.map(_write_shard, todo):
                bar.update(n)
    else:
        for job in todo:
            bar.update(_write_shard(job)[1])
    bar.close()
    write_json_atomic(manifest, {"settings": settings, "complete": True, "shards": n_shards})
    return {"split": split, "shards": n_shards, "written": len(todo), "kept": n_shards - len(todo), "clips": clips}

"""The demo's data: build the embedded synthetic set, stream it, show it (``python -m mardini.demo.data``).

1. Builds the synthetic set under ``data/shards/synthetic/{train,val}`` if missing (reuses it when present).
2. Streams the training split through :class:`VideoDataModule` for a few seconds and prints clips/s.
3. Writes ``outputs/demo/contact_sheet.png`` of a few validation clips (interpolation mask: first and last
   frames given, framed in green) and prints a short summary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mardini.data import synthetic as S
from mardini.data.datamodule import VideoDataModule
from mardini.data.synthetic_shards import (manifest_settings, settings_differences, split_settings,
                                           write_synthetic_split)
from mardini.masking import interpolation_mask
from mardini.visualize import contact_sheet

SHARDS = Path("data/shards/synthetic")
OUTPUT = Path("outputs/demo")


RENDER = dict(frames=S.DEMO_FRAMES, height=S.DEMO_HEIGHT, width=S.DEMO_WIDTH, fps=S.DEMO_FPS)


def _splits(train_clips: int, val_clips: int) -> list[tuple[str, int, int]]:
    """``(split, clips, clips per shard)`` of the demo's set."""
    return [("train", train_clips, S.DEMO_TRAIN_PER_SHARD), ("val", val_clips, S.DEMO_VAL_PER_SHARD)]


def build_synthetic(root: Path = SHARDS, train_clips: int = S.DEMO_TRAIN_CLIPS, val_clips: int = S.DEMO_VAL_CLIPS,
                    workers: int = 2, progress: bool = True) -> list[dict]:
    """Write (or complete; finished shards are reused) the demo's synthetic train and val splits."""
    return [write_synthetic_split(root, split, clips, per_shard, **RENDER, workers=workers, progress=progress)
            for split, clips, per_shard in _splits(train_clips, val_clips)]


def synthetic_differences(root: Path = SHARDS, train_clips: int = S.DEMO_TRAIN_CLIPS,
                          val_clips: int = S.DEMO_VAL_CLIPS) -> dict[str, list[str]]:
    """Split -> how the split already under ``root`` differs from what :func:`build_synthetic` would write
    (``["clips 2000 -> 500"]``), for each split that does (checks the clip counts; writes nothing). A split that
    is not a synthetic one (another writer's manifest) is refused: it is no derived set to rebuild."""
    stale = {}
    for split, clips, per_shard in _splits(train_clips, val_clips):
        old = manifest_settings(root / split)
        diffs = settings_differences(old, split_settings(split, clips, per_shard, **RENDER))
        if diffs and old.get("kind") != "synthetic":
            raise ValueError(f"{root / split} holds data the demo did not write (its manifest.json: {old}); move "
                             f"it elsewhere, the demo builds its synthetic set in {root}")
        if diffs:
            stale[split] = diffs
    return stale


def demo_datamodule(root: Path = SHARDS, batch_size: int = 8, num_workers: int = 2) -> VideoDataModule:
    """The loader at the demo configuration (9 frames at 8 fps, 32x32)."""
    return VideoDataModule(
        train_shards=str(root / "train"), val_shards=str(root / "val"), frames=S.DEMO_LOADER_FRAMES,
        fps=S.DEMO_LOADER_FPS, resolution=S.DEMO_LOADER_RESOLUTION, batch_size=batch_size, num_workers=num_workers,
        epoch_size=100_000, val_clips=S.DEMO_VAL_CLIPS,
    )


def stream_for(dm: VideoDataModule, seconds: float) -> tuple[int, float, dict]:
    """Pull training batches for about ``seconds``; returns (clips, elapsed seconds, last batch)."""
    clips, batch = 0, {}
    it = iter(dm.train_dataloader())
    batch = next(it)  # worker start-up is not part of the rate
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        clips += batch["video"].shape[0]
    return clips, time.perf_counter() - start, batch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=SHARDS)
    p.add_argument("--out", type=Path, default=OUTPUT)
    p.add_argument("--seconds", type=float, default=5.0, help="how long to stream")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--train-clips", type=int, default=S.DEMO_TRAIN_CLIPS)
    p.add_argument("--rows", type=int, default=6, help="clips in the contact sheet")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    print(f"[1/3] synthetic data set under {a.shards}/ (built if missing, reused when present)")
    built = build_synthetic(a.shards, train_clips=a.train_clips, workers=a.workers)
    for s in built:
        print(f"      {s['split']}: {s['clips']} clips, {s['shards']} shards "
              f"({s['written']} written, {s['kept']} reused)")

    print(f"[2/3] streaming the training split for {a.seconds:.0f} s with {a.workers} workers")
    dm = demo_datamodule(a.shards, num_workers=a.workers)
    dm.setup("fit")
    clips, dt, batch = stream_for(dm, a.seconds)
    rate = clips / max(dt, 1e-9)
    print(f"      {clips} clips in {dt:.1f} s = {rate:.0f} clips/s; batch video {tuple(batch['video'].shape)} "
          f"in [{batch['video'].min():.2f}, {batch['video'].max():.2f}], fps {batch['fps'][0]:.0f}, "
          f"skipped {dm.skipped}")

    print(f"[3/3] contact sheet of {a.rows} validation clips")
    val = next(iter(dm.val_dataloader()))
    video = val["video"][: a.rows]  # (rows, T, 3, H, W)
    mask = interpolation_mask(video.shape[1])[None].expand(video.shape[0], -1)  # (rows, T) True = generate
    sheet = contact_sheet(video, a.out / "contact_sheet.png", mask=mask, row_labels=val["key"][: a.rows])
    summary = {"clips_per_s": rate, "clips": clips, "seconds": dt, "contact_sheet": str(sheet),
               "batch_shape": list(batch["video"].shape), "skipped": dm.skipped,
               "total_s": time.perf_counter() - t0}
    print(f"      wrote {sheet}")
    print(f"done in {summary['total_s']:.0f} s: the loader streams {rate:.0f} clips/s of "
          f"{S.DEMO_LOADER_FRAMES} frames at {S.DEMO_LOADER_FPS:.0f} fps, {S.DEMO_LOADER_RESOLUTION}x"
          f"{S.DEMO_LOADER_RESOLUTION}; the synthetic set is in {a.shards}/")
    return summary


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    main()

"""Encode the clips of a shard set into latent shards (``z_high.npy``, ``z_low.npy``, ``json``).

    python data/cache_latents.py data/shards/synthetic/train data/cache/synthetic/train \
        --frames 9 --fps 8 --resolution 32 --planner-resolution 16
    python data/cache_latents.py SHARDS OUT --autoencoder mardini.autoencoders.DiffusersAutoencoder \
        --autoencoder-kwargs '{"path": "weights/vae-16ch"}' --resolution 256 --planner-resolution 128 --device cuda

The cache freezes augmentation (centre crop, fixed centred frame selection); train from it with
``data.latents=true`` and the same frames/fps/resolution. Re-running resumes (finished shards are kept).
Exit code 0 with clips cached, 2 on a user error (printed without a traceback): missing shards or autoencoder
weights, a folder of videos instead of shards, an unusable --device, or settings under which no clip fits.
"""

from __future__ import annotations

import argparse
import json
import sys

from mardini.data.latent_cache import cache_latents, load_autoencoder
from mardini.user_errors import run_reporting_user_errors


def _size(text: str) -> int | tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="input shards: folder, brace pattern or glob")
    p.add_argument("out", help="output folder (one latent shard per input shard, same names)")
    p.add_argument("--autoencoder", default="mardini.autoencoders.SpaceToDepthAutoencoder", help="class path")
    p.add_argument("--autoencoder-kwargs", default="{}", help="JSON dict of constructor arguments")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--fps", type=float, default=8.0, help="target fps (0 = native)")
    p.add_argument("--resolution", type=_size, default=32, help="pixel size before encoding: 256 or 256x448")
    p.add_argument("--planner-resolution", type=_size, default=16, help="planner copy size: 128 or 128x224")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """The summary of :func:`cache_latents`; user errors raise (``__main__`` prints them without a traceback)."""
    a = parse_args(argv)
    kwargs = json.loads(a.autoencoder_kwargs)
    ae = load_autoencoder(a.autoencoder, kwargs)
    summary = cache_latents(
        a.shards, a.out, ae, frames=a.frames, fps=a.fps or None, resolution=a.resolution,
        planner_resolution=a.planner_resolution, dtype=a.dtype, batch_size=a.batch_size, device=a.device,
        progress=not a.no_progress,
    )
    print(f"{summary['clips']} clips cached in {summary['shards']} shards "
          f"({summary['written']} written, {summary['kept']} kept); {summary['skipped']} bad clips skipped"
          + (f"; {len(summary['empty'])} input shard(s) without a usable clip not cached" if summary["empty"] else ""))
    return summary


def cli(argv: list[str] | None = None) -> int:
    """The exit code of the command: 0 with clips cached, 2 on a user error, printed without a traceback."""
    return run_reporting_user_errors("cache_latents.py", lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())

"""Encode the clips of a shard set into latent shards (``z_high.npy``, ``z_low.npy``, ``json``).

    python data/cache_latents.py data/shards/synthetic/train data/cache/synthetic/train \
        --frames 9 --fps 8 --resolution 32 --planner-resolution 16
    python data/cache_latents.py SHARDS OUT --autoencoder mardini.autoencoders.DiffusersAutoencoder \
        --autoencoder-kwargs '{"path": "weights/vae-16ch"}' --resolution 256 --planner-resolution 128 --device cuda

The cache freezes augmentation (centre crop, fixed centred frame selection); train from it with
``data.latents=true`` and the same frames/fps/resolution. Re-running resumes (finished shards are kept).
Several processes can cache into one folder: ``--part I/N`` makes this one cache input shards I, I+N, ... (N
processes, I = 0 .. N-1, each shard once); ``--part slurm`` takes I and N from srun's SLURM_PROCID and SLURM_NTASKS
(never by default: a lone process in a many-task allocation would cache a fraction without a word):

    srun --ntasks 8 python data/cache_latents.py SHARDS OUT ... --part slurm

Exit code 0 with clips cached, 2 on a user error (printed without a traceback): missing shards or autoencoder
weights, a folder of videos instead of shards, an unusable --device, a --planner-resolution larger than
--resolution (checked before anything loads), sizes the autoencoder's downsampling factor does not divide (checked
once it is loaded), or settings under which no clip fits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mardini.data.latent_cache import cache_latents, check_sizes, load_autoencoder
from mardini.user_errors import run_reporting_user_errors

SIZE_FLAGS = ("--resolution", "--planner-resolution")
KWARGS_EXAMPLE = """'{"shift": -0.40, "scale": 2.58}'"""


def _size(text: str) -> int | tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="input shards: folder, brace pattern or glob")
    p.add_argument("out", help="output folder (one latent shard per input shard, same names)")
    p.add_argument("--autoencoder", default="mardini.autoencoders.SpaceToDepthAutoencoder", help="class path")
    p.add_argument("--autoencoder-kwargs", default="{}",
                   help=f"JSON object of the autoencoder's constructor arguments, e.g. {KWARGS_EXAMPLE}")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--fps", type=float, default=8.0, help="target fps (0 = native)")
    p.add_argument("--resolution", type=_size, default=32,
                   help="pixel size before encoding: 256 or 256x448 (multiples of the autoencoder's factor)")
    p.add_argument("--planner-resolution", type=_size, default=16,
                   help="planner copy size: 128 (the short side) or 128x224; at most --resolution, and the copy's "
                        "sides multiples of the autoencoder's factor")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--part", help="I/N: cache input shards I, I+N, ... only (N processes into one folder); "
                                  "slurm: I/N from SLURM_PROCID/SLURM_NTASKS (under srun)")
    return p.parse_args(argv)


def parse_part(text: str | None) -> tuple[int, int] | None:
    """``--part``: ``I/N`` or ``slurm`` (srun's ``SLURM_PROCID/SLURM_NTASKS``) -> ``(I, N)``; None without it."""
    if text is None:
        return None
    if text == "slurm":
        procid, ntasks = os.environ.get("SLURM_PROCID"), os.environ.get("SLURM_NTASKS")
        if procid is None or ntasks is None:
            raise ValueError("--part slurm takes SLURM_PROCID and SLURM_NTASKS, and they are not set: run it under "
                             "srun (one process per task), or give --part I/N")
        text = f"{procid}/{ntasks}"
    index, _, parts = text.partition("/")
    if not (index.isdigit() and parts.isdigit() and int(index) < int(parts)):
        raise ValueError(f"--part {text} is impossible: it must be I/N with 0 <= I < N (process I of N caches input "
                         "shards I, I+N, ...), or slurm")
    return int(index), int(parts)


def parse_autoencoder_kwargs(text: str) -> dict:
    """``--autoencoder-kwargs``: a JSON object (the autoencoder's constructor arguments) -> dict."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--autoencoder-kwargs {text} is not JSON ({e}): give a JSON object of the autoencoder's "
                         f"constructor arguments, e.g. --autoencoder-kwargs {KWARGS_EXAMPLE}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--autoencoder-kwargs {text} is not a JSON object: give the autoencoder's constructor "
                         f"arguments by name, e.g. --autoencoder-kwargs {KWARGS_EXAMPLE}")
    return kwargs


def main(argv: list[str] | None = None) -> dict:
    """The summary of :func:`cache_latents`; user errors raise (``__main__`` prints them without a traceback)."""
    a = parse_args(argv)
    part = parse_part(a.part)
    check_sizes(a.resolution, a.planner_resolution, names=SIZE_FLAGS)  # before the autoencoder loads
    kwargs = parse_autoencoder_kwargs(a.autoencoder_kwargs)
    ae = load_autoencoder(a.autoencoder, kwargs, "--autoencoder-kwargs")
    check_sizes(a.resolution, a.planner_resolution, ae.downsample, names=SIZE_FLAGS)  # before the progress bar starts
    summary = cache_latents(
        a.shards, a.out, ae, frames=a.frames, fps=a.fps or None, resolution=a.resolution,
        planner_resolution=a.planner_resolution, dtype=a.dtype, batch_size=a.batch_size, device=a.device,
        progress=not a.no_progress, part=part,
    )
    if part is not None and not summary["shards"]:
        print(f"part {summary['part']} has no input shard ({summary['inputs']} input shards over {part[1]} parts); "
              "nothing to do")
        return summary
    of = f" (part {summary['part']} of {summary['inputs']} input shards)" if part is not None else ""
    print(f"{summary['clips']} clips cached in {summary['shards']} shards{of} "
          f"({summary['written']} written, {summary['kept']} kept); {summary['skipped']} bad clips skipped"
          + (f"; {len(summary['empty'])} input shard(s) without a usable clip not cached" if summary["empty"] else ""))
    return summary


def cli(argv: list[str] | None = None) -> int:
    """The exit code of the command: 0 with clips cached, 2 on a user error, printed without a traceback."""
    return run_reporting_user_errors("cache_latents.py", lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())

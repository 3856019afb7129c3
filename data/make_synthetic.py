"""Write the embedded synthetic set ("bouncing shapes") as WebDataset shards.

    python data/make_synthetic.py                       # demo defaults -> data/shards/synthetic/{train,val}
    python data/make_synthetic.py --train-clips 20000 --height 128 --width 128 --out data/shards/synth128

Deterministic (same arguments, same bytes), resumable (finished shards are kept), train/val seeds disjoint. A
folder holding a split of other settings is refused, naming them (``clips 2000 -> 500``).
"""

from __future__ import annotations

import argparse
import sys

from mardini.data import synthetic as S
from mardini.data.synthetic_shards import write_synthetic_split
from mardini.user_errors import run_reporting_user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/shards/synthetic", help="output folder (gets train/ and val/)")
    p.add_argument("--train-clips", type=int, default=S.DEMO_TRAIN_CLIPS)
    p.add_argument("--val-clips", type=int, default=S.DEMO_VAL_CLIPS)
    p.add_argument("--train-per-shard", type=int, default=S.DEMO_TRAIN_PER_SHARD)
    p.add_argument("--val-per-shard", type=int, default=S.DEMO_VAL_PER_SHARD)
    p.add_argument("--frames", type=int, default=S.DEMO_FRAMES)
    p.add_argument("--height", type=int, default=S.DEMO_HEIGHT)
    p.add_argument("--width", type=int, default=S.DEMO_WIDTH)
    p.add_argument("--fps", type=float, default=S.DEMO_FPS)
    p.add_argument("--seed", type=int, default=0, help="base seed of both splits")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    out = []
    for split, clips, per in (("train", a.train_clips, a.train_per_shard), ("val", a.val_clips, a.val_per_shard)):
        if clips > 0:
            out.append(write_synthetic_split(
                a.out, split, clips, per, frames=a.frames, height=a.height, width=a.width, fps=a.fps,
                base_seed=a.seed, workers=a.workers, progress=not a.no_progress,
            ))
    for s in out:
        print(f"{s['split']}: {s['clips']} clips in {s['shards']} shards ({s['written']} written, {s['kept']} kept)")
    return out


if __name__ == "__main__":  # a user error (a folder of other settings) is one line and exit code 2
    sys.exit(run_reporting_user_errors("make_synthetic.py", main))

"""Loader throughput at the demo configuration (9 frames at 8 fps, 32x32, from 64x64 16 fps clips).

    python -m bench.data_throughput [--seconds 6] [--batch-size 16] [--shards DIR]

Streams the demo synthetic set (built if missing), or with ``--shards DIR`` the ``DIR/train`` shards as they are
(e.g. ``data/make_synthetic.py --train-clips 40 --out DIR``), and measures clips/s of ``VideoDataModule``'s
training stream at the demo's loader settings with 0, 1 and 2 workers in one run (worker start-up and the first
batch excluded). Writes ``bench/results/data_throughput.json`` and prints a table with each rate relative to 0
workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from bench.common import command, loader_shards, train_stream
from mardini.demo import SHARDS, stream_for
from mardini.user_errors import run_reporting_user_errors

RESULTS = Path("bench/results/data_throughput.json")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shards", type=Path, default=SHARDS,
                   help="a folder holding train/ shards, read as it is (default: the demo's set, built if missing)")
    a = p.parse_args(argv)
    loader_shards(a.shards)
    rows = []
    for w in a.workers:
        dm = train_stream(a.shards, a.batch_size, w)
        clips, dt, _ = stream_for(dm, a.seconds)
        rows.append({"workers": w, "clips": clips, "seconds": round(dt, 3), "clips_per_s": round(clips / dt, 1)})
    base = rows[0]["clips_per_s"]
    for r in rows:
        r["vs_first"] = round(r["clips_per_s"] / base, 2)
    result = {
        "command": command("bench.data_throughput", argv),
        "config": {"frames": 9, "fps": 8, "resolution": 32, "shards": str(a.shards / "train"),
                   "batch_size": a.batch_size, "seconds_per_setting": a.seconds},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "load_avg_1min": os.getloadavg()[0]},
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"{'workers':>8} {'clips/s':>9} {'vs first':>9}")
    for r in rows:
        print(f"{r['workers']:>8} {r['clips_per_s']:>9.1f} {r['vs_first']:>9.2f}")
    print(f"wrote {RESULTS}")
    return result


if __name__ == "__main__":  # unusable --shards: one line and exit code 2
    sys.exit(run_reporting_user_errors("bench.data_throughput", main))

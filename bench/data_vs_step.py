"""Does the loader keep up? Loader clips/s against the clips/s a training step consumes, in one run.

    .venv/bin/python -m bench.data_vs_step [--rounds 3] [--seconds 5] [--quick] [--shards DIR]

Demo configuration = ``configs/tiny/common.yaml`` + ``05_joint_task.yaml``: synthetic shards (the demo's set, built
if missing; ``--shards DIR``: ``DIR/train`` as it is; ``--quick`` without ``--shards``: a 32-clip set written to a
temporary folder, not the demo's 2000 clips), 9 frames at 8 fps,
32x32, batch 8 (``--batch-size``), ``num_workers`` 1; ``MarDiniModule`` size ``tiny``, planner 16 px, generator patch 2,
bf16 autocast. The step is forward + backward + AdamW + EMA on the loader's own batch (pixels, so the
autoencoder encode is included).

Rounds alternate (1) streaming the loader alone for ``--seconds`` and (2) ``--steps`` training steps on a
fixed batch; ratio = loader clips/s / step clips/s (medians). (3) A last pass trains while pulling every batch
from the live loader and reports the share of time spent waiting in ``next()`` (the stall).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (QUICK_CLIPS, command, loader_shards, machine, median, quick_shards, timed, train_stream,
                          write_result)
from bench.tiny_step import build
from mardini.demo import SHARDS, stream_for
from mardini.user_errors import run_reporting_user_errors

NAME = "data_vs_step"


def build_step(batch_size: int):
    torch.manual_seed(0)
    module = build()  # the demo's last stage as configs/tiny/05_joint_task.yaml builds it
    opt = torch.optim.AdamW(module.networks.parameters(), lr=1e-3)

    def step(batch: dict, i: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.compute_loss(batch, module.step_generator(i), train=True).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.ema.update(module.networks, step=i)

    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="loader streaming time per round")
    p.add_argument("--steps", type=int, default=3, help="training steps per round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="the demo's num_workers (configs/tiny/common.yaml)")
    p.add_argument("--shards", type=Path, default=None,
                   help="a folder holding train/ shards, read as it is (default: the demo's set, built if missing)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.seconds, a.steps = 1, 1.0, 1
    with tempfile.TemporaryDirectory(prefix="data_vs_step_") as tmp:
        if a.quick and a.shards is None:
            shards, source = quick_shards(Path(tmp)), f"a {QUICK_CLIPS}-clip synthetic set (--quick)"
        else:
            shards = loader_shards(a.shards or SHARDS)
            source = str(shards / "train")
        return measure(a, train_stream(shards, a.batch_size, a.workers), source, argv)


def measure(a: argparse.Namespace, dm, source: str, argv: list[str] | None) -> dict:
    """The rounds and the live pass of :func:`main` on the set-up loader ``dm``."""
    step = build_step(a.batch_size)
    _, _, batch = stream_for(dm, 0.0)
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    step(batch, 0)  # warm-up
    rounds = []
    for r in range(a.rounds):
        clips, dt, _ = stream_for(dm, a.seconds)
        sec = median([timed(lambda: step(batch, 1 + r * a.steps + i)) for i in range(a.steps)])
        rounds.append({"loader_clips_per_s": clips / dt, "step_s": sec, "step_clips_per_s": a.batch_size / sec})
        rounds[-1]["ratio"] = rounds[-1]["loader_clips_per_s"] / rounds[-1]["step_clips_per_s"]
        print(f"  round {r}: loader {clips / dt:.1f} clips/s, step {sec:.3f} s = {a.batch_size / sec:.1f} clips/s, "
              f"ratio {rounds[-1]['ratio']:.1f}x", flush=True)
    # live: train from the loader, time spent waiting for batches
    it = iter(dm.train_dataloader())
    next(it)
    wait = work = 0.0
    for i in range(max(2, a.steps * 2)):
        t0 = time.perf_counter()
        live = {k: v for k, v in next(it).items() if torch.is_tensor(v)}
        t1 = time.perf_counter()
        step(live, 100 + i)
        wait, work = wait + t1 - t0, work + time.perf_counter() - t1
    summary = {k: median([x[k] for x in rounds]) for k in rounds[0]}
    summary["live_wait_share"] = wait / (wait + work)
    result = {"command": command(f"bench.{NAME}", argv), "settings": {**vars(a), "shards": source},
              "machine": machine(), "median": summary, "rounds": rounds}
    path = write_result(NAME, result)
    print(f"loader {summary['loader_clips_per_s']:.1f} clips/s vs training {summary['step_clips_per_s']:.1f} clips/s "
          f"({a.workers} worker): {summary['ratio']:.1f}x; training from the live loader waits "
          f"{summary['live_wait_share']:.1%} of the time; wrote {path}")
    return result


if __name__ == "__main__":  # unusable --shards: one line and exit code 2
    sys.exit(run_reporting_user_errors("bench.data_vs_step", main))

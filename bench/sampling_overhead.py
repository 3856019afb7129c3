"""Per-step overhead of sampling outside the generator's forward, with the reference cache and batched guidance.

    .venv/bin/python -m bench.sampling_overhead [--size tiny --resolution 32 --frames 9 --steps 25] [--quick]

Uses ``MarDiniPipeline`` as ``sample.py`` does (``bench.sampling.build_pipeline``: random weights, exact pixel
autoencoder), image-to-video with guidance 2.5, cache and batched guidance on. Forward hooks on the generator
time every network call; overhead = generator-loop seconds (the pipeline's own timer) minus the seconds inside
the network, i.e. the DDIM update, guidance combination, reference copy-back and Python per step.
Median over ``--rounds``.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import command, machine, median, write_result
from bench.sampling import build_pipeline
from mardini.masking import image_to_video_mask

NAME = "sampling_overhead"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--planner-resolution", type=int, default=16)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fp32", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.resolution, a.planner_resolution, a.frames, a.steps, a.rounds = 16, 8, 4, 3, 1
    pipe = build_pipeline(a.size, a.frames, "cpu", not a.fp32, a.planner_resolution)
    inside = {"s": 0.0, "calls": 0, "t0": 0.0}

    def pre(module, args, kwargs):
        inside["t0"] = time.perf_counter()

    def post(module, args, kwargs, out):
        inside["s"] += time.perf_counter() - inside["t0"]
        inside["calls"] += 1

    pipe.generator.register_forward_pre_hook(pre, with_kwargs=True)
    pipe.generator.register_forward_hook(post, with_kwargs=True)
    video = torch.rand(1, a.frames, 3, a.resolution, a.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = image_to_video_mask(a.frames)[None]  # (1, T)
    pipe.generate(video, mask, steps=2, guidance_scale=2.5, progress=False)  # warm-up
    rounds = []
    for _ in range(a.rounds):
        inside.update(s=0.0, calls=0)
        pipe.generate(video, mask, steps=a.steps, guidance_scale=2.5, progress=False)
        loop = pipe.last_timings["generator"]
        rounds.append({"loop_s": loop, "network_s": inside["s"], "calls": inside["calls"],
                       "overhead_share": (loop - inside["s"]) / loop,
                       "overhead_ms_per_step": 1000 * (loop - inside["s"]) / a.steps})
    summary = {k: median([r[k] for r in rounds]) for k in rounds[0]}
    result = {"command": command(f"bench.{NAME}", argv), "settings": vars(a), "machine": machine(),
              "median": summary, "rounds": rounds}
    path = write_result(NAME, result)
    print(f"{a.steps} steps: loop {summary['loop_s']:.3f} s, network {summary['network_s']:.3f} s in "
          f"{summary['calls']:.0f} calls; overhead {summary['overhead_share']:.1%} "
          f"({summary['overhead_ms_per_step']:.2f} ms/step); wrote {path}")
    return result


if __name__ == "__main__":
    main()

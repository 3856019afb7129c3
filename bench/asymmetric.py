"""PAPER.md Table 3: sampling latency and peak memory of the asymmetric design vs its symmetric variants.

On CPU by default, on a GPU with ``--device cuda``:

    .venv/bin/python -m bench.asymmetric [--frames 9 13] [--steps 10] [--rounds 1] [--full-warmup] [--quick]
        [--device cuda]

Variants (same two networks, so parameter counts match exactly; only resolution and attention change):
    a  MarDini       planner on the low-res copy, generator with temporal attention (/T)
    b  asym. res.    planner on the low-res copy, generator with spatio-temporal attention (/ST)
    c  symmetric     planner at the generator's resolution, generator /ST

Scale: the paper's S/T networks at 512^2 shrunk by 16 in width AND tokens per frame, so each network keeps the
paper's attention-to-linear FLOP balance (tokens / width) and the 4:1 high/low token ratio: generator width
1024 -> 64 (one 64-d head), planner 4096 -> 256 (4 heads), depth 8 each, MLP as Table 1 (4096 -> 256 planner,
4x generator); 64x64 -> 16x16 latent tokens per frame (32 px, exact space-to-depth autoencoder), planner
32x32 -> 8x8 (16 px). Image-to-video (1 given frame), guidance 2.5, DDIM ``--steps``, bf16 autocast, through
``MarDiniPipeline`` (planner once, reference cache and batched guidance on), as the paper's setting.

Each (variant, frames) runs in its own subprocess: latency = planner + generator seconds of a second
``generate`` call (the first, 1 step or with ``--full-warmup`` as many as the timed call, warms up). Memory on CPU:
``peak_growth_mib`` = what a third call, as long as the timed one, adds to the resident set at its peak (``VmHWM``
reset through ``/proc/self/clear_refs``, as ``bench.attention_memory``; glibc then serves buffers above 64 KiB
with their own mmap, so freed memory is not reused unseen; after the timed call, which it would slow down), so
one-time runtime allocations of the first call are not counted; ``peak_rss_mib`` = the subprocess's max RSS
(``ru_maxrss``, those included). On CUDA: ``torch.cuda.max_memory_allocated`` and its growth over the memory the
networks hold. Rounds interleave the variants; medians are reported, with the latency's and the memory growth's
min and max over the rounds (``latency_min_s``, ``latency_max_s``, ``memory_growth_min_mib``,
``memory_growth_max_mib``).

FLOPs (model FLOPs of the whole sampling call, ``bench.common.flop_counter``, after the timed call): counted for
1 and 2 steps, so ``total = f1 + (steps - 1) (f2 - f1)`` (the first step also fills the reference cache). The
latency ratio (c)/(a) can exceed the FLOP ratio only where (a) runs at a higher FLOP/s than (c).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from bench.common import (command, flop_counter, machine, median, mmap_large_buffers, rss_peak_bytes,
                          write_result)

NAME = "asymmetric"
VARIANTS = {"a": ("low", "t"), "b": ("low", "st"), "c": ("high", "st")}
LABELS = {"a": "MarDini (low-res planner, /T)", "b": "low-res planner, /ST", "c": "full-res planner, /ST"}


def child(variant: str, frames: int, steps: int, side: int, low: int, scale: int, threads: int | None,
          device: str = "cpu", warmup_steps: int = 1, measure_memory: bool = True) -> dict:
    """One measurement in this process (after a ``warmup_steps`` warm-up call); returns seconds and memory.

    ``measure_memory`` (CPU): the peak-growth call, which leaves glibc mmapping every buffer above 64 KiB for the
    rest of the process (its slower allocation is why the bench measures in subprocesses)."""
    from mardini.autoencoders import SpaceToDepthAutoencoder
    from mardini.masking import image_to_video_mask
    from mardini.models import build_generator, build_planner
    from mardini.pipeline import MarDiniPipeline

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    res_mode, attn = VARIANTS[variant]
    ae = SpaceToDepthAutoencoder(2)
    pw, gw = 4096 // scale, 1024 // scale
    planner = build_planner("small", dim=pw, heads=max(1, pw // 64), mlp_hidden=pw, depth=8,
                            in_channels=ae.latent_channels)
    planner.drop_head()
    generator = build_generator("small", dim=gw, heads=max(1, gw // 64), mlp_hidden=4 * gw, plan_dim=pw, depth=8,
                                in_channels=ae.latent_channels, attention=attn)
    with torch.no_grad():  # non-zero adaLN outputs, so every layer does its work
        for p in generator.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pix = 2 * side  # the autoencoder halves the side
    pipe = MarDiniPipeline(generator, ae, planner, planner_resolution=2 * (low if res_mode == "low" else side),
                           window=frames, dtype=torch.bfloat16, device=device)
    video = torch.rand(1, frames, 3, pix, pix, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = image_to_video_mask(frames)[None]  # (1, T): frame 0 given
    cuda = pipe.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(pipe.device)
        gpu_built = torch.cuda.memory_allocated(pipe.device)
    pipe.generate(video, mask, steps=warmup_steps, guidance_scale=2.5, progress=False)  # warm-up
    pipe.generate(video, mask, steps=steps, guidance_scale=2.5, progress=False)
    tm = dict(pipe.last_timings)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu_peak = torch.cuda.max_memory_allocated(pipe.device) if cuda else None  # before the FLOP counting
    growth = None
    if measure_memory and not cuda:  # a third call, after the timed one: the mmap threshold slows allocation
        mmap_large_buffers()
        growth = rss_peak_bytes(lambda: pipe.generate(video, mask, steps=steps, guidance_scale=2.5, progress=False))
    counted = []
    for n in (1, 2):
        with flop_counter() as fc:
            pipe.generate(video, mask, steps=n, guidance_scale=2.5, progress=False)
        counted.append(fc.get_total_flops())
    flops = counted[0] + (steps - 1) * (counted[1] - counted[0])
    return {"variant": variant, "frames": frames, "latency_s": tm["planner"] + tm["generator"],
            "planner_s": tm["planner"], "generator_s": tm["generator"], "peak_rss_mib": peak / 2**20,
            "peak_growth_mib": growth / 2**20 if growth is not None else None, "gflop": flops / 1e9,
            "peak_gpu_mib": gpu_peak / 2**20 if cuda else None,
            "peak_gpu_growth_mib": (gpu_peak - gpu_built) / 2**20 if cuda else None,
            "gflop_per_s": flops / 1e9 / (tm["planner"] + tm["generator"]),
            "params_M": {"planner": sum(p.numel() for p in planner.parameters()) / 1e6,
                         "generator": sum(p.numel() for p in generator.parameters()) / 1e6},
            "tokens": {"generator": frames * side * side,
                       "planner": frames * (low if res_mode == "low" else side) ** 2}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[9, 13])
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (the paper times 25; 10 keeps CPU runs short)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 1, also with --quick)")
    p.add_argument("--full-warmup", action="store_true",
                   help="warm up with a call as long as the timed one (default: a 1-step call)")
    p.add_argument("--side", type=int, default=16, help="generator latent side (tokens per frame = side^2)")
    p.add_argument("--low", type=int, default=8, help="planner latent side in variants a, b")
    p.add_argument("--scale", type=int, default=16, help="width divisor of the paper's networks")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (memory: max_memory_allocated on cuda, max RSS on cpu)")
    p.add_argument("--quick", action="store_true", help="small, 2 steps, one round unless --rounds (smoke test)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS),
                   help="which variants to run (the ratios need c)")
    p.add_argument("--tag", default="", help="suffix of the result file name (other scales beside the default)")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "FRAMES"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if "c" not in a.variants:
        p.error("--variants must include c: every ratio is (c) over a variant")
    if a.quick:
        a.frames, a.steps, a.side, a.low, a.scale = [5], 2, 8, 4, 64
    a.rounds = a.rounds or 1
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.steps, a.side, a.low, a.scale, a.threads, a.device,
                               a.steps if a.full_warmup else 1)))
        return {}
    gpu = a.device.startswith("cuda")
    mem, growth = ("peak_gpu_mib", "peak_gpu_growth_mib") if gpu else ("peak_rss_mib", "peak_growth_mib")
    runs = []
    for r in range(a.rounds):
        for frames in a.frames:
            for v in a.variants:
                args = ["--child", v, str(frames), "--steps", str(a.steps), "--side", str(a.side), "--low",
                        str(a.low), "--scale", str(a.scale), "--device", a.device]
                args += ["--threads", str(a.threads)] if a.threads else []
                args += ["--full-warmup"] if a.full_warmup else []
                out = subprocess.run([sys.executable, "-m", f"bench.{NAME}", *args], capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"variant {v} at {frames} frames failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append({**row, "round": r})
                print(f"  round {r} {frames:2d} frames {v}: {row['latency_s']:.2f} s, peak {'GPU' if gpu else 'RSS'} "
                      f"{row[mem]:.0f} MiB (+{row[growth]:.0f})", flush=True)
    table = []
    for frames in a.frames:
        med = {v: {k: median([x[k] for x in runs if x["variant"] == v and x["frames"] == frames])
                   for k in ("latency_s", "planner_s", "generator_s", mem, growth, "gflop", "gflop_per_s")}
               for v in a.variants}
        for v in a.variants:
            lat = [x["latency_s"] for x in runs if x["variant"] == v and x["frames"] == frames]
            grew = [x[growth] for x in runs if x["variant"] == v and x["frames"] == frames]
            table.append({"frames": frames, "variant": v, "label": LABELS[v], **med[v], "rounds": len(lat),
                          "latency_min_s": min(lat), "latency_max_s": max(lat),
                          "memory_growth_min_mib": min(grew), "memory_growth_max_mib": max(grew),
                          "c_over_this_latency": med["c"]["latency_s"] / med[v]["latency_s"],
                          "c_over_this_flops": med["c"]["gflop"] / med[v]["gflop"],
                          "this_over_c_memory": med[v][mem] / med["c"][mem]})
    result = {"command": command(f"bench.{NAME}", argv),
              "settings": {k: v for k, v in vars(a).items() if k not in ("child", "tag")},
              "memory": "torch.cuda.max_memory_allocated" if gpu else
              "peak_rss_mib: max RSS of the subprocess; peak_growth_mib: VmHWM growth of a call after the timed one "
              "(clear_refs reset, glibc mmap threshold 64 KiB)",
              "machine": machine(), "params_M": runs[0]["params_M"], "table": table, "runs": runs}
    path = write_result(NAME + (f"_{a.tag}" if a.tag else ""), result)
    print(f"\n| frames | variant | latency s | planner s | generator s | peak {'GPU' if gpu else 'RSS'} MiB | GFLOP "
          "| GFLOP/s | (c) latency / this | (c) FLOPs / this |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['frames']} | {row['label']} | {row['latency_s']:.2f} | {row['planner_s']:.2f} | "
              f"{row['generator_s']:.2f} | {row[mem]:.0f} | {row['gflop']:.1f} | {row['gflop_per_s']:.1f} "
              f"| {row['c_over_this_latency']:.2f}x | {row['c_over_this_flops']:.2f}x |")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

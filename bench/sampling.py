"""Sampling latency per clip and its split, and the speed-up of the reference cache and batched guidance.

    python -m bench.sampling [--size tiny --resolution 32 --frames 9] [--device cpu] [--threads 1]

``--resolution`` is a side (``32``) or ``HxW`` (``16x32``), as ``sample.py --resolution``.

One run measures (networks of ``--size`` with random weights; speed does not depend on training):

1. latency of one image-to-video clip (1 given frame, guidance 2.5) for 1, 10, 25 and 50 DDIM steps, split
   into encode, planner (once per window), generator steps and decode;
2. at ``--compare-steps`` steps, the generator time of the naive loop (no cache, cond and null as two calls)
   against the cache alone, batched guidance alone and both, interleaved over ``--rounds`` rounds (medians), for
   image-to-video (1 of T given, guidance 2.5) and expansion (T//2 + 1 given, guidance 2.5), with the largest
   difference between the naive and the fast samples.

Writes ``bench/results/sampling.json`` and prints markdown tables. ``main(argv)`` is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mardini.autoencoders import SpaceToDepthAutoencoder
from mardini.data.transforms import as_size, planner_size
from mardini.masking import expansion_mask, image_to_video_mask
from mardini.models import build_generator, build_planner
from mardini.pipeline import MarDiniPipeline
from mardini.pipeline.inputs import parse_size

RESULT = Path("bench/results/sampling.json")
MODES = {"naive": (False, False), "cache": (True, False), "batched": (False, True), "cache+batched": (True, True)}


def build_pipeline(size: str, frames: int, device: str, bf16: bool, planner_resolution: int) -> MarDiniPipeline:
    """A pipeline of ``size`` networks with random (perturbed) weights on the exact pixel autoencoder."""
    torch.manual_seed(0)
    ae = SpaceToDepthAutoencoder(2)
    planner = build_planner(size, in_channels=ae.latent_channels)
    planner.drop_head()
    generator = build_generator(size, in_channels=ae.latent_channels)
    with torch.no_grad():  # non-zero adaLN outputs, so the samples (and their differences) mean something
        for p in generator.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return MarDiniPipeline(generator, ae, planner, planner_resolution=planner_resolution, window=frames,
                           device=device, dtype=torch.bfloat16 if bf16 else torch.float32)


def _clip(frames: int, res: int | tuple[int, int], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = as_size(res)
    video = torch.rand(1, frames, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (1, T, 3, H, W)
    return video, mask[None]


def latency(pipe, video, mask, steps: int, scale: float) -> dict:
    start = time.perf_counter()
    pipe.generate(video, mask, steps=steps, guidance_scale=scale, progress=False)
    total = time.perf_counter() - start
    split = {f"{k}_s": round(v, 4) for k, v in pipe.last_timings.items()}
    return {"steps": steps, "total_s": round(total, 4), **split,
            "generator_ms_per_step": round(1000 * pipe.last_timings["generator"] / steps, 2)}


def compare(pipe, video, mask, steps: int, scale: float, rounds: int) -> tuple[list[dict], float]:
    """Generator seconds per mode (median over interleaved rounds) and the naive-vs-fast largest difference."""
    times: dict[str, list[float]] = {m: [] for m in MODES}
    latents = {}
    for _ in range(rounds):
        for mode, (cache, batched) in MODES.items():
            pipe.use_cache, pipe.batched_guidance = cache, batched
            latents[mode] = pipe.generate_latents(video, mask, steps=steps, guidance_scale=scale, progress=False)[0]
            times[mode].append(pipe.last_timings["generator"])
    pipe.use_cache = pipe.batched_guidance = True
    base = statistics.median(times["naive"])
    rows = [{"mode": m, "generator_s": round(statistics.median(t), 4),
             "speedup_vs_naive": round(base / statistics.median(t), 3)} for m, t in times.items()]
    return rows, float((latents["naive"] - latents["cache+batched"]).abs().max())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--resolution", default="32", metavar="N|HxW", help="frame size in pixels: a side or HxW")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--planner-resolution", type=int, default=16)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 10, 25, 50])
    p.add_argument("--compare-steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--guidance", type=float, default=2.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1 is steadiest on a shared machine)")
    p.add_argument("--out", type=Path, default=RESULT)
    a = p.parse_args(argv)
    try:
        h, w = parse_size(a.resolution)
    except ValueError as err:
        p.error(str(err))
    resolution = h if h == w else [h, w]  # the config records a side for square frames, as before
    low_h, low_w = planner_size(h, w, a.planner_resolution)
    if a.threads:
        torch.set_num_threads(a.threads)
    started = time.perf_counter()
    pipe = build_pipeline(a.size, a.frames, a.device, a.bf16, a.planner_resolution)
    t = a.frames
    i2v = _clip(t, (h, w), image_to_video_mask(t, 0))
    pipe.generate(*i2v, steps=1, guidance_scale=a.guidance, progress=False)  # warm-up (kernels, RoPE tables)

    rows = [latency(pipe, *i2v, s, a.guidance) for s in a.steps]
    tasks = {"image_to_video": i2v, "expansion": _clip(t, (h, w), expansion_mask(t, t // 2 + 1))}
    speed = {}
    for name, (video, mask) in tasks.items():
        modes, diff = compare(pipe, video, mask, a.compare_steps, a.guidance, a.rounds)
        speed[name] = {"given": int((~mask).sum()), "frames": t, "steps": a.compare_steps, "modes": modes,
                       "max_abs_diff_naive_vs_fast": diff}
    result = {
        "command": f".venv/bin/python -m bench.sampling {' '.join(argv if argv is not None else sys.argv[1:])}".strip(),
        "config": {"size": a.size, "resolution": resolution, "frames": t, "planner_resolution": a.planner_resolution,
                   "guidance": a.guidance, "device": str(pipe.device), "dtype": str(pipe.dtype),
                   "generator_tokens": t * (h // 2) * (w // 2), "planner_tokens": t * (low_h // 2) * (low_w // 2)},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_avg_1min": os.getloadavg()[0],
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "latency_image_to_video": rows,
        "speedup": speed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(markdown(result))
    print(f"\nwrote {a.out} in {result['seconds']} s")
    return result


def markdown(r: dict) -> str:
    c = r["config"]
    h, w = as_size(c["resolution"])
    lines = [f"Sampling, {c['size']} at {h}x{w}, {c['frames']} frames, {c['device']} "
             f"({r['machine']['torch_threads']} thread(s)), image-to-video with guidance {c['guidance']}, one clip:", "",
             "| steps | total s | encode s | planner s | generator s | decode s | generator ms/step |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["latency_image_to_video"]:
        lines.append(f"| {x['steps']} | {x['total_s']:.3f} | {x['encode_s']:.4f} | {x['planner_s']:.3f} | "
                     f"{x['generator_s']:.3f} | {x['decode_s']:.4f} | {x['generator_ms_per_step']:.1f} |")
    for name, s in r["speedup"].items():
        lines += ["", f"{name} ({s['given']} of {s['frames']} frames given, {s['steps']} steps): generator time "
                  f"(max |naive - fast| = {s['max_abs_diff_naive_vs_fast']:.2e})", "",
                  "| mode | generator s | speed-up vs naive |", "|---|---:|---:|"]
        lines += [f"| {m['mode']} | {m['generator_s']:.3f} | {m['speedup_vs_naive']:.2f}x |" for m in s["modes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Growth: training-step time and peak memory against frames (9, 13, 17) and resolution, /ST and /T, plotted.

    .venv/bin/python -m bench.growth [--frames 9 13 17] [--sides 8 16] [--quick]

Joint training step (forward + backward + AdamW) of the ``tiny`` networks with patch 1 under bf16 autocast,
batch 1, latents fed directly (latent side = ``--sides``, planner at half the side). Each point runs in its own
subprocess: step time = best of ``--steps`` after a warm-up; memory = growth of the max RSS over the RSS after
building. Writes ``bench/results/growth.json`` and ``bench/results/growth.png`` (time and memory vs frames, one
line per side and attention mode).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import RESULTS, command, machine, timed, write_result

NAME = "growth"


def child(frames: int, side: int, attention: str, steps: int) -> dict:
    from mardini.lit.joint import MarDiniModule

    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", planner_resolution=side, keep_ratio=(0.15, 0.6),
                           generator={"attention": attention})
    opt = torch.optim.AdamW(module.networks.parameters(), lr=1e-4)
    c = module.autoencoder.latent_channels
    low = max(1, side // 2)
    batch = {"z_high": torch.randn(1, frames, c, side, side), "z_low": torch.randn(1, frames, c, low, low)}
    rss0 = _rss()

    def step(i: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.compute_loss(batch, module.step_generator(i), train=True).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    sec = min(timed(lambda: step(i + 1)) for i in range(steps))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"frames": frames, "side": side, "attention": attention, "tokens": frames * side * side,
            "step_s": sec, "peak_growth_mib": (peak - rss0) / 2**20}


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for side in sorted({r["side"] for r in rows}):
        for attn in sorted({r["attention"] for r in rows}):
            pts = sorted((r["frames"], r["step_s"], r["peak_growth_mib"]) for r in rows
                         if r["side"] == side and r["attention"] == attn)
            label = f"{side}x{side} latents, /{attn.upper()}"
            style = "-o" if attn == "st" else "--s"
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
    for ax, ylabel in zip(axes, ("training step (s)", "peak memory growth (MiB)")):
        ax.set_xlabel("frames")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("tiny networks, bf16 autocast, batch 1 (bench/growth.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[9, 13, 17])
    p.add_argument("--sides", type=int, nargs="+", default=[8, 16])
    p.add_argument("--attention", nargs="+", default=["st", "t"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.frames, a.sides, a.attention, a.steps = [3, 5], [4], ["st", "t"], 1
    if a.child:
        print(json.dumps(child(int(a.child[0]), int(a.child[1]), a.child[2], a.steps)))
        return {}
    rows = []
    for side in a.sides:
        for attn in a.attention:
            for frames in a.frames:
                args = ["--child", str(frames), str(side), attn, "--steps", str(a.steps)]
                out = subprocess.run([sys.executable, "-m", f"bench.{NAME}", *args], capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"growth point {frames}f {side} {attn} failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"  {side:3d}x{side:<3d} /{attn:2s} {frames:2d} frames: {r['step_s']:.3f} s, "
                      f"+{r['peak_growth_mib']:.0f} MiB", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = plot(rows, RESULTS / f"{NAME}.png")
    result = {"command": command(f"bench.{NAME}", argv), "settings": {k: v for k, v in vars(a).items() if k != "child"},
              "machine": machine(), "rows": rows, "plot": str(png)}
    path = write_result(NAME, result)
    print(f"wrote {path} and {png}")
    return result


if __name__ == "__main__":
    main()

"""Fig. 6c: the generator's training loss with and without identity attention, read back from TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import fmean, pstdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mardini.demo.curves import read_scalars, save_figure, smooth, window  # noqa: E402


def loss_summary(log_dir: Path) -> dict:
    """First/last loss of one run: means of the first and (with its standard error) the last 20 % of logged steps
    (one logged value alone is too noisy to compare runs by; the bias-corrected moving average starts at it), the
    relative drop, and the last validation loss."""
    train = read_scalars(log_dir, "train/loss")
    if not train:
        raise FileNotFoundError(f"no train/loss scalars under {log_dir}; did the run log (log_every_n_steps)?")
    steps, values = zip(*train)
    tail = window(list(values))
    first, last = fmean(window(list(values), head=True)), fmean(tail)
    val = read_scalars(log_dir, "val/loss")
    return {"steps": int(steps[-1]), "logged": len(values), "first": first, "last": last,
            "last_sem": pstdev(tail) / len(tail) ** 0.5 if len(tail) > 1 else float("nan"),
            "drop": 1.0 - last / first if first else float("nan"),
            "val_last": val[-1][1] if val else None, "train": list(train), "val": list(val)}


def plot_identity(runs: dict[str, dict], path: Path) -> Path:
    """Both loss curves on one axis (raw in light colour, smoothed solid, validation as dots)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for i, (label, s) in enumerate(runs.items()):
        steps, values = zip(*s["train"])
        ax.plot(steps, values, color=f"C{i}", alpha=0.25, lw=0.8)
        ax.plot(steps, smooth(list(values)), color=f"C{i}", lw=1.8, label=f"{label} (train, smoothed)")
        if s["val"]:
            ax.plot(*zip(*s["val"]), "o", color=f"C{i}", ms=4, label=f"{label} (val)")
    ax.set_xlabel("training step")
    ax.set_ylabel("masked v-loss")
    ax.set_yscale("log")
    ax.set_title("Generator warm-up with / without identity attention (Fig. 6c)", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_steps(fig6a: dict[str, dict], metrics: dict[str, list[str]], path: Path) -> Path:
    """Fig. 6a: one panel per (task, metric), the model against its DDIM step count, baselines as lines."""
    panels = [(task, m) for task in fig6a for m in metrics[task]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 2.8), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        res = fig6a[task]["results"]
        points = sorted((int(k.split("_")[1]), r[metric]) for k, r in res.items() if k.startswith("steps_"))
        finite = [(k, v) for k, v in points if math.isfinite(v)]  # NaN: e.g. no object found, nothing to place
        ax.plot(*(zip(*finite) if finite else ([], [])), "o-", color="C0", label="MarDini (joint)")
        for j, base in enumerate(b for b in res if not b.startswith("steps_")):
            if math.isfinite(res[base][metric]):
                ax.axhline(res[base][metric], color=f"C{j + 1}", ls="--", lw=1, label=base)
        ax.set_xscale("log")
        ax.set_xlim(points[0][0] / 1.5, points[-1][0] * 1.5)  # fixed, so a panel without finite values still draws
        ax.set_xticks([p[0] for p in points], [str(p[0]) for p in points])
        ax.set_xlabel("DDIM steps", fontsize=8)
        ax.set_title(f"{task}: {metric}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    return save_figure(fig, path)

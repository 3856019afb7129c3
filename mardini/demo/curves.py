"""Loss curves of a chain of stages, read back from their TensorBoard event files."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402


def register_bundled_fonts() -> list[str]:
    """Add the fonts matplotlib ships (``mpl-data/fonts/ttf``: DejaVu, STIX, Computer Modern) that its font list
    lacks; the paths added (none where the list is whole).

    matplotlib reads its font list from a per-user cache (``~/.cache/matplotlib/fontlist-v<N>.json``, or under
    ``MPLCONFIGDIR``), which any installation of the same cache version writes and trusts. One written without the
    bundled fonts (the demo machine's listed the system's DejaVu alone) left mathtext, which draws the log axes' tick
    labels (10^-1), without its STIX and Computer Modern fonts: the pictures step logged 21 lines ``findfont: Font
    family ['STIXGeneral'] not found. Falling back to DejaVu Sans.``. The figures are the same either way (the
    labels' glyphs are DejaVu Sans'), byte for byte."""
    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    known = {os.path.realpath(font.fname) for font in font_manager.fontManager.ttflist}
    missing = [path for path in sorted(font_manager.findSystemFonts([folder], fontext="ttf"))
               if os.path.realpath(path) not in known]
    for path in missing:
        font_manager.fontManager.addfont(path)  # also clears findfont's cache
    return missing


register_bundled_fonts()  # before any figure: mathtext looks its fonts up once


def read_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of one scalar tag in a TensorBoard log folder (empty when absent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_dir.is_dir():
        return []
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in events.Scalars(tag)]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style exponential moving average (bias-corrected)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def window(values: list[float], frac: float = 0.2, head: bool = False) -> list[float]:
    """The last (or, with ``head``, the first) ``frac`` of the values, at least one."""
    k = max(1, round(len(values) * frac))
    return values[:k] if head else values[-k:]


def plot_losses(stages: list[tuple[str, Path]], path: Path) -> dict[str, dict[str, float]]:
    """One panel per stage (train loss, smoothed, and val loss); returns per stage the mean train loss of the first
    20 % of logged steps and the last smoothed value."""
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.8), squeeze=False)
    summary: dict[str, dict[str, float]] = {}
    for ax, (name, log_dir) in zip(axes[0], stages):
        train = read_scalars(log_dir, "train/loss")
        val = read_scalars(log_dir, "val/loss")
        if train:
            steps, values = zip(*train)
            sm = smooth(list(values))
            ax.plot(steps, values, color="0.8", lw=0.8)
            ax.plot(steps, sm, color="C0", lw=1.5, label="train (smoothed)")
            head = window(list(values), head=True)  # not sm[0]: the smoothed curve starts at one raw value
            summary[name] = {"first": sum(head) / len(head), "last": sm[-1], "steps": steps[-1]}
        if val:
            ax.plot(*zip(*val), "o-", color="C3", ms=3, label="val")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yscale("log")
    axes[0][0].set_ylabel("masked loss", fontsize=8)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)
    return summary


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi, parent folders created) and close a matplotlib figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

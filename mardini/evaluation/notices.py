"""The notes ``evaluate.py`` prints and its report keeps: clips read at another rate than ``--fps``, FVD/FID from few
clips, and a checkpoint sampled at another size or rate than it trained at."""

from __future__ import annotations

import argparse
import re
from typing import Any

from mardini.evaluation.arguments import sample_resolution
from mardini.evaluation.protocol import eval_size, same_aspect, sides, size_text


FPS_TOLERANCE = 0.1  # a clip read at a rate this far (relative) from --fps is reported


def rates_read(rates: list[float], fps: float | None) -> dict[str, Any]:
    """``{min, max}`` of the rates the clips were read at, and ``off``: the count (and range) of those more than
    ``FPS_TOLERANCE`` from ``fps`` (none for the native rate)."""
    off = [r for r in rates if fps is not None and abs(r - fps) > FPS_TOLERANCE * fps]
    out: dict[str, Any] = {"min": round(min(rates), 3), "max": round(max(rates), 3), "off": len(off)}
    if off:
        out.update(off_min=round(min(off), 3), off_max=round(max(off), 3))
    return out


def rate_note(eff: dict[str, Any], fps: float | None, clips: int) -> str | None:
    """A note when clips were read more than 10 % away from ``--fps`` (None when none were)."""
    if not eff.get("off"):
        return None
    lo, hi = eff["off_min"], eff["off_max"]
    span = f"{lo:g} fps" if lo == hi else f"{lo:g}-{hi:g} fps"
    return (f"{eff['off']} of {clips} clips were read at {span}, more than {FPS_TOLERANCE:.0%} from --fps {fps:g} "
            "(a window takes every k-th source frame, k >= 1 a whole number: a source slower than --fps is read "
            "at its own rate); the metrics are of the rates read (report.json: fps_effective)")


SMALL_FRECHET_SAMPLE = 256  # clips below which a Fréchet distance gets a caveat in the report
FRECHET_KEY = re.compile(r"(fvd|fid)\d+_\d+f")  # the Fréchet metrics' result names: fvd{N}_{T}f[_pad], fid{N}_{T}f


def small_sample_note(report: dict[str, Any]) -> str | None:
    """A caveat for FVD/FID computed from few clips (None when there are none, or enough clips)."""
    results = [r for res in report["tasks"].values() for r in res["results"].values()]
    frechet = sorted({match[1] for r in results for k, v in r.items()
                      if v is not None and (match := FRECHET_KEY.match(k))})
    if not frechet or report["clips"] >= SMALL_FRECHET_SAMPLE:
        return None
    return (f"{' and '.join(m.upper() for m in frechet)} from {report['clips']} clips: a Fréchet distance is biased "
            "upward on small samples (the bias shrinks as the clips grow) and varies between draws, so compare methods "
            "only at the same number of clips and seed; --num-clips raises it")


def training_mismatch(pipe: Any, args: argparse.Namespace) -> list[str]:
    """Notes where the protocol samples the checkpoint at another resolution or frame rate than it trained at."""
    if pipe is None:
        return []
    notes = []
    trained = tuple(pipe.resolution) if pipe.resolution else None
    h, w = sides(sample_resolution(args, pipe))
    if trained and trained != (h, w):
        fix = "" if same_aspect(trained, (h, w)) else \
            f"; score at its aspect ratio to sample it at its own size (--resolution {size_text(eval_size(trained))})"
        notes.append(f"the checkpoint trained at {trained[0]}x{trained[1]} px, the protocol samples it at "
                     f"{h}x{w} (--sample-resolution){fix}")
    if pipe.fps and args.fps != pipe.fps:
        notes.append(f"the checkpoint trained on clips at {pipe.fps:g} fps, the protocol reads "
                     f"{'every frame (native rate)' if args.fps is None else f'{args.fps:g} fps'} (--fps)")
    return notes

"""``evaluate.py``'s report: ``report.md`` (a table per task) made from the report dict, and both report files
(``report.json``, ``report.md``) written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mardini.data.sharding import write_text_atomic
from mardini.evaluation.protocol import sides, size_text
from mardini.strict_json import dumps_strict


ARROWS = {"psnr": "↑", "ssim": "↑", "detected": "↑", "ratio": "(1 = true motion)"}  # everything else: lower is better


def _fmt(value: float | None) -> str:
    """A result for the table: ``–`` = not computed, ``NaN`` = computed and undefined (e.g. no object detected)."""
    if value is None:
        return "–"
    if math.isnan(value):
        return "NaN"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.2f}"


def _read_at(report: dict[str, Any]) -> str:
    """``; read at LO-HI`` where the clips were read at other rates than the asked --fps ('' otherwise)."""
    eff = report.get("fps_effective")
    if not eff or report.get("fps") is None or eff["min"] == eff["max"] == report["fps"]:
        return ""
    return f"; read at {eff['min']:g}" + ("" if eff["min"] == eff["max"] else f"-{eff['max']:g}")


def _timestamped(report: dict[str, Any]) -> str:
    """``; N read by timestamp`` where clips came from variable-frame-rate files ('' otherwise)."""
    n = report.get("timestamped")
    return f"; {n} variable-rate read by timestamp" if n else ""


def _sampled_at(report: dict[str, Any]) -> str:
    """``; the model sampled at S px, downscaled`` (or upscaled) where it sampled at another size than the
    protocol's ('' otherwise)."""
    size = report.get("sample_resolution")
    if size is None or sides(size) == sides(report["resolution"]):
        return ""
    (sh, sw), (rh, rw) = sides(size), sides(report["resolution"])
    return f"; the model sampled at {size_text(size)} px, {'down' if sh * sw > rh * rw else 'up'}scaled"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation on `{report['data']}`", "",
             f"{report['clips']} clips, {report['frames']} frames at {size_text(report['resolution'])} px"
             f"{_sampled_at(report)} "
             f"(fps: {report['fps'] or 'native'}{_read_at(report)}{_timestamped(report)}), seed {report['seed']}. "
             f"Command: `{report['command']}`", ""]
    if report.get("status") == "partial":
        asked = report.get("tasks_asked") or list(report["tasks"])
        lines += [f"**Partial report**: {len(report['tasks'])} of {len(asked)} tasks finished "
                  f"({', '.join(asked)}); the run is still going, or stopped before the rest.", ""]
    for notice in report.get("notices") or []:
        lines += [f"Note: {notice}.", ""]
    skipped = report.get("skipped_videos") or {}
    if skipped:  # the files left out of the N clips, and why (all of them in report.json)
        lines += [f"{len(skipped)} videos skipped (unusable):" if report.get("source") == "videos"
                  else "Skipped while reading the shards:", ""]
        lines += [f"- `{path}`: {why.splitlines()[0]}" for path, why in list(skipped.items())[:10]]
        lines += [f"- ... and {len(skipped) - 10} more (report.json)"] if len(skipped) > 10 else []
        lines.append("")
    for task, res in report["tasks"].items():
        names = sorted({k for r in res["results"].values() for k in r})
        head = [f"{n} {ARROWS.get(n.split('_')[-1], '↓')}" for n in names]
        lines += [f"## {task}", "", "| method | " + " | ".join(head) + " | s/clip |",
                  "|---" * (len(names) + 2) + "|"]
        for method, r in res["results"].items():
            per_clip = res["seconds_per_clip"].get(method)  # none for an external method (--generated)
            row = [_fmt(r.get(n)) for n in names] + ["–" if per_clip is None else f"{per_clip:.3f}"]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        for metric, why in res["skipped_metrics"].items():
            lines.append(f"\n- `{metric}` left out: {why.splitlines()[0]}")
        lines.append(f"\nReal statistics: {res['real_stats_cache']}. Guidance {res['protocol']['guidance_scale']}, "
                     f"{res['protocol']['steps']} DDIM steps, eta {res['protocol'].get('eta', 0.0)}"
                     f"{', raw weights (--no-ema)' if report.get('weights_sampled') == 'raw' else ''} (model only).\n")
    lines.append("Metrics: FVD/FID lower is better; MidF = frame T//2; traj = colour-centroid position error of "
                 "the synthetic objects in generated frames (pixels, fraction of the frame; detected = share found).")
    if report.get("generated"):
        lines.append("External methods (" + ", ".join(f"{m}: `{d}`" for m, d in report["generated"].items())
                     + ") are scored on their frames read from those folders, the given frames being the real ones; "
                     "their s/clip is not measured here.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``out/report.json`` and ``out/report.md``, each replaced atomically (a crash leaves the last whole one).

    The JSON is strict (no ``NaN``/``Infinity``, which many parsers refuse): a non-finite result is written as null,
    and a notice in report.json names each one (report.md shows them as they are)."""
    write_text_atomic(out / "report.json", dumps_strict(report))
    write_text_atomic(out / "report.md", markdown(report))

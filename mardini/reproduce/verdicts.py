"""Agree / disagree with the paper, computed from the measured numbers (no result is written in by hand).

Each function returns rows ``{"claim", "verdict", "detail"}``; ``verdict`` is ``agrees``, ``disagrees``,
``mixed (k of n)`` or ``inconclusive (why)``. The criteria are stated in the returned detail and in the report.
"""

from __future__ import annotations

import math

HEADLINE = ("midf_psnr", "midf_ssim", "traj_err_px", "traj_detected")  # + fvd*/fid* when the weights exist
NEAR_OPTIMAL = 0.1  # a step count is "near-optimal" within this fraction of the worst-to-best spread of the sweep
INFERRED = "[inferred: PAPER.md §6 item 4 says only 'near-optimal with few steps']"  # a claim read into the paper
MIN_DETECTED = 0.05  # traj_err_px (mean over detected objects only) is scored only where this many are detected
# How far a metric moved when the tiny chain was trained again with nothing but its bf16 rounding changed
# (STUDIES.md, "Four more levers": objects found 0.04, PSNR 0.03 dB, SSIM 0.001 on interpolation): Table 2's
# differences within it are no evidence. traj_err_px has no measured spread (the objects it averages over change).
RERUN_SPREAD = {"midf_psnr": 0.03, "midf_ssim": 0.001, "traj_detected": 0.04}
CRITERIA = (f"A metric counts as evidence only where its values differ and are defined: ties, NaN (e.g. no object "
            f"found), values flat across a sweep, Table 2's differences no larger than a rerun's (objects found "
            f"{RERUN_SPREAD['traj_detected']:g}, PSNR {RERUN_SPREAD['midf_psnr']:g} dB, SSIM "
            f"{RERUN_SPREAD['midf_ssim']:g}: the tiny chain retrained with only its bf16 rounding changed), and "
            f"`traj_err_px` where a detection rate behind it is below "
            f"{MIN_DETECTED:.0%} are listed but not scored. `traj_detected` (how many objects are found) and "
            f"`traj_err_px` (how far off the found ones are) then count as separate evidence; a missing error no "
            f"longer counts again what `traj_detected` already says. With no metric left the verdict is "
            f"inconclusive.")


def higher_is_better(metric: str) -> bool:
    return metric.split("_")[-1] in ("psnr", "ssim", "detected")


def headline_metrics(results: dict[str, dict]) -> list[str]:
    """The metrics every method has, in report order (``traj_err_frac`` repeats ``traj_err_px``); none without
    results."""
    if not results:
        return []
    common = set.intersection(*(set(r) for r in results.values()))
    extra = sorted(m for m in common if m.startswith(("fvd", "fid")))
    return [m for m in HEADLINE if m in common] + extra


def skip_reason(metric: str, a: float, b: float, det_a: float | None = None, det_b: float | None = None,
                spread: dict[str, float] | None = None) -> str:
    """Why ``a`` vs ``b`` on ``metric`` is no evidence (``""`` when it is): undefined, tied, too few detections, or
    (with ``spread``, e.g. :data:`RERUN_SPREAD`) a difference no larger than a rerun's for that metric.

    ``det_a``/``det_b``: the detection rates behind a ``traj_err_px`` (an average over detected objects only)."""
    if math.isnan(a) or math.isnan(b):
        return "undefined (NaN)"
    if metric == "traj_err_px" and det_a is not None and det_b is not None and min(det_a, det_b) < MIN_DETECTED:
        return f"detection below {MIN_DETECTED:.0%}"
    if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
        return "tied"
    if spread and metric in spread and abs(a - b) <= spread[metric]:
        return f"within a rerun's spread ({spread[metric]:g})"
    return ""


def task_metrics(task: str, results: dict[str, dict]) -> list[str]:
    """:func:`headline_metrics` of ``task``'s families in the protocol (``DEFAULT_METRICS``: MidF is interpolation's);
    Fig. 6a's plot and verdict both use this list."""
    from mardini.evaluation.protocol import DEFAULT_METRICS

    families = DEFAULT_METRICS.get(task)
    return [m for m in headline_metrics(results) if families is None or m.split("_")[0] in families]


def better(metric: str, a: float, b: float) -> bool:
    """``a`` strictly better than ``b`` on ``metric`` (both defined: see :func:`skip_reason`)."""
    return a > b if higher_is_better(metric) else a < b


def _count(holds: list[bool], skipped: str = "") -> str:
    k, n = sum(holds), len(holds)
    if not n:
        return f"inconclusive (no metric separates them{': ' + skipped if skipped else ''})"
    return "agrees" if k == n else "disagrees" if k == 0 else f"mixed ({k} of {n} metrics)"


def _steps(steps: dict[str, dict[str, int]] | None, method: str) -> str:
    got = (steps or {}).get(method)
    return f"{method} " + ", ".join(f"{n} {k}" for n, k in got.items()) if got else ""


def table2(results: dict[str, dict], steps: dict[str, dict[str, int]] | None = None) -> list[dict]:
    """PAPER.md Table 2: MAR + DM beats DM only, MAR + DM beats MAR only, DM only beats MAR only.

    A metric that :func:`skip_reason` rejects is listed but not counted. Where the joint model's generator with the
    null plan was scored, it alone decides "MAR + DM beats DM only": the generator warm-up had fewer training steps,
    so its gap to MAR + DM mixes the planner's effect with extra training. ``steps``: ``{method: {network: training
    steps}}`` (``quality.table2_steps``), shown in the details."""
    metrics = headline_metrics(results)
    rows = []
    for a, b, claim in (("mar_dm", "dm_only", "MAR + DM beats DM only (generator warm-up)"),
                        ("mar_dm", "dm_only_null_plan", "MAR + DM beats DM only (joint DM, null plan)"),
                        ("mar_dm", "mar_only", "MAR + DM beats MAR only"),
                        ("dm_only", "mar_only", "DM only beats MAR only")):
        if a not in results or b not in results:
            continue
        ra, rb = results[a], results[b]
        holds, parts, skipped = [], [], []
        for m in metrics:
            why = skip_reason(m, ra[m], rb[m], ra.get("traj_detected"), rb.get("traj_detected"), RERUN_SPREAD)
            parts.append(f"{m} {ra[m]:.4g} vs {rb[m]:.4g}" + (f" (not scored: {why})" if why else ""))
            if why:
                skipped.append(m)
            else:
                holds.append(better(m, ra[m], rb[m]))
        verdict = _count(holds, ", ".join(skipped) + " not scored" if skipped else "")
        budget = "; ".join(x for x in (_steps(steps, a), _steps(steps, b)) if x)
        detail = ", ".join(parts) + (f"; training steps: {budget}" if budget else "")
        if b == "dm_only" and a == "mar_dm" and "dm_only_null_plan" in results:
            detail = f"on its own: {verdict}; {detail}"
            verdict = "not scored (a less trained DM: the null-plan row decides)"
        rows.append({"claim": claim, "verdict": verdict, "detail": detail})
    return rows


def near_optimal_step(points: list[tuple[int, float]], metric: str) -> tuple[int, float]:
    """Smallest step count within ``NEAR_OPTIMAL`` of the worst-to-best spread of the best value; the spread.

    A step whose value is missing (NaN) is never near-optimal; fewer than two finite values, or values that do not
    vary (flat: every step count ties), give ``-1`` (no evidence)."""
    points = [(k, v) for k, v in points if not math.isnan(v)]
    if len(points) < 2:
        return -1, float("nan")
    values = [v for _, v in points]
    best = max(values) if higher_is_better(metric) else min(values)
    spread = max(values) - min(values)
    if math.isclose(max(values), min(values), rel_tol=1e-9, abs_tol=1e-12):
        return -1, spread
    for k, v in sorted(points):
        if abs(v - best) <= NEAR_OPTIMAL * spread + 1e-12:
            return k, spread
    return sorted(points)[-1][0], spread


def fig6a(fig: dict[str, dict]) -> list[dict]:
    """PAPER.md Fig. 6a: near-optimal with few steps (<= 25); a single step is not enough [inferred].

    A metric is scored only where every step count has a defined value (``traj_err_px``: a detection rate of at
    least ``MIN_DETECTED`` at that step) and the values are not flat."""
    rows = []
    for task, res in fig.items():
        steps = {int(k.split("_")[1]): r for k, r in res["results"].items() if k.startswith("steps_")}
        metrics = task_metrics(task, {f"s{k}": r for k, r in steps.items()})
        few, one = [], []
        parts = []
        for m in metrics:
            points = [(k, r[m]) for k, r in sorted(steps.items())]
            shown = f"{m}: " + ", ".join(f"{k}: {v:.4g}" for k, v in points)
            low = [k for k, r in sorted(steps.items()) if m == "traj_err_px" and r.get("traj_detected", 1.0)
                   < MIN_DETECTED]
            if any(math.isnan(v) for _, v in points) or low:
                parts.append(shown + " -> not scored (" + ("undefined (NaN) at some step count" if any(
                    math.isnan(v) for _, v in points) else f"detection below {MIN_DETECTED:.0%} at {low}") + ")")
                continue
            k_opt, spread = near_optimal_step(points, m)
            if k_opt < 0:
                parts.append(shown + (" -> not scored (flat)" if len(points) > 1 else
                                      " -> not scored (fewer than 2 step counts)"))
                continue
            few.append(0 < k_opt <= 25)
            one.append(k_opt > min(steps))
            parts.append(shown + f" -> near-optimal at {k_opt}")
        rows.append({"claim": f"{task}: near-optimal with few (<= 25) DDIM steps", "verdict": _count(few),
                     "detail": "; ".join(parts)})
        rows.append({"claim": f"{task}: one step is not enough (worse than the best by > {NEAR_OPTIMAL:.0%} of the "
                              f"sweep's spread) {INFERRED}", "verdict": _count(one), "detail": "see the row above"})
    return rows


def fig6c(on: dict, off: dict) -> list[dict]:
    """PAPER.md Fig. 6c: with identity attention the loss falls; without it the loss does not converge."""
    sem = math.hypot(on["last_sem"], off["last_sem"]) if not math.isnan(on["last_sem"] + off["last_sem"]) else 0.0
    lower = off["last"] - on["last"] > 2 * sem
    stalls = off["drop"] < 0.5 * on["drop"]
    rows = [
        {"claim": "with identity attention the loss falls", "verdict": "agrees" if on["drop"] > 0 else "disagrees",
         "detail": f"first {on['first']:.4f} -> last {on['last']:.4f} (drop {on['drop']:.1%})"},
        {"claim": "without identity attention the loss ends higher (beyond 2 standard errors)",
         "verdict": "agrees" if lower else "disagrees",
         "detail": f"last {off['last']:.4f} ± {off['last_sem']:.4f} without vs {on['last']:.4f} ± "
                   f"{on['last_sem']:.4f} with; val {_f(off['val_last'])} vs {_f(on['val_last'])}"},
        {"claim": "without identity attention the loss does not converge (falls < half as much)",
         "verdict": ("agrees" if stalls else "disagrees") if on["drop"] > 0 else
         "inconclusive (the loss did not fall with identity attention either)",
         "detail": f"drop {off['drop']:.1%} without vs {on['drop']:.1%} with"},
    ]
    return rows


def _f(x) -> str:
    return "–" if x is None else f"{x:.4f}"


RANGES = {"latency": ("latency_s", "latency_min_s", "latency_max_s", "timing"),
          "memory": ("peak_growth_mib", "memory_growth_min_mib", "memory_growth_max_mib", "memory measurement")}


def _order(x: dict, y: dict, lo: str, hi: str) -> str:
    """``<`` / ``>`` when every round of ``x`` is below / above every round of ``y`` (``lo``/``hi``: the rows' min
    and max over the rounds), else ``~`` (overlap)."""
    if x[hi] < y[lo]:
        return "<"
    return ">" if x[lo] > y[hi] else "~"


def _ordering_verdict(v: dict[str, dict], what: str) -> str:
    """a < b < c in ``what`` (``latency``, ``memory``) counted only where the rounds' ranges do not overlap (a
    single round has no spread)."""
    _, lo, hi, one = RANGES[what]
    if min(v[k].get("rounds", 1) for k in "abc") < 2 or not all(lo in v[k] for k in "abc"):
        return f"inconclusive (one {one} per variant: no spread)"
    ab, bc, ac = (_order(v[x], v[y], lo, hi) for x, y in ("ab", "bc", "ac"))
    if ab == bc == "<":
        return "agrees"
    if ac == ">":
        return "disagrees"
    if ac == "<" and ">" in (ab, bc):
        return "mixed"
    return f"inconclusive (the rounds' {what} ranges overlap)"


def _spread(v: dict[str, dict], what: str, fmt: str) -> str:
    """``median (min-max)`` of a / b / c over the rounds."""
    med, lo, hi, _ = RANGES[what]
    return " / ".join(f"{v[k][med]:{fmt}} ({v[k].get(lo, v[k][med]):{fmt}}-{v[k].get(hi, v[k][med]):{fmt}})"
                      for k in "abc")


def table3(table: list[dict]) -> list[dict]:
    """PAPER.md Table 3: the asymmetric design (a) is the fastest and lightest, full-res planner (c) the heaviest.

    Latency and memory alike: one variant is below another only where its largest round is below the other's
    smallest round (noise, e.g. a shared CPU's outliers, makes the ranges overlap: inconclusive)."""
    rows = []
    for frames in sorted({r["frames"] for r in table}):
        v = {r["variant"]: r for r in table if r["frames"] == frames}
        lat = [v[k]["latency_s"] for k in "abc"]
        rounds = f"over {v['a'].get('rounds', 1)} rounds"
        rows.append({"claim": f"{frames} frames: latency a < b < c (slowest round beats the fastest round)",
                     "verdict": _ordering_verdict(v, "latency"),
                     "detail": f"a/b/c median (min-max) {rounds}: {_spread(v, 'latency', '.2f')} s; "
                               f"c/a {lat[2] / lat[0]:.1f}x"})
        rows.append({"claim": f"{frames} frames: peak memory growth a < b < c (largest round below the smallest "
                              f"round)", "verdict": _ordering_verdict(v, "memory"),
                     "detail": f"a/b/c median (min-max) {rounds}: {_spread(v, 'memory', '.1f')} MiB"})
    return rows

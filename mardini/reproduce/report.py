"""``report.md`` of ``make reproduce``: per analysis the paper's claim, the toy numbers, a plot and the verdict."""

from __future__ import annotations

import math
from pathlib import Path

from mardini.reproduce.verdicts import CRITERIA, headline_metrics, higher_is_better

CAVEATS = (
    "Toy scale: the `tiny` networks ({params}) on 32 px synthetic clips, trained for minutes to "
    "hours on CPU, against 1-3 B parameter models trained on 34 M videos. The paper's quality numbers are FVD on "
    "VIDIM-Bench; here the synthetic protocol's MidF-PSNR/SSIM and trajectory error are used (FVD/FID too when "
    "`make weights` has fetched the metric networks). Read the verdicts as 'does the toy reproduce the direction "
    "of the effect', not as a check of the paper's numbers."
)


def _f(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def _arrow(metric: str) -> str:
    return "↑" if higher_is_better(metric) else "↓"


def metric_table(results: dict[str, dict], labels: dict[str, str] | None = None) -> list[str]:
    metrics = headline_metrics(results)
    lines = ["| method | " + " | ".join(f"{m} {_arrow(m)}" for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {(labels or {}).get(name, name)} | " + " | ".join(_f(r.get(m)) for m in metrics) + " |")
    return lines


def verdict_lines(rows: list[dict]) -> list[str]:
    out = ["| claim (paper, or [inferred] from it) | toy result | numbers |", "|---|---|---|"]
    out += [f"| {r['claim']} | **{r['verdict']}** | {r['detail']} |" for r in rows]
    return out


TABLE3_SETTINGS = ("frames", "steps", "rounds", "full_warmup", "side", "low", "scale", "threads", "device")

TABLE2_LABELS = {"mar_only": "MAR only (planner warm-up + projection head)",
                 "dm_only": "DM only (generator warm-up, 9 frames)",
                 "dm_only_null_plan": "DM only (joint model's DM, null plan)",
                 "mar_dm": "MAR + DM (joint checkpoint)"}


def _steps_note(steps: dict | None) -> list[str]:
    """Table 2's training budgets (``quality.table2_steps``) and which 'DM only' row decides, as report lines."""
    if not steps:
        return []
    each = "; ".join(f"{TABLE2_LABELS.get(m, m)}: " + ", ".join(f"{n} {k}" for n, k in nets.items())
                     for m, nets in steps.items())
    return [f"Training steps (the chain checkpoints' `global_step`, summed over the stages each network trained in): "
            f"{each}. A 'DM only' generator with other training steps than the joint model's mixes the planner's "
            "effect with the training difference: where the null-plan row exists (the joint model's own generator), "
            "it alone decides 'MAR + DM beats DM only'."]


def write_report(out: Path, info: dict, results: dict, verdicts: dict, pictures: dict) -> Path:
    """Write ``out/report.md``; ``results``/``verdicts`` keyed by analysis (only those that ran)."""
    lines = [f"# MarDini toy reproduction of the paper's analyses ({info['mode']} mode)", "",
             f"Command: `{info['command']}`. Machine: {info['machine']}. Total {info['total_s'] / 60:.1f} min.", "",
             CAVEATS.format(params=info['params']), "",
             *(["**Quick mode: tiny step counts and a few clips, to check that everything runs; its numbers and "
                "verdicts mean nothing.**", ""] if info["mode"] == "quick" else []),
             "## Summary", "", "| analysis | claim (paper, or [inferred] from it) | toy result |", "|---|---|---|"]
    for name, rows in verdicts.items():
        lines += [f"| {name} | {r['claim']} | **{r['verdict']}** |" for r in rows]
    lines.append("")

    if "table2" in results:
        r = results["table2"]
        lines += ["## Table 2: planner only vs generator only vs both (interpolation)", "",
                  "Paper (VIDIM-Bench FVD, lower is better): MAR-3B alone 373.03 (DAVIS), DM-0.3B alone 320.89, "
                  "MAR-3B + DM 102.87, so both networks are needed.", "",
                  f"Toy: {r['clips']} held-out clips, first and last of 9 frames given, {info['table2_steps']} DDIM "
                  f"steps, no guidance. Checkpoints: {info['checkpoints']}.", "",
                  *metric_table(r["results"], TABLE2_LABELS), "", *verdict_lines(verdicts["Table 2"]), "",
                  "Notes: 'MAR only' decodes the planner warm-up's projection head at the planner's 16 px and "
                  "upsamples it (the tiny planner warm-up trains on 9 frames with 15-60 % kept and the task "
                  "templates, interpolation among them). The paper does not say which 'DM only' it used: both readings "
                  "are scored. `traj_err_px` counts only detected objects: read it with `traj_detected`. "
                  + CRITERIA, "", *_steps_note(r.get("training_steps")), ""]
    if "fig6a" in results:
        lines += ["## Fig. 6a: quality against DDIM steps (joint checkpoint)", "",
                  "Paper: FVD on DAVIS-7 / UCF101-7 at 1, 10, 25, 50, 100 steps is near-optimal with few steps "
                  "(curve values not given in the text).", "", f"![steps]({pictures['fig6a'].name})", ""]
        for task, res in results["fig6a"].items():
            lines += [f"### {task} ({res['clips']} clips, guidance {res['protocol']['guidance_scale']})", "",
                      *metric_table(res["results"]), ""]
        lines += [*verdict_lines(verdicts["Fig. 6a"]), "",
                  "Criterion: a step count is near-optimal when its value is within 10 % of the sweep's "
                  "worst-to-best spread of the best value. MidF-PSNR/SSIM reward blur (PAPER.md App. A), so a "
                  "one-step (mean-like) sample can score well on them while `traj_detected` falls. " + CRITERIA,
                  ""]
    if "fig6c" in results:
        c = results["fig6c"]
        lines += ["## Fig. 6c: generator loss with and without identity attention", "",
                  "Paper: over the DM's first 10k steps the loss does not converge without identity attention and "
                  "falls smoothly with it.", "",
                  f"Toy: the generator warm-up (`configs/tiny/01_dm_warmup_4f.yaml`) trained twice for "
                  f"{c['steps']} steps, same seed, data, masks and noise; only "
                  "`model.init_args.generator.identity_attention` differs.", "", f"![loss]({pictures['fig6c'].name})",
                  "", "| run | first 20 % mean | last 20 % mean | drop | last val |", "|---|---|---|---|---|"]
        for k in ("on", "off"):
            s = c[k]
            lines.append(f"| identity attention {k} | {_f(s['first'])} | {_f(s['last'])} ± {_f(s['last_sem'])} | "
                         f"{s['drop']:.1%} | {_f(s['val_last'])} |")
        lines += ["", *verdict_lines(verdicts["Fig. 6c"]), ""]
    if "table3" in results:
        t = results["table3"]
        lines += ["## Table 3: efficiency of the asymmetric design (from `bench.asymmetric`)", "",
                  "Paper (A100, bf16, 25 steps, 512², 13 frames): MarDini (low-res planner, /T generator) 6.05 s / "
                  "42.57 GB; low-res planner with /ST generator 34.58 s / 62.51 GB; planner at full resolution out "
                  "of memory (9 frames: 25.09 s / 74.44 GB vs 17.91 s / 41.03 GB).", "",
                  f"Toy: `{t['command']}` (its docstring gives the scaled setting), CPU, parameters "
                  f"{t['params_M']}; memory is what a sampling call after the timed one adds to the resident set "
                  "at its peak (one-time allocations of the first call not counted).", "",
                  "Toy settings: " + ", ".join(f"{k} {t['settings'][k]}" for k in TABLE3_SETTINGS
                                               if k in t["settings"]) + ". Each variant runs once per round in "
                  "its own process, rounds interleaved, timed after a warm-up call as long as the timed one; "
                  "latency and memory are medians over the rounds (min-max in brackets).", "",
                  "| frames | variant | latency s (min-max) | planner s | generator s | peak RSS growth MiB (min-max) "
                  "| (c) latency / this |",
                  "|---|---|---|---|---|---|---|"]
        for row in t["table"]:
            span = f" ({row['latency_min_s']:.2f}-{row['latency_max_s']:.2f})" if "latency_min_s" in row else ""
            mem = (f" ({row['memory_growth_min_mib']:.1f}-{row['memory_growth_max_mib']:.1f})"
                   if "memory_growth_min_mib" in row else "")
            lines.append(f"| {row['frames']} | {row['label']} | {row['latency_s']:.2f}{span} | "
                         f"{row['planner_s']:.2f} | {row['generator_s']:.2f} | {row['peak_growth_mib']:.1f}{mem} | "
                         f"{row['c_over_this_latency']:.2f}x |")
        lines += ["", *verdict_lines(verdicts["Table 3"]), ""]
    lines += ["## Settings", "", "```", *(f"{k}: {v}" for k, v in info["settings"].items()), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path

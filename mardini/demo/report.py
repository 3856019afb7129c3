"""``outputs/demo/report.md``: settings, time per stage, the metric table, the verdict, pictures, loss curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# metric -> True when higher is better; the verdict compares the model with every baseline on these
CLAIMS = {
    "interpolation": {"midf_psnr": True, "midf_ssim": True, "traj_err_all_px": False},
    "image_to_video": {"traj_err_all_px": False, "traj_motion_ratio": True},
}


def _number(v: Any) -> Any:
    """A result read from report.json, where a non-finite one is null (strict JSON has no NaN): None as NaN."""
    return float("nan") if v is None else v


def _fmt(v: Any) -> str:
    v = _number(v)
    if isinstance(v, float):
        return "–" if math.isnan(v) else (f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}")
    return str(v)


def verdict(tasks: dict[str, Any]) -> list[tuple[str, str, bool, str]]:
    """``(task, metric, model beats every baseline, detail)`` for each claim the demo checks."""
    rows = []
    for task, claims in CLAIMS.items():
        results = tasks.get(task, {}).get("results", {})
        model = results.get("mardini")
        if model is None:
            continue
        for metric, higher in claims.items():
            if metric not in model:
                continue
            others = {m: _number(r[metric]) for m, r in results.items() if m != "mardini" and metric in r}
            mine = _number(model[metric])  # NaN (undefined, e.g. no object found) beats nothing
            ok = all((mine > v) if higher else (mine < v) for v in others.values())
            detail = f"MarDini {_fmt(model[metric])} vs " + ", ".join(f"{m} {_fmt(v)}" for m, v in others.items())
            rows.append((task, metric, ok, detail))
    return rows


def stage_table(stages: list) -> list[str]:
    from mardini.configs_table import kept_fraction

    lines = ["| stage | module | steps | frames | kept fraction | batch | lr | training time | |", "|---" * 9 + "|"]
    for s in stages:
        m = s.settings["model"]["init_args"]
        d = s.settings["data"]["init_args"]
        kept = kept_fraction(m, s.settings["trainer"].get("callbacks"))  # where the curriculum takes it, too
        lines.append(
            f"| {s.name} | {s.kind} | {s.steps} | {m.get('frames', d.get('frames'))} | {kept} | "
            f"{d.get('batch_size')} | {m.get('lr')} | {s.seconds:.0f} s | {'reused' if s.reused else 'trained'} |"
        )
    return lines


def write_report(out: Path, info: dict[str, Any], stages: list, evaluation: dict[str, Any],
                 pictures: dict[str, list[str]], losses: dict[str, dict[str, float]]) -> Path:
    """Write ``report.md`` under ``out`` (paths relative to it) and return its path."""
    rel = lambda p: str(Path(p).resolve().relative_to(out.resolve()))  # noqa: E731
    lines = ["# MarDini demo: the tiny curriculum on the synthetic set", "",
             f"Command: `{info['command']}`. Machine: {info['machine']}. Total {info['total_s'] / 60:.1f} min "
             f"(training {info['train_s'] / 60:.1f} min, evaluation {info['eval_s'] / 60:.1f} min).", "",
             "## Training chain", "", *stage_table(stages), "",
             "Training time: the seconds each stage's checkpoint records, from the start of its training to its last "
             "checkpoint with validations and checkpoints, every resume added (a reused stage's from when it was "
             "trained); each run's start-up is left out.", "",
             f"Model: size `tiny` (planner {info['params']['planner'] / 1e6:.2f} M, generator "
             f"{info['params']['generator'] / 1e6:.2f} M parameters), space-to-depth autoencoder, "
             f"{info['resolution']} px clips of {info['frames']} frames at {info['fps']:g} fps, planner at "
             f"{info['planner_resolution']} px. Configs: `configs/tiny/`.", "",
             "![loss curves](loss_curves.png)", "",
             "| stage | loss at start (mean of the first 20 % logged) | at end (smoothed) |", "|---|---|---|"]
    for name, v in losses.items():
        lines.append(f"| {name} | {v['first']:.4f} | {v['last']:.4f} |")
    sampler = f"{evaluation['steps']} DDIM steps, eta {evaluation.get('eta', 0.0)}"
    lines += ["", f"## Evaluation ({evaluation['clips']} held-out clips, {sampler})", ""]
    for task, res in evaluation["tasks"].items():
        names = sorted({k for r in res["results"].values() for k in r})
        lines += [f"### {task}", "", "| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for method, r in res["results"].items():
            lines.append(f"| {method} | " + " | ".join(_fmt(r.get(n, float('nan'))) for n in names) + " |")
        lines.append("")
    lines += ["### Does the model beat the baselines?", "", "| task | metric | beats every baseline | figures |",
              "|---|---|---|---|"]
    checks = verdict(evaluation["tasks"])
    for task, metric, ok, detail in checks:
        lines.append(f"| {task} | {metric} | {'yes' if ok else '**no**'} | {detail} |")
    if not all(ok for *_, ok, _ in checks):
        lines += ["", "Where a check fails, the tiny model is short of training steps rather than parameters "
                  "(STUDIES.md, \"Capacity or steps?\"): `python -m mardini.demo --final-steps N` lengthens "
                  f"the last stage (this run's had {stages[-1].steps} steps; with the configs' 1300, three times as "
                  "many found about twice the objects). On a GPU, `configs/tiny/gpu/batch128.yaml` trains the last "
                  "stage at batch 128 (STUDIES.md, \"The last stage on a GPU\": 4130 steps on one H100 found two "
                  "thirds of the objects, with gains per doubling that shrink, and lost mostly the small ones: "
                  "\"Which objects are lost\")."]
    lines += ["", "PSNR/SSIM on the middle frame (higher is better); `traj_err_px`: distance in pixels between the "
              "colour centroid of each object in the generated frames and its true position (lower is better; "
              "`traj_detected` is the share of objects found; `traj_err_all_px` also counts every object that was not found "
              "as a random guess, 0.52 of the frame side, and is the trajectory figure the verdict uses). "
              "`traj_motion_ratio`: how far the found objects are from their place in the nearest given frame, "
              "relative to the truth (0 frozen, 1 as far as the truth, any direction): from one given frame the "
              "direction cannot be known, so a frozen copy has the smallest expected image-to-video error and the "
              "ratio says whether the objects move at all. Baselines: `linear_blend` (cross-fade of the given "
              "frames) and `nearest_frame` (repeat the closest given frame).", ""]
    if evaluation.get("found_by_gap"):
        from mardini.evaluation.found_by_gap import markdown

        lines += ["### Where are the objects lost? (interpolation)", "",
                  "The trajectory metric split by each generated frame's distance from the nearest given one "
                  "(`python -m mardini.evaluation.found_by_gap`: the clips and seeds of the table above, so the "
                  "model's found share over all gaps is its interpolation `traj_detected`): "
                  "objects lost next to a given frame, where a copy of it finds them, are objects the model cannot "
                  "yet draw from noise; objects lost only further away are a motion problem.", "",
                  markdown(evaluation["found_by_gap"]), ""]
    if evaluation.get("found_by_size"):
        from mardini.evaluation.found_by_gap import size_markdown

        lines += ["The share found split once more by each object's area in the real frame (pixels of its colour; "
                  "`--by-size`): a model that loses objects of every size is short of training; one that loses only "
                  "the small ones cannot tell where they are at high noise (the planner sees 16-px frames, in which "
                  "they blur away; STUDIES.md, \"Which objects are lost\").", "",
                  size_markdown(evaluation["found_by_size"]), ""]
    if evaluation.get("skipped"):
        lines += [f"- {m}: {why}" for m, why in evaluation["skipped"].items()] + [""]
    lines += ["## Samples", "", "Rows per clip: ground truth, the baselines, MarDini; given frames framed in green.", ""]
    for task, files in pictures.items():
        lines += [f"### {task}", "", f"![{task}]({rel(files[0])})", "",
                  "Side by side (truth | model): " + ", ".join(f"[{Path(f).name}]({rel(f)})" for f in files[1:]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

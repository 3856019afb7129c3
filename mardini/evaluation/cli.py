"""``python evaluate.py``'s main loop: the run set up, each task run and saved, the report written (``main``; the
command's usage, its ``--help``, is ``arguments.py``'s docstring). Its pieces live beside it: ``arguments``
(the options), ``clip_choice`` (the N clips), ``run_setup`` (weights, samplers, device, output folder),
``task_run`` (one task, every method), ``sample_checks`` (checks on the clips and samples), ``notices`` (the
report's notes), ``report_markdown`` (report.md, report.json) and ``export_run`` (``--export-inputs``)."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import torch

import mardini
from mardini import run_info
from mardini.evaluation.arguments import PRESETS, parse_args, sample_resolution
from mardini.evaluation.clip_choice import capped_note, choose_num_clips
from mardini.evaluation.data import resolve_source
from mardini.evaluation.export_run import export_inputs
from mardini.evaluation.external import ClipNames
from mardini.evaluation.notices import SMALL_FRECHET_SAMPLE, rate_note, small_sample_note, training_mismatch
from mardini.evaluation.report_markdown import ARROWS, markdown, write_report
from mardini.evaluation.resume import RunState, run_settings
from mardini.evaluation.run_setup import (build_samplers, checkpoint_file, command_words, data_path, default_out,
                                          device_name, device_of, metric_weights)
from mardini.evaluation.sample_checks import check_finite
from mardini.evaluation.samplers import BASELINES
from mardini.evaluation.task_run import clip_ids, run_task
from mardini.run_info import code_version
from mardini.user_errors import run_reporting_user_errors

# what `from mardini.evaluation.cli import ...` (evaluate.py, the demo, mardini.reproduce) and the tests and notebooks
# keep reading from here, wherever it is defined; _main calls run_task, metric_weights and resolve_source through this
# module, so a test that patches them here still takes effect
__all__ = ["ARROWS", "BASELINES", "PRESETS", "SMALL_FRECHET_SAMPLE", "build_samplers", "check_finite", "clip_ids",
           "code_version", "main", "markdown", "mardini", "metric_weights", "parse_args", "resolve_source", "run_task",
           "small_sample_note", "training_mismatch", "write_report"]


def main(argv: list[str] | None = None, prog: str = "evaluate.py") -> int:
    """Exit code: 0, or 2 on missing data or weights and impossible settings (the message says what to do).
    ``prog``: the command the usage, errors and notes name (``evaluate.py``, or how the module was run)."""
    return run_reporting_user_errors(prog, lambda: _main(argv, prog))


RESUMED_KEYS = ("tasks", "clip_list", "timestamped", "fps_effective", "notices")  # a stopped run's, kept


def _main(argv: list[str] | None, prog: str = "evaluate.py") -> int:
    args = parse_args(argv, prog)
    weights = {} if args.export_inputs is not None else metric_weights(args)  # before the data and the model
    for name, option in (("i3d", "i3d_weights"), ("inception", "inception_weights")):
        if weights.get(name):
            setattr(args, option, weights[name]["path"])  # the file found: the protocol records it
    kind, files = resolve_source(args.data)
    keys: list[str] = []
    n, skipped, available = choose_num_clips(args, kind, files, keys)
    capped = capped_note(args, n, available)
    if capped:
        print(f"{args.prog}: note: {capped}", file=sys.stderr)
    if args.export_inputs is not None:
        written = export_inputs(args, kind, files, n, skipped, argv)
        print(f"wrote the given frames of {n} clips and {', '.join(str(p) for p in written)}; run the method on "
              f"them, writing each window of {args.frames} frames to OUT/<task>/<name>.mp4 (or OUT/<task>/<name>/ "
              "frame images), then score it with the same flags and --generated NAME=OUT")
        return 0
    samplers = build_samplers(args)
    namer = ClipNames(kind, args.data)
    clip_names = [namer(k) for k in keys[:n]]  # the N clips, named as --export-inputs names them
    for method in args.generated:  # every output there before any sampling
        for task in args.tasks:
            samplers[method].check_present(task, clip_names)
    report: dict[str, Any] = {
        "data": args.data, "data_path": data_path(args.data), "source": kind, "clips": n, "clips_available": available,
        "skipped_videos": skipped, "frames": args.frames,
        "resolution": args.resolution, "fps": args.fps, "seed": args.seed, "methods": list(samplers),
        "sample_resolution": sample_resolution(args, samplers["mardini"]) if "mardini" in samplers else None,
        "checkpoint": args.checkpoint, "checkpoint_file": checkpoint_file(args.checkpoint, samplers.get("mardini")),
        "weights_sampled": None if "mardini" not in samplers else ("raw" if args.no_ema else "ema"),
        "generated": {m: str(Path(d).resolve()) for m, d in args.generated.items()}, "weights": weights,
        "command": run_info.command_line(command_words(args.prog), argv), "code": code_version(),
        "device": str(device_of(args)), "device_name": device_name(device_of(args)), "dtype": args.dtype,
        "torch": torch.__version__, "python": platform.python_version(), "status": "partial",
        "tasks_asked": list(args.tasks), "tasks": {},
    }
    notices = training_mismatch(samplers.get("mardini"), args)
    for notice in notices:
        print(f"{args.prog}: note: {notice}", file=sys.stderr)
    report["notices"] = notices = ([capped] if capped else []) + notices
    out = Path(args.out) if args.out else default_out(args.data, report["data_path"], args.prog)
    state = RunState(out, run_settings(args, report, files), args.save_every, args.prog)
    earlier = state.begin(args.fresh)  # a stopped run of these settings: its finished tasks and notices go on
    if earlier:
        report.update({k: earlier[k] for k in RESUMED_KEYS if k in earlier})
        notices = report["notices"]
    out.mkdir(parents=True, exist_ok=True)
    state.save(report)
    write_report(out, report)  # partial until the end: a run that stops keeps every task it finished
    for task in args.tasks:
        if task in report["tasks"]:  # finished before a resume
            continue
        report["tasks"][task] = res = run_task(task, args, samplers, kind, files, n,
                                               checkpoint=state.task(task, n))
        clip_list = res.pop("clip_list")
        if "fps_effective" not in report:  # every task reads the same clips: once per run
            report["clip_list"] = clip_list  # to give another method the same inputs
            report["timestamped"] = sum(c.get("timing") == "pts" for c in clip_list)  # variable-rate, by timestamp
            eff = res["fps_effective"]
            report["fps_effective"] = {"min": eff["min"], "max": eff["max"]}
            note = rate_note(eff, args.fps, res["clips"])
            if note:
                print(f"{args.prog}: warning: {note}", file=sys.stderr)
                notices.append(note)
        state.save(report)
        write_report(out, report)
    small = small_sample_note(report)
    if small:
        print(f"{args.prog}: note: {small}", file=sys.stderr)
        notices.append(small)
    report["status"] = "complete"
    write_report(out, report)
    state.finish()
    print(markdown(report))
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return 0


if __name__ == "__main__":  # `python -m mardini.evaluation.cli ...` is `python evaluate.py ...`
    from mardini.evaluation.cli import main as _main
    from mardini.user_errors import run_module as _run_module

    raise SystemExit(_run_module("mardini.evaluation.cli", _main))

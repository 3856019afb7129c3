"""``make demo`` / ``python -m mardini.demo``: MarDini end to end on CPU, written up in ``outputs/demo/report.md``.

1. data: the embedded synthetic set under ``data/shards/synthetic`` (built once, reused);
2. training: the tiny curriculum chain ``configs/tiny/`` -- generator warm-ups (4 then 9 frames), planner warm-up,
   joint model, joint task training with the kept fraction decreasing (checkpoints under ``outputs/tiny``; a
   finished stage is reused, an interrupted one resumes);
3. evaluation: interpolation and image-to-video on held-out clips against linear blending and nearest-frame
   repetition (MidF-PSNR/SSIM, trajectory error; FVD/FID too with ``--frechet`` after ``make weights``);
4. pictures: contact sheets next to ground truth and the baselines, GIF/MP4 samples, loss curves;
5. ``outputs/demo/report.md`` (+ ``summary.json``).

The stage configs are the checkout's ``configs/tiny/`` (found beside the package, so the demo runs from any folder;
a non-editable install has none and stops before anything is built); the data and outputs go under the folder it
runs in. Re-running reuses what is done; ``--fresh`` starts over (deletes ``outputs/tiny`` and ``outputs/demo``, and
rebuilds a synthetic split made with other settings, e.g. another ``--train-clips``). It deletes a ``--out`` folder
only when that holds nothing but what the demo writes there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from mardini import run_info
from mardini.checkout import repo_path
from mardini.demo.chain import TINY_STAGES, run_stage
from mardini.demo.data import SHARDS, build_synthetic, synthetic_differences
from mardini.demo.wait_policy import DEFAULT_THREADS
from mardini.diffusion.checks import check_eta
from mardini.strict_json import dumps_strict
from mardini.threads import add_threads_argument, resolve_threads
from mardini.user_errors import run_reporting_user_errors, shown_path

OUTPUT = Path("outputs/demo")
TRAIN_ROOT = Path("outputs/tiny")
# What the demo (and ``python -m mardini.demo.data``) writes in a report folder: ``--fresh`` deletes no other folder.
REPORT_ENTRIES = ("report.md", "summary.json", "loss_curves.png", "eval", "samples", "contact_sheet.png")


def machine_line() -> str:
    """What the report's figures ran on: architecture, threads, torch, the CPU's bf16 matmul kernels (which decide
    the last digits, :mod:`mardini.cpu_kernels`) and the OpenMP wait policy the demo picked."""
    policy = os.environ.get("MARDINI_DEMO_WAIT_POLICY")
    return run_info.machine_line() + (f", {policy}" if policy else "")


def demo_command(argv: list[str] | None) -> str:
    """The command line the report quotes: ``argv``, or this process's own arguments when None (``make demo`` is
    ``python -m mardini.demo`` without any)."""
    return run_info.command_line(["python", "-m", "mardini.demo"], argv)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mardini.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUTPUT,
                   help="report folder (--fresh deletes it if it holds only what the demo writes there)")
    p.add_argument("--fresh", action="store_true",
                   help="delete earlier checkpoints and results first, and rebuild a synthetic split made with other "
                        "settings (another --train-clips)")
    p.add_argument("--eval-clips", type=int, default=64, help="held-out clips per task (the val split has 64)")
    p.add_argument("--steps", type=int, default=5,
                   help="DDIM steps of the model at evaluation (5: Fig. 6a finds few steps near-optimal, and the tiny "
                        "model's MidF-PSNR peaks there; the paper's tables use 25)")
    p.add_argument("--eta", type=float, default=1.0,
                   help="DDIM eta at evaluation, in [0, 1]: 1 = ancestral (default here: the tiny model's "
                        "deterministic samples keep leftover start noise), 0 = the paper's deterministic DDIM")
    p.add_argument("--show", type=int, default=4, help="clips in the contact sheets")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's max_steps (quick runs: 0.05)")
    p.add_argument("--final-steps", type=int, default=None,
                   help="max_steps of the last stage, joint task training (default: its config's max_steps "
                        "times --scale); more steps are what the tiny model needs most (README, the demo), at about "
                        "0.4 s each here. A finished shorter run resumes from its last checkpoint; --fresh reruns the "
                        "recipe cleanly")
    p.add_argument("--train-clips", type=int, default=None,
                   help=f"synthetic training clips (default: the demo's 2000), written to {SHARDS}/train; a set "
                        "there of another size is rebuilt with --fresh (the chain then retrains on it) and refused "
                        "without")
    p.add_argument("--frechet", action="store_true",
                   help="add FVD and FID (needs `make weights`; I3D and InceptionV3 over every clip cost minutes on CPU)")
    add_threads_argument(p, "`python -m mardini.demo` first measures how busy the CPUs it may run on are: when "
                            "their busy cores plus these threads exceed them, it sets OMP_WAIT_POLICY=PASSIVE "
                            "(waiting threads sleep; spinning ones would halve the speed), otherwise it keeps "
                            "OpenMP's default (faster there); a policy you set is kept. Use --threads 1 when other "
                            "jobs hold the cores")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs)")
    a = p.parse_args(argv)
    resolve_threads(p, a, DEFAULT_THREADS)
    return a


def _weights_available() -> bool:
    from mardini.weights import resolve_weights

    try:
        resolve_weights("i3d", verify=False)
        resolve_weights("inception", verify=False)
        return True
    except (FileNotFoundError, ValueError):
        return False


def check_out(out: Path, fresh: bool) -> None:
    """``--out`` must be a folder (or not exist yet); with ``--fresh``, which deletes it, a report folder: one that
    holds only :data:`REPORT_ENTRIES`, and not the folder the demo runs in, the checkout or the home folder, nor a
    folder above one of them."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the report (default {OUTPUT})")
    if not fresh:
        return
    target = out.resolve()
    for keep, what in ((Path.cwd(), "the folder the demo runs in"), (Path(__file__).parents[2], "the checkout"),
                       (Path.home(), "the home folder")):
        keep = keep.resolve()
        if target == keep or target in keep.parents:
            raise ValueError(f"--fresh deletes --out, and {out} is {what} or holds it: give the demo's report folder "
                             f"({OUTPUT}) or a new one")
    others = sorted(p.name for p in out.iterdir() if p.name not in REPORT_ENTRIES) if out.exists() else []
    if others:
        named = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(f"--fresh deletes --out, and {out} holds what the demo does not write there ({named}): give "
                         f"the demo's report folder ({OUTPUT}) or a new one")


def describe(stale: dict[str, list[str]]) -> str:
    """``train: clips 2000 -> 500`` of :func:`mardini.demo.data.synthetic_differences`' answer."""
    return "; ".join(f"{split}: {', '.join(diffs)}" for split, diffs in stale.items())


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.final_steps is not None and a.final_steps < 1:
        raise SystemExit(f"--final-steps {a.final_steps} is impossible: give a number of steps >= 1 (or leave it out)")
    if a.train_clips is not None and a.train_clips < 1:
        raise SystemExit(f"--train-clips {a.train_clips} is impossible: give a number of clips >= 1 (or leave it out)")
    check_eta(a.eta, "--eta")  # used at the end, after the training: checked first
    check_out(a.out, a.fresh)  # checked before anything is deleted, as the data is
    tiny = repo_path("configs/tiny")  # the checkout's configs, wherever the demo runs: there before any data is built
    extra = {} if a.train_clips is None else {"train_clips": a.train_clips}
    stale = synthetic_differences(SHARDS, **extra)
    if stale and not a.fresh:
        raise ValueError(f"{SHARDS} holds a synthetic set made with other settings ({describe(stale)}): add --fresh "
                         f"to rebuild it and retrain the chain on it (the checkpoints under {TRAIN_ROOT} may have "
                         "been trained on the set there)")
    start = time.perf_counter()
    torch.set_num_threads(a.threads)
    if a.fresh:
        shutil.rmtree(TRAIN_ROOT, ignore_errors=True)
        shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)

    print(f"[1/5] synthetic data set under {SHARDS}/ (built once, reused)", flush=True)
    for split, diffs in stale.items():  # only with --fresh: derived and cheap to rebuild
        print(f"      {split}: made with other settings ({', '.join(diffs)}), rebuilt", flush=True)
        shutil.rmtree(SHARDS / split)
    for s in build_synthetic(SHARDS, progress=not a.no_progress, **extra):
        print(f"      {s['split']}: {s['clips']} clips in {s['shards']} shards ({s['kept']} reused)", flush=True)

    print(f"[2/5] training the tiny chain ({len(TINY_STAGES)} stages, configs in {shown_path(str(tiny))}/)",
          flush=True)
    stages = []
    t_train = time.perf_counter()
    for i, name in enumerate(TINY_STAGES, 1):
        last = i == len(TINY_STAGES)
        run = run_stage(name, config_dir=tiny, scale=a.scale, progress=not a.no_progress,
                        max_steps=a.final_steps if last else None)
        stages.append(run)
        earlier = f" in {run.seconds:.0f} s" if run.seconds else ""  # recorded in its checkpoint
        how = f"reused (already trained{earlier})" if run.reused else f"trained in {run.seconds:.0f} s"
        print(f"      stage {i}/{len(TINY_STAGES)} {name}: {run.steps} steps, {how}", flush=True)
    train_s = time.perf_counter() - t_train
    final = stages[-1].checkpoint

    print(f"[3/5] evaluating {final} on {a.eval_clips} held-out clips (vs linear blend, nearest frame)", flush=True)
    t_eval = time.perf_counter()
    evaluation = evaluate(final, a.out / "eval", a.eval_clips, a.steps, a.frechet, a.eta)
    from mardini.pipeline import MarDiniPipeline

    pipe = MarDiniPipeline.from_checkpoint(final, ema=True)
    evaluation["found_by_gap"], evaluation["found_by_size"] = where_objects_are_lost(pipe, a.eval_clips, a.steps,
                                                                                   a.eta)
    eval_s = time.perf_counter() - t_eval

    print("[4/5] pictures: contact sheets, GIF/MP4 samples, loss curves", flush=True)
    from mardini.demo.curves import plot_losses
    from mardini.demo.showcase import showcase

    val = next(iter(_val_loader(a.show)))
    pictures = showcase(pipe, val["video"][: a.show], val["key"][: a.show], a.out / "samples", steps=a.steps,
                        eta=a.eta)
    losses = plot_losses([(s.name, s.log_dir) for s in stages], a.out / "loss_curves.png")

    print("[5/5] report", flush=True)
    from mardini.demo.report import verdict, write_report

    info = {
        "command": demo_command(argv),
        "machine": machine_line(),
        "total_s": time.perf_counter() - start, "train_s": train_s, "eval_s": eval_s,
        "params": {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("planner", "generator")},
        "resolution": pipe.resolution[0] if pipe.resolution else 32, "frames": pipe.window,
        "fps": pipe.fps or 8.0, "planner_resolution": pipe.planner_resolution,
    }
    report = write_report(a.out, info, stages, evaluation, pictures, losses)
    checks = verdict(evaluation["tasks"])
    summary = {"report": str(report), "machine": info["machine"], "total_s": info["total_s"], "train_s": train_s,
               "eval_s": eval_s,
               "stages": {s.name: {"steps": s.steps, "seconds": s.seconds, "reused": s.reused} for s in stages},
               "results": {t: r["results"] for t, r in evaluation["tasks"].items()},
               "interpolation_found_by_gap": evaluation["found_by_gap"],
               "interpolation_found_by_size": evaluation["found_by_size"],
               "beats_baselines": {f"{t}/{m}": ok for t, m, ok, _ in checks}}
    (a.out / "summary.json").write_text(dumps_strict(summary), encoding="utf-8")

    print(f"\ndone in {info['total_s'] / 60:.1f} min (training {train_s / 60:.1f}, evaluation {eval_s / 60:.1f}).")
    for task, metric, ok, detail in checks:
        print(f"  {task:15s} {metric:12s} {'beats both baselines' if ok else 'does NOT beat both baselines'}: {detail}")
    print(f"report: {report}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The exit code of ``python -m mardini.demo``: a user error (data of other settings, missing weights) is one
    ``python -m mardini.demo: error: ...`` line and exit code 2, no traceback."""
    return run_reporting_user_errors("python -m mardini.demo", lambda: main(argv))


def _val_loader(clips: int):
    from mardini.data import synthetic as S
    from mardini.data.datamodule import VideoDataModule

    dm = VideoDataModule(train_shards=str(SHARDS / "train"), val_shards=str(SHARDS / "val"),
                         frames=S.DEMO_LOADER_FRAMES, fps=S.DEMO_LOADER_FPS, resolution=S.DEMO_LOADER_RESOLUTION,
                         batch_size=clips, num_workers=0, val_clips=clips)
    dm.setup("validate")
    return dm.val_dataloader()


def where_objects_are_lost(pipe, clips: int, steps: int, eta: float) -> tuple[dict, dict]:
    """Interpolation on the held-out clips, the trajectory metric split by the distance from a given frame and by
    object area (``mardini.evaluation.found_by_gap``), for the model and both baselines: ``(by_gap, by_size)``. The
    clips and seeds of :func:`evaluate`'s interpolation (``evaluate.py --preset synthetic``), so the model's share
    found over all gaps is its ``traj_detected``."""
    from mardini.evaluation.cli import PRESETS
    from mardini.evaluation.found_by_gap import evaluation_batches, gap_rows, score_batches, size_rows
    from mardini.masking import interpolation_mask

    preset = PRESETS["synthetic"]
    batches = evaluation_batches(preset["data"], clips, preset["frames"], preset["resolution"], preset["fps"],
                                 batch_size=8)  # evaluate.py's default --batch-size (the figures do not depend on it)
    objects = score_batches(pipe, batches, interpolation_mask(preset["frames"]), steps=steps, eta=eta)
    return ({n: gap_rows(m, preset["frames"]) for n, m in objects.items()},
            {n: size_rows(m, preset["frames"]) for n, m in objects.items()})


def evaluate(checkpoint: Path, out: Path, clips: int, steps: int, frechet: bool = False, eta: float = 0.0) -> dict:
    """The synthetic protocol (both tasks) for the model and the baselines; returns ``report.json`` as a dict."""
    from mardini.evaluation.cli import main as evaluate_main

    if frechet and not _weights_available():
        raise FileNotFoundError("--frechet needs the I3D and InceptionV3 weights: run `make weights` first")
    metrics = ["midf", "traj"] + (["fvd", "fid"] if frechet else [])
    code = evaluate_main(["--preset", "synthetic", "--checkpoint", str(checkpoint), "--num-clips", str(clips),
                          "--steps", str(steps), "--eta", str(eta), "--metrics", *metrics, "--out", str(out),
                          "--device", "cpu", "--missing-weights", "skip",
                          "--fresh"])  # a minute's work: never refused for a stopped evaluation of other settings
    if code:
        raise RuntimeError(f"evaluation failed with exit code {code}; see the messages above")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    report["steps"], report["eta"] = steps, eta
    if "fvd" not in metrics:
        report["skipped"] = {"FVD/FID": "off by default on CPU; `make weights` then `python -m mardini.demo --frechet`"}
    return report


if __name__ == "__main__":
    sys.exit(main())

"""``make reproduce`` / ``python -m mardini.reproduce``: toy-scale versions of the paper's analyses, with a report.

1. data: the embedded synthetic set (built once, reused);
2. the tiny curriculum chain (``configs/tiny/`` copied under ``<out>/configs``, trained into ``<out>/runs``), or
   existing checkpoints with ``--checkpoints DIR`` (e.g. ``outputs/tiny`` after ``make demo``; read only);
3. Table 2: MAR only / DM only / MAR + DM on interpolation (synthetic protocol, held-out clips);
4. Fig. 6a: the joint checkpoint at 1/10/25/50 DDIM steps, interpolation and image-to-video;
5. Fig. 6c: the generator warm-up trained twice, identity attention on and off, loss curves;
6. Table 3: latency and peak memory of the asymmetric design vs symmetric variants (``bench.asymmetric``);
then ``<out>/report.md`` (+ ``results.json``, PNG plots) with a computed agree/disagree verdict per claim.
``--checkpoints DIR`` is checked first: a folder missing a stage's ``last.ckpt`` stops the command before the data
set is built, in one line (exit code 2, as for any user error); so does a chain trained with other settings than the
demo's default (an earlier ``python -m mardini.demo --final-steps N``, ``--train-clips N`` or ``--scale S``:
:mod:`mardini.reproduce.demo_chain`), and a synthetic set of other settings than the demo's default, each naming
``python -m mardini.demo --fresh``.
So are the checkout's ``configs/tiny/`` and ``bench/`` (found beside the package: it runs from any folder, its data
and outputs going under that folder; a non-editable install has neither).

Default: about 30 min on 2 CPU cores (29.1 min in the README's run; writes ``outputs/reproduce/``). ``--quick``: minutes, tiny step counts and
few clips, only to check that everything runs (writes ``outputs/reproduce/quick/``; its numbers mean nothing).
Re-running reuses finished training runs and resumes interrupted ones, trained at the same settings: a run folder
under ``<out>/runs`` trained at another ``--scale`` or ``--identity-steps`` (or from other ``configs/tiny/``) stops
the command before the data set is built, naming what differs and the folders to delete
(:func:`mardini.reproduce.runs.check_reusable`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from mardini.autoencoders.base import add_allow_autoencoder_argument
from mardini.checkout import repo_path
from mardini.strict_json import dumps_strict
from mardini.threads import add_threads_argument, resolve_threads
from mardini.user_errors import run_reporting_user_errors

ANALYSES = ("table2", "fig6a", "fig6c", "table3")
DEFAULTS = {"scale": 1.0, "identity_steps": 1000, "eval_clips": 64, "sweep": [1, 10, 25, 50], "rounds": 5}
QUICK = {"scale": 0.02, "identity_steps": 20, "eval_clips": 4, "sweep": [1, 10, 25, 50], "rounds": 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mardini.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="minutes: validation only (numbers mean nothing)")
    p.add_argument("--out", type=Path, default=None, help="default outputs/reproduce (quick: outputs/reproduce/quick)")
    p.add_argument("--only", nargs="+", choices=ANALYSES, default=list(ANALYSES), help="analyses to run")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="folder holding the five chain stages (<dir>/<stage>/checkpoints/last.ckpt); no training")
    p.add_argument("--scale", type=float, default=None,
                   help="multiply every chain stage's max_steps (default 1; with --checkpoints, the steps the chain "
                        "is checked to have been trained for, default 1 also under --quick)")
    p.add_argument("--identity-steps", type=int, default=None, help="steps of each Fig. 6c run (default 1000)")
    p.add_argument("--eval-clips", type=int, default=None, help="held-out clips per task (default 64, at most 64)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps for Table 2 (the paper's 25)")
    p.add_argument("--sweep", type=int, nargs="+", default=None, help="DDIM steps of Fig. 6a (default 1 10 25 50)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds of Table 3 (default 5, quick 2; >= 2 for a latency verdict)")
    add_threads_argument(p, "Table 3 times the variants on them too")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_allow_autoencoder_argument(p)
    a = p.parse_args(argv)
    resolve_threads(p, a, min(2, torch.get_num_threads()))
    if a.checkpoints is not None and a.scale is None:  # no chain to train: the demo's is checked at its own steps
        a.scale = 1.0
    for key, value in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.out is None:
        a.out = Path("outputs/reproduce/quick" if a.quick else "outputs/reproduce")
    if a.eval_clips < 2 or a.identity_steps < 1 or a.scale <= 0 or min(a.sweep) < 1 or a.rounds < 1:
        p.error("--eval-clips must be >= 2, --identity-steps >= 1, --scale > 0, --rounds >= 1 and every --sweep "
                "value >= 1")
    return a


def check_memory_measurable(only: list[str]) -> None:
    """Stop before anything runs where Table 3 cannot be measured: ``bench.asymmetric`` resets and reads the peak
    resident set through Linux's ``/proc/self`` (and ``resource``, which Windows lacks), so on macOS or Windows the
    default run failed at its last step, after the training, and wrote no report."""
    if not sys.platform.startswith("linux"):
        rest = " ".join(name for name in only if name != "table3")
        fix = f"run with --only {rest}" if rest else "leave table3 out (--only table2 fig6a fig6c)"
        raise ValueError(f"Table 3 (bench.asymmetric) measures memory through Linux's /proc/self, which this system "
                         f"({sys.platform}) lacks: {fix}, or run it on Linux")


def check_demo_set(root: Path) -> None:
    """Stop, before anything is built or trained, where the synthetic set under ``root`` is not the demo's default
    one (an earlier ``python -m mardini.demo --train-clips N``): the reproduction trains and scores on the default set,
    and a demo chain trained on the other one (``--checkpoints outputs/tiny``) would be scored as if it were not."""
    from mardini.demo.data import synthetic_differences
    from mardini.demo.main import TRAIN_ROOT, describe

    stale = synthetic_differences(root)
    if stale:
        raise ValueError(f"{root} holds a synthetic set made with other settings than the demo's default "
                         f"({describe(stale)}: the set's -> the default; an earlier `python -m mardini.demo "
                         "--train-clips N`?), which the reproduction trains and scores on: run `python -m mardini.demo "
                         f"--fresh` first (it rebuilds the set and retrains {TRAIN_ROOT} on it), then this command again")


def _metrics() -> list[str]:
    from mardini.demo.main import _weights_available

    return ["midf", "traj"] + (["fvd", "fid"] if _weights_available() else [])


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(a.threads)
    from mardini.reproduce import runs

    needs_chain = {"table2", "fig6a"} & set(a.only)
    # the checkout's configs (copied for the runs) and benchmark, wherever this runs: checked before any data is built
    repo_path("configs/tiny")
    if "table3" in a.only:
        repo_path("bench/asymmetric.py")
        check_memory_measurable(a.only)
    ckpts: dict[str, Path] = {}
    if needs_chain and a.checkpoints is not None:  # before the data set is built (minutes, ~800 MB)
        from mardini.reproduce.demo_chain import check_demo_chain

        ckpts = runs.chain_checkpoints(a.checkpoints)
        check_demo_chain(ckpts, a.checkpoints, a.scale)
    from mardini.demo.data import SHARDS, build_synthetic

    check_demo_set(SHARDS)
    a.out.mkdir(parents=True, exist_ok=True)
    from mardini import run_info
    from mardini.reproduce import curves, quality, verdicts
    from mardini.reproduce.report import write_report

    configs = runs.prepare_configs(a.out)
    planned = runs.planned_runs(configs, a.scale, a.identity_steps if "fig6c" in a.only else None,
                                chain=bool(needs_chain) and a.checkpoints is None)
    runs.check_reusable(configs, a.out / "runs", planned)  # before the data set is built
    print(f"[1/6] synthetic data set under {SHARDS}/ (built once, reused)", flush=True)
    build_synthetic(SHARDS, progress=not a.no_progress)
    if needs_chain and a.checkpoints is None:
        print(f"[2/6] tiny chain at {a.scale:g}x its steps (configs {configs}/, runs {a.out / 'runs'}/)", flush=True)
        runs.train_chain(configs, a.scale, not a.no_progress)
        ckpts = runs.chain_checkpoints(a.out / "runs")
    elif needs_chain:
        print(f"[2/6] chain checkpoints from {a.checkpoints}/ (no training)", flush=True)
    args = quality.eval_args(a.eval_clips, a.steps, _metrics(), a.out / "real_stats", a.allow_autoencoder)
    results: dict = {}
    found: dict = {}
    pictures: dict = {}

    if "table2" in a.only:
        print(f"[3/6] Table 2 on {a.eval_clips} clips: MAR only, DM only, MAR + DM, baselines", flush=True)
        results["table2"] = quality.table2(ckpts, args)
        results["table2"]["training_steps"] = quality.table2_steps(ckpts)
        found["Table 2"] = verdicts.table2(results["table2"]["results"], results["table2"]["training_steps"])
    if "fig6a" in a.only:
        print(f"[4/6] Fig. 6a: DDIM steps {a.sweep}, interpolation and image-to-video", flush=True)
        results["fig6a"] = quality.fig6a(ckpts["05_joint_task"], args, a.sweep)
        found["Fig. 6a"] = verdicts.fig6a(results["fig6a"])
        shown = {t: verdicts.task_metrics(t, r["results"]) for t, r in results["fig6a"].items()}
        pictures["fig6a"] = curves.plot_steps(results["fig6a"], shown, a.out / "fig6a_steps.png")
    if "fig6c" in a.only:
        print(f"[5/6] Fig. 6c: generator warm-up twice ({a.identity_steps} steps), identity attention on / off",
              flush=True)
        log_every = 2 if a.quick else max(1, min(10, a.identity_steps // 20))  # a few points even on short runs
        pair = runs.train_identity_pair(configs, a.identity_steps, not a.no_progress, log_every=log_every)
        loss = {("on" if on else "off"): curves.loss_summary(r.log_dir) for on, r in pair.items()}
        trained = sorted({r.steps for r in pair.values()})  # one value: check_reusable refused a pair of other steps
        results["fig6c"] = {**loss, "steps": trained[0] if len(trained) == 1 else trained}
        found["Fig. 6c"] = verdicts.fig6c(loss["on"], loss["off"])
        pictures["fig6c"] = curves.plot_identity(
            {f"identity attention {k}": v for k, v in loss.items()}, a.out / "fig6c_identity.png")
    if "table3" in a.only:
        print("[6/6] Table 3: bench.asymmetric" + (" --quick" if a.quick else "") + f", {a.rounds} rounds",
              flush=True)
        from mardini.reproduce.efficiency import table3

        results["table3"] = table3(a.out, a.quick, a.rounds, torch.get_num_threads())
        found["Table 3"] = verdicts.table3(results["table3"]["table"])

    info = {
        "mode": "quick" if a.quick else "default",
        "command": run_info.command_line(["python", "-m", "mardini.reproduce"], argv),
        "machine": run_info.machine_line(),
        "total_s": time.perf_counter() - start, "table2_steps": a.steps,
        "checkpoints": ", ".join(f"`{p}`" for p in ckpts.values()) or "–",
        "params": _params(ckpts, a.allow_autoencoder), "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    report = write_report(a.out, info, results, found, pictures)
    results_json = dumps_strict({"info": info, "results": results, "verdicts": found}, indent=1)
    (a.out / "results.json").write_text(results_json, encoding="utf-8")
    print(f"\ndone in {info['total_s'] / 60:.1f} min")
    for name, rows in found.items():
        for r in rows:
            print(f"  {name:8s} {r['verdict']:24s} {r['claim']}")
    print(f"report: {report}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The exit code of ``python -m mardini.reproduce``: a user error (a ``--checkpoints`` folder without the chain's
    checkpoints, a checkpoint that does not fit) is one ``python -m mardini.reproduce: error: ...`` line and exit
    code 2, no traceback."""
    return run_reporting_user_errors("python -m mardini.reproduce", lambda: main(argv))


def _params(ckpts: dict[str, Path], allow_autoencoders: list[str]) -> str:
    """Parameter counts of the joint checkpoint's networks, or of the tiny size when no chain was loaded."""
    if "05_joint_task" in ckpts:
        from mardini.pipeline.loading import load_checkpoint

        ld = load_checkpoint(ckpts["05_joint_task"], allow_autoencoders=allow_autoencoders)
        counts = {n: sum(p.numel() for p in m.parameters()) for n, m in (("planner", ld.planner),
                                                                          ("generator", ld.generator))}
    else:  # the networks the tiny chain's last stage config builds (on the meta device: nothing allocated)
        from mardini.configs_table import read_stage

        stage = read_stage(repo_path("configs/tiny/05_joint_task.yaml"))
        counts = {"planner": stage.planner[2], "generator": stage.generator[3]}
    return ", ".join(f"{n} {c / 1e6:.2f} M parameters" for n, c in counts.items())


if __name__ == "__main__":
    sys.exit(cli())

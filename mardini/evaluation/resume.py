"""Resuming ``evaluate.py``: a rerun of the same command with the same ``--out`` goes on where the last one stopped.

``OUT/state/`` holds what a stopped run needs (removed when the run completes):

- ``run.json``: the settings the results depend on (:func:`run_settings`) and the report so far, its finished tasks
  with their results as computed (``NaN`` kept; ``report.json`` writes it as null);
- ``<task>.pt``: the unfinished task's progress, written atomically every ``--save-every`` clips: each method's
  metric states (torchmetrics states: FVD/FID's feature sums and covariance sums, MidF's and the trajectory
  error's running sums; no features are kept), the clips and batches done, the sampling seconds per method, the
  clips' ids, rates and ``clip_list``, the source items read through them and the unusable video files met, and
  whether the real statistics came from the cache.

A rerun keeps the finished tasks, reads on after the source items of the clips done (the video files, or the
shards' raw samples, read through them: those are not decoded again) and samples from the next batch on with the
per-clip seeds (``protocol.clip_seeds``): its report equals one uninterrupted run's (the sampling seconds of both
runs are added, so ``s/clip`` is their sum over all clips). A rerun with other settings into ``OUT`` holding a
stopped run is refused, naming the differences; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from mardini.data.sharding import write_text_atomic
from mardini.evaluation.protocol import EvalSuite, files_id, fingerprint
from mardini.lit.checkpoint_io import atomic_torch_save
from mardini.run_info import describe_code

DEFAULT_SAVE_EVERY = 64  # clips between two saves of a task's progress (FID's states: ~32 MiB per method)
STATE_DIR = "state"
# bump when run.json or the <task>.pt files change what they hold (and raise OLDEST_STATE_FORMAT past the formats this
# code no longer reads); a run.json without it is format 0 (before 2026-12-07), which this code reads (its task
# files without TaskProgress.read: the clips done are read again)
STATE_FORMAT = 1
OLDEST_STATE_FORMAT = 0


# ------------------------------------------------------------------------------------------------
# The settings a resumed run must share
# ------------------------------------------------------------------------------------------------
def run_settings(args: argparse.Namespace, report: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """What the results depend on, as JSON values: data and ``--generated`` outputs (paths, sizes, mtimes), clips,
    tasks, methods, protocol, model (checkpoint sha256), metric weights, batching (it groups the float sums), device
    type, dtype and code. Not the machine's name: a preempted job may go on on another node of the same kind."""
    ckpt = report.get("checkpoint_file") or {}
    settings = {
        "data": report["data_path"], "data files": fingerprint(files_id(files)), "clips": report["clips"],
        "tasks": report["tasks_asked"], "methods": report["methods"], "generated": report["generated"],
        "generated files": {m: fingerprint(files_id([str(f) for f in Path(d).rglob("*") if f.is_file()]))
                            for m, d in report["generated"].items()},  # an output rewritten since is another run
        "frames": report["frames"], "resolution": report["resolution"], "fps": report["fps"], "seed": report["seed"],
        "metrics": args.metrics, "missing_weights": args.missing_weights, "fvd_pad_short": args.fvd_pad_short,
        "metric weights": {k: v and v["sha256"] for k, v in report["weights"].items()},
        "checkpoint sha256": ckpt.get("sha256"),  # not its path: the same file elsewhere is the same model
        "weights_sampled": report["weights_sampled"], "sample_resolution": report["sample_resolution"],
        "steps": args.steps, "guidance": args.guidance, "eta": args.eta, "batch_size": args.batch_size,
        "device": report["device"], "dtype": report["dtype"], "torch": report["torch"],
        # not git_dirty (OUT may be untracked); source: the package's sources where no commit is known
        "code": {k: report["code"][k] for k in ("version", "git_commit", "source") if k in report["code"]},
    }
    return json.loads(json.dumps(settings))  # as run.json holds them (tuples as lists)


def _where_that_code_is(code: dict[str, Any]) -> str:
    """How to get back the code a :func:`~mardini.run_info.code_version` dict describes, for a message."""
    if code.get("git_commit") or not code.get("source"):
        return f"git checkout {code.get('git_commit') or '<its commit>'}, or a git worktree of it"
    return f"the install or copy of the package whose sources digest to {code['source']}"


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"seed 0 -> 1"`` for each setting that differs."""
    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{key} {short(saved.get(key))} -> {short(now.get(key))}"
            for key in dict.fromkeys([*saved, *now]) if saved.get(key) != now.get(key)]


# ------------------------------------------------------------------------------------------------
# One task's progress
# ------------------------------------------------------------------------------------------------
@dataclass
class TaskProgress:
    """What a task has done: batches and clips, sampling seconds per method, clock seconds, each clip's id
    (``task_run.clip_ids``), rate and ``clip_list`` entry, and whether its real statistics came from the cache."""

    batches: int = 0
    clips: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    ids: list[str] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    clip_list: list[dict[str, Any]] = field(default_factory=list)
    real_cached: bool = False
    read: int | None = None  # source items read through the last clip done (None: saved before it was kept)
    skipped: dict[str, str] = field(default_factory=dict)  # {unusable video file: reason} met so far

    def resume_at(self) -> int:
        """Where a resumed task reads on (``mardini.evaluation.data.iter_batches``' ``start``): after the source
        items of the clips done; 0 where nothing is done or the progress was saved before ``read`` was kept (the
        clips done are then read again, their keys checked, and not sampled)."""
        return self.read if self.clips and self.read else 0


def metric_modules(metric: Any) -> dict[str, Metric]:
    """``{name: Metric}`` of a metric and the metrics inside it (a ``MetricCollection``'s members)."""
    return {name: m for name, m in metric.named_modules() if isinstance(m, Metric)}


def suite_state(suite: EvalSuite) -> dict[str, Any]:
    """The suite's metric states ``{metric key: {module: {state: tensor}}}`` on the CPU, and the Fréchet metrics'
    frame selections seen (``frames_seen``: what ``check_frames`` compares)."""
    states = {key: {name: {s: v.detach().cpu().clone() for s, v in m.metric_state.items()}
                    for name, m in metric_modules(metric).items()}
              for key, metric in suite.metrics.items()}
    frames = {key: m.frames_seen() for key, m in suite.frechet.items()}
    return {"states": states, "frames": frames}


def restore_suite(suite: EvalSuite, saved: dict[str, Any]) -> None:
    """Put :func:`suite_state`'s states back (on each state's device); a state of other metrics is refused."""
    for key, metric in suite.metrics.items():
        modules, held = metric_modules(metric), saved["states"].get(key, {})
        for name, m in modules.items():
            if set(held.get(name, {})) != set(m.metric_state):
                raise ValueError(f"the saved progress holds other states of metric {key!r} than this run builds; "
                                 "start over with --fresh")
            for state, value in held[name].items():
                setattr(m, state, value.to(getattr(m, state).device))
    for key, m in suite.frechet.items():
        m.restore_frames_seen(saved["frames"].get(key) or {})


class TaskCheckpoint:
    """``OUT/state/<task>.pt``: a task's :class:`TaskProgress` and metric states, saved every ``every`` clips."""

    def __init__(self, path: Path, task: str, clips: int, every: int, prog: str = "evaluate.py") -> None:
        self.path, self.task, self.clips, self.every, self.prog = path, task, clips, every, prog
        self.saved_at = 0

    def load(self, suites: dict[str, EvalSuite]) -> TaskProgress | None:
        """The saved progress with the suites' states restored, said on stderr; None when there is none."""
        if not self.path.is_file():
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        if saved.get("task") != self.task or saved.get("clips") != self.clips or set(saved["suites"]) != set(suites):
            raise ValueError(f"{self.path} holds the progress of another task, clip count or methods; start over "
                             "with --fresh (or write to another --out)")
        for method, suite in suites.items():
            restore_suite(suite, saved["suites"][method])
        done = TaskProgress(**saved["progress"])
        self.saved_at = done.clips
        print(f"{self.prog}: resuming {self.task} at clip {done.clips} of {self.clips} from {self.path}",
              file=sys.stderr, flush=True)
        return done

    def due(self, done: TaskProgress) -> bool:
        """Whether a save is due: the clips done passed a multiple of ``every`` since the last save (at a batch's
        end), and the task is not at its end (what is left then is the compute)."""
        return done.clips < self.clips and done.clips // self.every > self.saved_at // self.every

    def save(self, done: TaskProgress, suites: dict[str, EvalSuite], began: float) -> None:
        """Write the progress atomically (temp file + ``os.replace``)."""
        done.elapsed = time.perf_counter() - began
        atomic_torch_save({"task": self.task, "clips": self.clips, "progress": asdict(done),
                           "suites": {m: suite_state(s) for m, s in suites.items()}}, self.path)
        self.saved_at = done.clips


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
class RunState:
    """``OUT/state/``: the run's settings and report so far (``run.json``) and the unfinished task's progress."""

    def __init__(self, out: Path, settings: dict[str, Any], save_every: int = DEFAULT_SAVE_EVERY,
                 prog: str = "evaluate.py") -> None:
        self.out, self.settings, self.save_every, self.prog = out, settings, save_every, prog
        self.dir = out / STATE_DIR
        self.file = self.dir / "run.json"

    def begin(self, fresh: bool = False) -> dict[str, Any] | None:
        """The report of a stopped run of these settings in ``OUT`` to go on with (None: start from zero, also where
        it stopped before saving anything). Refuses a stopped run of other settings that saved something, or a partial
        report without state; ``fresh`` drops both."""
        if fresh:
            shutil.rmtree(self.dir, ignore_errors=True)
            return None
        if self.file.is_file():
            saved = json.loads(self.file.read_text(encoding="utf-8"))
            if not saved["report"]["tasks"] and not any(self.dir.glob("*.pt")):  # stopped before saving anything
                shutil.rmtree(self.dir, ignore_errors=True)
                return None
            self._refuse_other_format(saved)
            self._refuse_other_code(saved["settings"])
            diff = differences(saved["settings"], self.settings)
            if diff:
                raise ValueError(f"{self.out} holds a stopped evaluation of other settings ({'; '.join(diff)}): rerun "
                                 f"it with its own settings to resume it, write to another --out, or add --fresh to "
                                 f"start over (its report is replaced)")
            done = list(saved["report"]["tasks"])
            if done:  # (a task's own progress is said as it is loaded)
                print(f"{self.prog}: resuming the evaluation in {self.out}: {', '.join(done)} finished, kept",
                      file=sys.stderr, flush=True)
            return saved["report"]
        status = self.report_status()
        if status == "partial":
            raise ValueError(f"{self.out}/report.json is a partial report without the state to resume it "
                             f"({self.file} is missing): add --fresh to start over, or write to another --out")
        if status == "complete":
            print(f"{self.prog}: note: {self.out} holds a complete report; evaluating again and replacing it "
                  "(--out elsewhere keeps it)", file=sys.stderr)
        return None

    def _refuse_other_format(self, saved: dict[str, Any]) -> None:
        """Refuse a ``run.json`` of a format this code does not read (newer than :data:`STATE_FORMAT`, older than
        :data:`OLDEST_STATE_FORMAT`; none recorded: 0): its task files may hold other states."""
        theirs = saved.get("format_version", 0)
        if not isinstance(theirs, int) or isinstance(theirs, bool):
            raise ValueError(f"{self.out}/state/run.json records resume-state format {theirs!r}, not a whole number "
                             "(edited, or not evaluate.py's): add --fresh to start over, or write to another --out")
        if not OLDEST_STATE_FORMAT <= theirs <= STATE_FORMAT:
            raise ValueError(
                f"{self.out} holds a stopped evaluation saved in resume-state format {theirs}, this evaluate.py reads "
                f"format {STATE_FORMAT} ({'newer' if theirs > STATE_FORMAT else 'older'} code wrote it: "
                f"{describe_code(saved['settings'].get('code'))}); finish it with that code, write to another --out, "
                "or add --fresh to start over (its report is replaced)")

    def _refuse_other_code(self, saved: dict[str, Any]) -> None:
        """Refuse a stopped run that other code started (its package version, git commit or, where no commit is
        known, its sources differ: :func:`~mardini.run_info.code_version`): its finished
        tasks and saved sums would join results of this code's sampling and metrics in one report. No setting
        resumes it, so the message names the code that does instead of 'its own settings'."""
        theirs, ours = saved.get("code") or {}, self.settings.get("code") or {}
        if theirs == ours:
            return
        others = differences({k: v for k, v in saved.items() if k != "code"},
                             {k: v for k, v in self.settings.items() if k != "code"})
        also = f" (and other settings: {'; '.join(others)})" if others else ""
        raise ValueError(
            f"{self.out} holds a stopped evaluation started by {describe_code(theirs)}, this evaluate.py is "
            f"{describe_code(ours)}{also}: resuming it would join two codes' results in one report. Finish it "
            f"with the code that started it ({_where_that_code_is(theirs)}, and rerun the same command), write to "
            "another --out, or add --fresh to start over with this code (its report is replaced)")

    def report_status(self) -> str | None:
        """``status`` of ``OUT/report.json`` (None when there is none or it does not parse)."""
        try:
            return json.loads((self.out / "report.json").read_text(encoding="utf-8")).get("status")
        except (OSError, ValueError, AttributeError):
            return None

    def save(self, report: dict[str, Any]) -> None:
        """``run.json``: the settings and the report so far, written atomically (``NaN`` results kept as such)."""
        text = json.dumps({"format_version": STATE_FORMAT, "settings": self.settings, "report": report}, indent=1,
                          default=float)
        write_text_atomic(self.file, text + "\n")

    def task(self, task: str, clips: int) -> TaskCheckpoint:
        return TaskCheckpoint(self.dir / f"{task}.pt", task, clips, self.save_every, self.prog)

    def finish(self) -> None:
        """Remove ``OUT/state/``: the report is complete."""
        shutil.rmtree(self.dir, ignore_errors=True)

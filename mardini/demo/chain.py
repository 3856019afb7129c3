"""Running a chain of stage configs in order: each stage resumes, or is skipped when its last checkpoint is final."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mardini.checkout import ROOT
from mardini.lit.checkpoints import read_checkpoint

TINY_DIR = ROOT / "configs" / "tiny"  # the checkout's, from any folder (mardini.checkout.repo_path checks it is there)
TINY_STAGES = ("01_dm_warmup_4f", "02_dm_warmup_9f", "03_mar_warmup", "04_joint_model", "05_joint_task")


@dataclass
class StageRun:
    """What one stage did: its settings (for the report), steps, seconds, and whether it was reused. ``seconds``: the
    training time its checkpoint records (:func:`recorded_seconds`: every run that trained it, resumes added; a
    reused stage's from when it was trained), else this run's time in the CLI (0 for a reused stage)."""

    name: str
    kind: str
    checkpoint: Path
    settings: dict = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    reused: bool = False
    log_dir: Path | None = None


def stage_settings(common: Path, stage: Path) -> dict:
    """The merged YAML of ``common`` then ``stage`` (top-level keys merged one level deep), for reports."""
    merged: dict = {}
    for path in (common, stage):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for key, value in cfg.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                inner = dict(merged[key])
                for k, v in value.items():
                    if isinstance(v, dict) and isinstance(inner.get(k), dict) and "init_args" in v:
                        inner[k] = {**inner[k], **v, "init_args": {**inner[k].get("init_args", {}), **v["init_args"]}}
                    else:
                        inner[k] = v
                merged[key] = inner
            else:
                merged[key] = value
    return merged


def finished_step(checkpoint: Path) -> int:
    """``global_step`` of a checkpoint, or -1 when there is none (an unreadable one is left to the resume logic)."""
    if not checkpoint.is_file():
        return -1
    try:
        return int(read_checkpoint(checkpoint).get("global_step", -1))
    except ValueError:
        return -1


def recorded_seconds(checkpoint: Path) -> float | None:
    """The training seconds a checkpoint records (``MarDiniBase.train_seconds``), or None for a missing or unreadable
    checkpoint, one written before the record, or one whose record starts after step 0 (a run resumed from such a
    checkpoint: the time it records is not the stage's)."""
    if not checkpoint.is_file():
        return None
    try:
        meta = read_checkpoint(checkpoint).get("mardini") or {}
    except ValueError:
        return None
    seconds = meta.get("train_seconds")
    return None if seconds is None or meta.get("train_seconds_from_step", 0) else float(seconds)


# Lightning's start-up chatter, the same for every stage; its warnings and errors still show.
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric")
QUIET_WARNINGS = (
    "LightningCLI's args parameter is intended",  # the demo hands each stage its args in-process on purpose
    r"\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint",  # a stage's first run has none
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # raised inside Lightning, nothing a user can change
)


@contextlib.contextmanager
def quiet_lightning():
    """Inside: Lightning logs warnings only (no tips, device lines or seed messages) and the known, harmless
    warnings of :data:`QUIET_WARNINGS` are hidden; the previous logger levels come back after."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def scaled_steps(settings: dict, scale: float = 1.0) -> int:
    """The steps a stage trains at ``scale``: its merged ``settings``' (:func:`stage_settings`) ``max_steps`` times
    ``scale``, rounded, at least 1 (``python -m mardini.demo --scale``, the reproduction's runs and their checks)."""
    return max(1, round(settings["trainer"]["max_steps"] * scale))


def run_stage(name: str, config_dir: Path = TINY_DIR, extra: list[str] | None = None,
              max_steps: int | None = None, progress: bool = True, scale: float = 1.0) -> StageRun:
    """Train one stage from the CLI in this process; skipped when its ``last.ckpt`` has reached ``max_steps``
    (default: the config's ``max_steps`` times ``scale``, at least 1)."""
    from mardini.cli import main as cli_main

    common, stage = config_dir / "common.yaml", config_dir / f"{name}.yaml"
    settings = stage_settings(common, stage)
    steps = int(max_steps if max_steps is not None else scaled_steps(settings, scale))
    logger = settings["trainer"]["logger"]["init_args"]
    log_dir = Path(logger["save_dir"]) / logger["name"] / str(logger.get("version", ""))
    checkpoint = log_dir / "checkpoints" / "last.ckpt"
    kind = settings["model"]["class_path"].rsplit(".", 1)[-1]
    run = StageRun(name, kind, checkpoint, settings, steps, log_dir=log_dir)
    done = finished_step(checkpoint)
    if done >= steps:
        run.reused = True
        run.steps = done  # what the checkpoint was trained for (a longer earlier run is reused as it is)
        run.seconds = recorded_seconds(checkpoint) or 0.0
        if done > steps:
            print(f"      {name}: reusing its checkpoint at step {done}, past the {steps} asked for "
                  f"(delete {log_dir} to retrain it)", flush=True)
        return run
    args = ["fit", "--config", str(common), "--config", str(stage), f"--trainer.max_steps={steps}",
            f"--trainer.enable_progress_bar={str(progress).lower()}", "--trainer.enable_model_summary=false",
            *(extra or [])]
    start = time.perf_counter()
    with quiet_lightning():
        cli_main(args)
    if finished_step(checkpoint) < steps:
        raise RuntimeError(f"stage {name} stopped before step {steps}; see the log under {log_dir}")
    recorded = recorded_seconds(checkpoint)  # a resumed stage's earlier runs too, not this call's alone
    run.seconds = recorded if recorded is not None else time.perf_counter() - start
    return run

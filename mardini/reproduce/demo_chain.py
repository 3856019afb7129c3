"""Whether a ``--checkpoints`` chain was trained as ``python -m mardini.demo`` trains it by default.

A demo run with ``--train-clips N``, ``--final-steps N`` or ``--scale S`` leaves checkpoints under ``outputs/tiny``
that the reproduction would otherwise score as the demo's chain. Each stage's ``last.ckpt`` is compared with what
the checkout's ``configs/tiny/`` describe (at ``--scale``): its ``global_step`` and LR-schedule length (the stage's
``max_steps``), whether that length changed mid-run (``lr_schedule_history``: a ``--final-steps 650`` run resumed to
1300 steps by a plain demo ends at the demo's step and length but trained under two schedules), the callbacks that
change training (the keep-ratio ``Curriculum``'s milestones and ``interpolate``, from ``checkpoint["callbacks"]``),
the data and model arguments the config sets, the autoencoder, and the training set the shards' ``manifest.json``
recorded (``checkpoint["VideoDataModule"]["train_data"]``). The training set, the schedule history and the
curriculum's ``interpolate`` are written since 2026-12-07: an older checkpoint cannot say them and is refused too.
"""

from __future__ import annotations

import json
from pathlib import Path

from mardini.demo.chain import TINY_DIR, scaled_steps, stage_settings
from mardini.reproduce.runs import CKPT_KEYS

NOT_RECORDED = "not recorded (a checkpoint written before 2026-12-07)"


def _plain(value):
    """``value`` as JSON reads it back (tuples as lists, ints and floats compared by value)."""
    return json.loads(json.dumps(value))


def _differ(what: str, theirs, ours) -> list[str]:
    """``["what theirs -> ours"]`` where the checkpoint's ``theirs`` is not the demo's ``ours``."""
    return [] if _plain(theirs) == _plain(ours) else [f"{what} {theirs} -> {ours}"]


def expected_train_data() -> dict:
    """The manifest settings of the demo's default training split (``python -m mardini.demo`` without options)."""
    from mardini.data import synthetic as S
    from mardini.data.synthetic_shards import split_settings
    from mardini.demo.data import RENDER

    return split_settings("train", S.DEMO_TRAIN_CLIPS, S.DEMO_TRAIN_PER_SHARD, **RENDER)


def schedule_changes(history) -> list[str]:
    """Where the checkpoint's ``lr_schedule_history`` (``[[step, length], ...]``,
    :meth:`~mardini.lit.checkpoint_hooks.StageCheckpoints._record_schedule_length`) shows the LR schedule changing
    length mid-run (a ``--final-steps N`` run resumed to another length), or not known from step 0."""
    if history == NOT_RECORDED or not history:
        return [f"LR schedule history {NOT_RECORDED}"]
    diffs = [] if history[0][0] == 0 else [
        f"LR schedule history not recorded before step {history[0][0]} (resumed from a checkpoint written before "
        "2026-12-07)"]
    return diffs + [f"LR schedule {old} steps until step {step}, then {new} -> one schedule throughout"
                    for (_, old), (step, new) in zip(history, history[1:])]


# the state keys (up to "{") of callbacks that save state without changing the training: the checkpoint savers, and
# Lightning's Timer (trainer.max_time), whose early stop the steps compared already show
NEUTRAL_CALLBACKS = ("ModelCheckpoint", "StepCheckpoint", "Timer")


def stage_curriculum(cfg: dict):
    """The stage config's :class:`~mardini.lit.curriculum.Curriculum` (or subclass) of ``trainer.callbacks``, built
    from its ``init_args``, or None."""
    import importlib

    from mardini.lit.curriculum import Curriculum, Milestone

    for cb in cfg["trainer"].get("callbacks") or []:
        module, _, name = cb.get("class_path", "").rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if module else None
        if isinstance(cls, type) and issubclass(cls, Curriculum):
            args = dict(cb.get("init_args") or {})
            return cls(**{**args, "milestones": [Milestone(**m) for m in args["milestones"]]})
    return None


def _milestone(m: dict | None) -> dict | str:
    """A saved milestone without its unset fields, for the message."""
    return "none" if m is None else {k: v for k, v in m.items() if v is not None}


def _steps(state: dict | None) -> str:
    """A saved curriculum in brief: ``milestones at steps [0, 400, 800]``, or ``none``."""
    return "none" if state is None else f"milestones at steps {[m['step'] for m in state.get('milestones') or []]}"


def callback_differences(ckpt: dict, cfg: dict) -> list[str]:
    """How the callbacks that change training differ between the checkpoint's ``callbacks`` entry (each callback's
    ``state_dict`` under its ``state_key``) and the stage config's ``trainer.callbacks``: the keep-ratio
    :class:`~mardini.lit.curriculum.Curriculum` (found by its state's content, as a subclass's key is its own name:
    its milestones, ``interpolate`` and, where it matters, its ramp rule), and any other callback that saved state
    (not a checkpoint saver) where the config has none."""
    from mardini.lit.curriculum import RULE
    from mardini.pipeline.loading import is_curriculum_state

    saved = ckpt.get("callbacks") or {}
    curricula = [state for state in saved.values() if is_curriculum_state(state)]
    diffs = [f"callback {key} -> none" for key, state in saved.items()
             if not is_curriculum_state(state) and key.split("{", 1)[0] not in NEUTRAL_CALLBACKS]
    diffs += [f"callback {key} -> none" for key, state in saved.items() if any(state is c for c in curricula[1:])]
    curriculum = stage_curriculum(cfg)
    theirs, ours = curricula[0] if curricula else None, None if curriculum is None else curriculum.state_dict()
    if theirs is None or ours is None:
        return diffs + ([] if theirs is ours else [f"curriculum {_steps(theirs)} -> {_steps(ours)}"])
    mine, recorded = ours["milestones"], theirs.get("milestones") or []
    for i in range(max(len(mine), len(recorded))):
        diffs += _differ(f"curriculum milestone {i}", _milestone(recorded[i] if i < len(recorded) else None),
                         _milestone(mine[i] if i < len(mine) else None))
    diffs += _differ("curriculum interpolate", theirs.get("interpolate", NOT_RECORDED), ours["interpolate"])
    if curriculum.ramps_across_unset():  # where the ramp rule changes the keep ratio trained with
        diffs += _differ("curriculum rule", theirs.get("rule", 1), RULE)
    return diffs


def stage_differences(ckpt: dict, name: str, scale: float = 1.0, source: Path = TINY_DIR, steps: int | None = None,
                      resumable: bool = False) -> list[str]:
    """How the checkpoint dict ``ckpt`` of stage ``name`` differs from that stage of ``source`` (``max_steps`` times
    ``scale``, as :func:`mardini.demo.chain.run_stage` trains it, or ``steps``): ``["steps 3000 -> 1300", ...]``,
    the checkpoint's value first. ``resumable``: a checkpoint short of the steps is no difference (a fit at these
    settings resumes it), a longer one is."""
    cfg = stage_settings(source / "common.yaml", source / f"{name}.yaml")
    steps = scaled_steps(cfg, scale) if steps is None else steps
    meta = ckpt.get("mardini") or {}
    short = resumable and isinstance(ckpt.get("global_step"), int) and ckpt["global_step"] < steps
    diffs = [] if short else _differ("steps", ckpt.get("global_step"), steps)
    diffs += _differ("LR schedule steps", meta.get("lr_schedule_steps", NOT_RECORDED), steps)
    diffs += schedule_changes(meta.get("lr_schedule_history", NOT_RECORDED))
    data, hp = ckpt.get("datamodule_hyper_parameters") or {}, ckpt.get("hyper_parameters") or {}
    for key, value in cfg["data"]["init_args"].items():
        diffs += _differ(f"data.{key}", data.get(key, "unset"), value)
    for key, value in cfg["model"]["init_args"].items():
        if key == "autoencoder":
            spec = meta.get("autoencoder_spec") or {}
            diffs += _differ("autoencoder", spec.get("class_path"), value["class_path"])
            for k, v in (value.get("init_args") or {}).items():
                diffs += _differ(f"autoencoder.{k}", (spec.get("init_args") or {}).get(k, "unset"), v)
        elif key not in CKPT_KEYS:  # paths to the earlier stages: where the chain was trained, not how
            diffs += _differ(f"model.{key}", hp.get(key, "unset"), value)
    diffs += _differ("seed", hp.get("seed", "unset"), cfg.get("seed_everything", 0))
    diffs += callback_differences(ckpt, cfg)
    recorded = (ckpt.get("VideoDataModule") or {}).get("train_data", NOT_RECORDED)
    if recorded == NOT_RECORDED or recorded is None:
        return diffs + [f"training set {'not recorded (no manifest.json)' if recorded is None else recorded}"]
    expected = expected_train_data()
    return diffs + [f"training set {k} {recorded.get(k, 'unset')} -> {v}" for k, v in expected.items()
                    if _plain(recorded.get(k, "unset")) != _plain(v)]


def chain_differences(ckpts: dict[str, Path], scale: float = 1.0) -> dict[str, list[str]]:
    """Stage -> :func:`stage_differences` of its checkpoint, for each stage whose checkpoint differs."""
    from mardini.lit.checkpoints import read_checkpoint

    out = {}
    for name, path in ckpts.items():
        diffs = stage_differences(read_checkpoint(path), name, scale)
        if diffs:
            out[name] = diffs
    return out


def check_demo_chain(ckpts: dict[str, Path], root: Path, scale: float = 1.0) -> None:
    """Stop, before anything is built or written, where the chain under ``root`` was not trained at the demo's
    default settings (:func:`chain_differences`), naming what differs and ``python -m mardini.demo --fresh``."""
    stale = chain_differences(ckpts, scale)
    if not stale:
        return
    named = "; ".join(f"{stage}: {', '.join(diffs)}" for stage, diffs in stale.items())
    at = "" if scale == 1 else f" at --scale {scale:g}"
    raise ValueError(
        f"{root} holds checkpoints trained with other settings than the demo's{at} ({named}: the checkpoint's -> the "
        "demo's; an earlier `python -m mardini.demo --final-steps N`, `--train-clips N` or `--scale S`?), which the "
        f"reproduction would score as the demo's chain: run `python -m mardini.demo --fresh` first (it retrains "
        "outputs/tiny at the demo's settings; the checkpoints of another folder need retraining the same way), then "
        "this command again")

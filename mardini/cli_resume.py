"""Which checkpoint file a ``train.py`` run reads: the one ``--ckpt_path last`` resumes (fit) or scores (validate),
and the local file and step of the one it resumes."""

from __future__ import annotations

import re
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from mardini.cli_settings import checkpoint_dir
from mardini.lit.checkpoint_io import local_path, other_checkpoints_message
from mardini.lit.step_checkpoint import saved_step


RESUMABLE = re.compile(r"(last|hpc_ckpt_\d+|step\d+)\.ckpt")  # what a fit writes in its checkpoint folder


def resume_checkpoint(folder: str | None, names: re.Pattern = RESUMABLE) -> str | None:
    """What a ``fit`` with ``--ckpt_path last`` resumes from: of the stage's ``folder/last.ckpt``, preemption
    checkpoints (``hpc_ckpt_N.ckpt``) and step checkpoints (``stepNNNNNNNN.ckpt``), the one of the highest recorded
    global step (the newest file among equal steps); None if there is none. A step checkpoint can be the newest: a
    kill between it and ``last.ckpt`` (written after it) leaves it alone or beside an older ``last.ckpt``. One that
    cannot be read is an error naming it and the others to resume from. ``names``: the file names to consider."""
    if folder is None:
        return None
    found = {p: key for p in Path(folder).glob("*.ckpt") if names.fullmatch(p.name) and (key := _newness(p))}
    return str(max(found, key=found.get)) if found else None


def _newness(path: Path) -> tuple[int, float] | None:
    """``(global step, modification time)`` of the checkpoint at ``path``, for :func:`resume_checkpoint`; None where
    it is no file, or is gone by the time it is read (a fit beside a ``validate`` deletes its older checkpoints: before,
    that was ``checkpoint ... does not exist`` or a raw ``FileNotFoundError``)."""
    try:
        return (_saved_step(path), path.stat().st_mtime) if path.is_file() else None
    except FileNotFoundError:
        return None


def deleted_by_fit_hint(path: Path) -> str:
    """Why a stage's step or preemption checkpoint named by ``--ckpt_path`` may be gone, and the way on; "" for
    another file."""
    if not re.fullmatch(r"(hpc_ckpt_\d+|step\d+)\.ckpt", path.name):
        return ""
    return (f"; a fit in {path.parent} deletes its step and preemption checkpoints (stepN.ckpt, hpc_ckpt_N.ckpt) as "
            "it saves newer ones: copy the checkpoint elsewhere before scoring it, or score the stage's newest with "
            "--ckpt_path last")


def scored_checkpoint(config) -> str:
    """What ``validate`` with ``--ckpt_path last`` (its default) scores: the checkpoint a ``fit`` of the same config
    would resume from (:func:`resume_checkpoint`), said on rank 0; an error naming ``--ckpt_path PATH`` and
    ``--ckpt_path null`` when there is none (before, validate scored freshly initialised or starting weights)."""
    folder = checkpoint_dir(config)
    found = resume_checkpoint(folder)
    if found is None:
        where = (f"{folder} holds none (last.ckpt, hpc_ckpt_N.ckpt or stepN.ckpt)" if folder is not None else
                 "trainer.logger names no stage folder (a TensorBoard or CSV logger with a save_dir and a version)")
        raise ValueError(f"validate scores the stage's newest checkpoint (--ckpt_path last, the default), but {where}: "
                         "pass --ckpt_path PATH to score a checkpoint, or --ckpt_path null to score the weights the "
                         "stage starts from (init_from, planner_ckpt / generator_ckpt, else freshly initialised)")
    rank_zero_info(f"validate scores {found} (step {_saved_step(Path(found))}), the newest checkpoint of the stage; "
                   "--ckpt_path PATH scores another")
    return found


def _saved_step(path: Path) -> int:
    """The global step recorded in the checkpoint at ``path`` (memory-mapped: its tensors are not read)."""
    try:
        return saved_step(path, missing=-1)
    except ValueError as e:
        raise ValueError(f"{e} {other_checkpoints_message(path)}") from e


def resumed_file(ckpt_path):
    """The local file a fit resuming ``ckpt_path`` reads, which the CLI checks and reads itself before Lightning
    does; None for a fit from scratch, Lightning's keywords (``last``, ``best``, ``hpc``, the registry's) and files
    another file system reaches."""
    if ckpt_path is None or str(ckpt_path) in ("last", "best", "hpc") or is_registry_path(ckpt_path):
        return None
    return local_path(str(ckpt_path))


def resumed_step(ckpt_path) -> int | None:
    """The global step a fit resuming ``ckpt_path`` goes on from (its checkpoint read memory-mapped); None for a
    fit from scratch, and where it is not read here (Lightning's keywords, a remote file; one that cannot be read
    is refused by ``MarDiniCLI.check_resume``)."""
    path = resumed_file(ckpt_path)
    try:
        step = saved_step(path, missing=-1) if path is not None else -1
    except (OSError, ValueError):
        return None
    return step if step >= 0 else None


def is_registry_path(ckpt_path) -> bool:
    """Lightning's model-registry keyword (``registry`` or ``registry:NAME``)."""
    return str(ckpt_path).lower() == "registry" or str(ckpt_path).lower().startswith("registry:")

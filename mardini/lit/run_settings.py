"""The run's settings beside the model's, for the hyper-parameters a logger records: two runs compare on them.

Lightning logs a module's ``save_hyperparameters`` once at the start of a run (TensorBoard's HParams tab and
``hparams.yaml``, a CSV logger's ``hparams.yaml``, W&B's config, MLflow's params). Those are the model's arguments
only; :func:`run_settings` adds the datamodule's (batch size, resolution, fps, frames, shards, epoch size ...), the
trainer's (steps, precision, accumulation, clipping, devices) and the curriculum's milestones, each under its own key
(``data``, ``trainer``, ``curriculum``), so they cannot clash with the model's (both have ``frames`` and ``seed``,
which Lightning's merge of module and datamodule hyper-parameters refuses when they differ), and the code that ran
under ``code`` (the package version, git commit and whether the checkout had changes, Python's and the libraries'
versions; ``history``: every commit the run was trained with, ``mardini.lit.code_record``), so two runs of a sweep
also compare on what they ran.
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

import lightning as L

DATA_FIELDS = ("train_shards", "val_shards", "batch_size", "resolution", "fps", "frames", "epoch_size")  # of any


def run_settings(trainer: L.Trainer, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``{"data": ..., "trainer": ..., "curriculum": ..., "code": ...}`` of the run ``trainer`` holds (a key
    without settings is left out), in plain YAML types; ``history``: the commits the run was trained with across
    its resumes (``mardini.lit.code_record``), under ``code.history``."""
    code = {**code_settings(), **({"history": history} if history else {})}
    out = {"data": data_settings(getattr(trainer, "datamodule", None)), "trainer": trainer_settings(trainer),
           "curriculum": curriculum_settings(trainer.callbacks), "code": code}
    return {key: plain(value) for key, value in out.items() if value}


def data_settings(datamodule: Any) -> dict[str, Any]:
    """The datamodule's recorded arguments (``save_hyperparameters``: every ``VideoDataModule`` argument), else those
    of :data:`DATA_FIELDS` it has as attributes; empty without a datamodule."""
    if datamodule is None:
        return {}
    settings = {k: v for k, v in dict(getattr(datamodule, "hparams", None) or {}).items() if not k.startswith("_")}
    for name in DATA_FIELDS:
        if name not in settings and hasattr(datamodule, name):
            settings[name] = getattr(datamodule, name)
    return settings


def trainer_settings(trainer: L.Trainer) -> dict[str, Any]:
    """The trainer settings that change what or how fast a run trains."""
    return {
        "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs, "precision": trainer.precision,
        "accumulate_grad_batches": trainer.accumulate_grad_batches, "gradient_clip_val": trainer.gradient_clip_val,
        "gradient_clip_algorithm": trainer.gradient_clip_algorithm, "devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes, "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
        "val_check_interval": trainer.val_check_interval, "log_every_n_steps": trainer.log_every_n_steps,
    }


def curriculum_settings(callbacks: list) -> dict[str, Any]:
    """The first :class:`~mardini.lit.curriculum.Curriculum`'s ``interpolate`` and milestones (``step_<N>``: the
    settings it sets there), or empty."""
    from mardini.lit.curriculum import Curriculum

    for callback in callbacks:
        if isinstance(callback, Curriculum):
            milestones = {f"step_{m.step}": {k: v for k, v in asdict(m).items() if v is not None and k != "step"}
                          for m in callback.milestones}
            return {"interpolate": callback.interpolate, **milestones}
    return {}


@functools.cache
def code_settings() -> dict[str, Any]:
    """The code this process runs: ``mardini``'s version, the checkout's git commit and whether it had changes
    (``git_dirty``; both None outside a git checkout, where ``source``, the package sources' digest, tells codes
    apart: :func:`~mardini.run_info.code_version`), Python's and the libraries' versions (``run_info``). Read once
    per process (git runs three times)."""
    from mardini.run_info import code_version, library_versions

    code = code_version()
    source = {"source": code["source"]} if code.get("source") else {}
    return {"mardini": code["version"], "git_commit": code["git_commit"], "git_dirty": code["git_dirty"], **source,
            **library_versions()}


def plain(value: Any) -> Any:
    """``value`` in YAML's plain types (what every logger can write): tuples as lists, other objects (paths) as
    strings, dicts and lists converted inside."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)

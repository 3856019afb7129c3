"""The run settings ``train.py`` reads, completes or refuses before Lightning builds anything: the stage folder
its logger names, the environment variables in that folder, the seeds left unset, settings Lightning cannot run."""

from __future__ import annotations

import os
import re
from pathlib import Path


def checkpoint_dir(config) -> str | None:
    """``<save_dir>/<name>/<version>/checkpoints``, where Lightning's ModelCheckpoint saves under a logger (TensorBoard
    or CSV) with a ``save_dir`` and a version: a string as given (``""``: none, the stage configs' layout), an int
    ``N`` as ``version_N``; None for another logger or an unset version (a new ``version_N`` every run)."""
    args = _logger_args(config)
    if not args or not args.get("save_dir") or args.get("version") is None:
        return None
    version = args["version"] if isinstance(args["version"], str) else f"version_{args['version']}"
    return str(Path(str(args["save_dir"])) / str(args.get("name") or "") / version / "checkpoints")


def unversioned_logger(config) -> bool:
    """Whether the first logger (TensorBoard or CSV, with a ``save_dir``) leaves its ``version`` unset (Lightning's
    default): it then logs every run in a new ``version_N`` folder, where no earlier checkpoint is."""
    args = _logger_args(config)
    return bool(args) and bool(args.get("save_dir")) and "version" in args and args["version"] is None


def new_folder_each_run(config) -> tuple[str, str] | None:
    """``(why, fix)`` when the stage's logger logs every run in a new ``version_N`` folder (Lightning's default
    logger, or a logger whose version is null), where ``--ckpt_path last`` finds no earlier checkpoint; else None."""
    if default_logger(config):
        return ("trainer.logger is unset (or true): Lightning's default logger (version unset) logs each run in a new "
                "lightning_logs/version_N folder",
                "set trainer.logger to a TensorBoardLogger with a save_dir, a name and a fixed version, as the stage "
                "configs do (version: \"\": one folder, which the same command resumes in)")
    if unversioned_logger(config):
        return ("trainer.logger's version is null: Lightning then logs each run in a new version_N folder",
                "set the logger's version: \"\" (the stage configs' choice: one folder, which the same command "
                "resumes in) or a fixed version")
    return None


def default_logger(config) -> bool:
    """Whether ``trainer.logger`` is left to Lightning's default (unset or ``true``): a TensorBoardLogger (a
    CSVLogger without tensorboard) in ``<default_root_dir>/lightning_logs`` whose version is unset (a new
    ``version_N`` every run; under SLURM the job's id, a new one each job)."""
    logger = (config.get("trainer") or {}).get("logger")
    return logger is None or logger is True


def no_logger(config) -> bool:
    """Whether ``trainer.logger`` is off (``false`` or an empty list)."""
    logger = (config.get("trainer") or {}).get("logger")
    return logger is False or (isinstance(logger, (list, tuple)) and not logger)


LOGGER_FOLDER_FIELDS = ("save_dir", "name", "version")
ENV_REFERENCE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")  # $NAME or ${NAME}


def expand_logger_folder(config) -> None:
    """Expand the environment variables (``$NAME``, ``${NAME}``) that the loggers' ``save_dir``, ``name`` and
    ``version`` name, so that the runs of one command get folders of their own: ``version: task${SLURM_ARRAY_TASK_ID}``
    gives each task of a SLURM job array its folder (a requeue expands it the same way). A variable not set is an
    error naming it. Before, the text was taken as it was, and every task wrote into one folder literally named so."""
    logger = (config.get("trainer") or {}).get("logger")
    for one in logger if isinstance(logger, (list, tuple)) else [logger]:
        args = one.get("init_args") if hasattr(one, "get") else None
        for field in LOGGER_FOLDER_FIELDS if args is not None else ():
            value = args.get(field)
            if isinstance(value, str) and "$" in value:
                args[field] = expand_env(value, f"trainer.logger.init_args.{field}")


def expand_env(value: str, where: str) -> str:
    """``value`` with its ``$NAME`` / ``${NAME}`` replaced from the environment; an error naming those not set."""
    missing = [a or b for a, b in ENV_REFERENCE.findall(value) if (a or b) not in os.environ]
    if missing:
        raise ValueError(f"{where} {value!r} names the environment variable(s) {', '.join(dict.fromkeys(missing))}, "
                         "not set here: set them (SLURM sets SLURM_ARRAY_TASK_ID in a job array's tasks only), or "
                         "give the folder without them")
    return os.path.expandvars(value)


def _logger_args(config):
    """The ``init_args`` of the stage's first logger given by class path, or None."""
    logger = ((config.get("trainer") or {}).get("logger")) or None  # dicts or jsonargparse Namespaces
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return logger.get("init_args") if hasattr(logger, "get") else None


def take_seed_everything(config) -> None:
    """Give the model's and the datamodule's ``seed`` left unset (None) the run's ``seed_everything``, which
    LightningCLI has resolved to an int by now (``true``: ``PL_GLOBAL_SEED``, else 0; config.yaml records it); with
    ``false``, 0. An explicit seed is kept. (Under the CLI the hyper-parameters are the config's: None would be
    recorded and drawn with.)"""
    everything = config.get("seed_everything")
    everything = everything if isinstance(everything, int) and not isinstance(everything, bool) else 0
    for key in ("model", "data"):
        part = config.get(key)
        args = part.get("init_args") if hasattr(part, "get") else None
        if args is not None and "seed" in args and args.get("seed") is None:
            args["seed"] = everything


SEED_RANGE = (0, 2**32 - 1)  # what Lightning's seed_everything (numpy's generator) accepts


def check_run_settings(config) -> None:
    """Refuse, before Lightning seeds or builds anything, the settings it accepts and then fails on deep inside a
    fit: ``trainer.accumulate_grad_batches`` below 1 (a ZeroDivisionError in the datamodule's setup),
    ``trainer.val_check_interval`` 0 (a ZeroDivisionError after the first training batch) and a
    ``seed_everything`` outside numpy's range (Lightning's message names no key)."""
    trainer = config.get("trainer") or {}
    accumulate = trainer.get("accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate < 1:
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate} is impossible: it must be >= 1 (1: no "
                         "accumulation)")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
        raise ValueError(f"trainer.val_check_interval={interval} is impossible: it must be an int >= 1 (training "
                         "batches between validations), a float in (0, 1] (a fraction of the epoch) or a time "
                         "('DD:HH:MM:SS'); to validate never, set trainer.limit_val_batches 0")
    seed = config.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool) and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"seed_everything={seed} is impossible: it must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] "
                         "(or true: PL_GLOBAL_SEED, else 0)")

"""The training runs of ``make reproduce``: the tiny chain and the Fig. 6c pair, in the reproduction's own folder.

Stage configs are copies of ``configs/tiny/`` written under ``<out>/configs/``: the logger's ``save_dir`` and the
checkpoints one stage starts from point into ``<out>/runs/``, so nothing here touches ``outputs/tiny`` (the demo's
runs). Each stage then trains through :func:`mardini.demo.chain.run_stage` (in-process CLI; a finished stage is
reused, an interrupted one resumes).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mardini.demo.chain import TINY_DIR, TINY_STAGES, StageRun, run_stage

CKPT_KEYS = ("init_from", "planner_ckpt", "generator_ckpt")  # model.init_args that name another stage's checkpoint
IDENTITY_STAGE = "01_dm_warmup_4f"  # Fig. 6c: the generator warm-up from scratch (PAPER.md §2.5)


def write_stage_config(name: str, dest: Path, runs: Path, run_name: str | None = None,
                       generator: dict | None = None, source: Path = TINY_DIR) -> None:
    """Copy ``source/<name>.yaml`` to ``dest/<run_name>.yaml`` with its logger and checkpoint paths moved to ``runs``.

    ``generator``: extra ``model.init_args.generator`` fields (e.g. ``{"identity_attention": False}``).
    """
    cfg = yaml.safe_load((source / f"{name}.yaml").read_text(encoding="utf-8"))
    run_name = run_name or name
    logger = cfg["trainer"]["logger"]["init_args"]
    logger.update(save_dir=str(runs), name=run_name, version="")
    init = cfg["model"]["init_args"]
    for key in CKPT_KEYS:
        if init.get(key):  # outputs/tiny/<stage>/checkpoints/last.ckpt -> <runs>/<stage>/checkpoints/last.ckpt
            stage = Path(init[key]).parts[-3]
            init[key] = str(runs / stage / "checkpoints" / "last.ckpt")
    if generator:
        init["generator"] = {**(init.get("generator") or {}), **generator}
    dest.mkdir(parents=True, exist_ok=True)
    # ASCII (safe_dump escapes values, the comment's path escaped here): the fit's LightningCLI reads the config in
    # the locale's encoding (cp1252 on Windows), which a UTF-8 comment could stop
    header = f"# written by mardini.reproduce from {source / name}.yaml\n".encode("ascii", "backslashreplace")
    (dest / f"{run_name}.yaml").write_text(header.decode("ascii") + yaml.safe_dump(cfg, sort_keys=False),
                                           encoding="utf-8")


def prepare_configs(out: Path) -> Path:
    """Write the chain's and the Fig. 6c pair's configs under ``out/configs``; returns that folder."""
    dest, runs = out / "configs", out / "runs"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "common.yaml").write_text((TINY_DIR / "common.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    for name in TINY_STAGES:
        write_stage_config(name, dest, runs)
    for on in (True, False):
        write_stage_config(IDENTITY_STAGE, dest, runs, identity_run_name(on), {"identity_attention": on})
    return dest


def identity_run_name(on: bool) -> str:
    return f"fig6c_identity_{'on' if on else 'off'}"


def train_chain(configs: Path, scale: float, progress: bool, log=print) -> list[StageRun]:
    """The five tiny stages in order, each at ``scale`` times its configured ``max_steps``."""
    done = []
    for i, name in enumerate(TINY_STAGES, 1):
        run = run_stage(name, configs, progress=progress, scale=scale)
        log(f"      chain {i}/{len(TINY_STAGES)} {name}: {run.steps} steps, "
            + ("reused" if run.reused else f"trained in {run.seconds:.0f} s"))
        done.append(run)
    return done


def train_identity_pair(configs: Path, steps: int, progress: bool, log_every: int = 10,
                        log=print) -> dict[bool, StageRun]:
    """The generator warm-up twice (same seed, data, masks and noise), identity attention on and off."""
    out = {}
    for on in (True, False):
        run = run_stage(identity_run_name(on), configs, max_steps=steps, progress=progress,
                        extra=[f"--trainer.log_every_n_steps={log_every}"])
        log(f"      identity attention {'on ' if on else 'off'}: {steps} steps, "
            + ("reused" if run.reused else f"trained in {run.seconds:.0f} s"))
        out[on] = run
    return out


def chain_checkpoints(root: Path) -> dict[str, Path]:
    """``{stage: <root>/<stage>/checkpoints/last.ckpt}``; raises naming the missing ones."""
    ckpts = {name: root / name / "checkpoints" / "last.ckpt" for name in TINY_STAGES}
    missing = [str(p) for p in ckpts.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing chain checkpoints {missing}; train the chain first (make demo trains "
                                "outputs/tiny, or run without --checkpoints to train the reproduction's own)")
    return ckpts


def lineage(stage: str, network: str, source: Path = TINY_DIR) -> list[str]:
    """The stages ``network`` (``generator`` or ``planner``) trained in up to ``stage``'s checkpoint, in order.

    Follows ``init_from`` and ``<network>_ckpt`` through the stage configs."""
    init = yaml.safe_load((source / f"{stage}.yaml").read_text(encoding="utf-8"))["model"]["init_args"]
    for key in ("init_from", f"{network}_ckpt"):
        if init.get(key):
            return lineage(Path(init[key]).parts[-3], network, source) + [stage]
    return [stage]


def training_steps(ckpts: dict[str, Path], stage: str, network: str) -> int:
    """Optimizer steps ``network`` took up to ``stage``: the ``global_step`` of every checkpoint of its lineage."""
    from mardini.lit.checkpoints import read_checkpoint

    return sum(int(read_checkpoint(ckpts[s])["global_step"]) for s in lineage(stage, network))

"""The training runs of ``make reproduce``: the tiny chain and the Fig. 6c pair, in the reproduction's own folder.

Stage configs are copies of ``configs/tiny/`` written under ``<out>/configs/``: the logger's ``save_dir`` and the
checkpoints one stage starts from point into ``<out>/runs/``, so nothing here touches ``outputs/tiny`` (the demo's
runs). Each stage then trains through :func:`mardini.demo.chain.run_stage` (in-process CLI; a finished stage is
reused, an interrupted one resumes). Before any training, :func:`check_reusable` compares each run folder's
``last.ckpt`` with what these configs train at this command's ``--scale`` and ``--identity-steps`` (as
``--checkpoints`` chains are compared: :func:`mardini.reproduce.demo_chain.stage_differences`), so that a run
trained with other settings is neither reused nor resumed under another schedule.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mardini.demo.chain import TINY_DIR, TINY_STAGES, StageRun, run_stage, scaled_steps, stage_settings

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


def planned_runs(configs: Path, scale: float, identity_steps: int | None, chain: bool = True) -> dict[str, int]:
    """``{run: steps}`` of the runs :func:`train_chain` (``chain``) and :func:`train_identity_pair` (with
    ``identity_steps``) train from ``configs``, the chain's as :func:`mardini.demo.chain.run_stage` computes them."""
    runs = {}
    if chain:
        for name in TINY_STAGES:
            runs[name] = scaled_steps(stage_settings(configs / "common.yaml", configs / f"{name}.yaml"), scale)
    if identity_steps is not None:
        runs.update({identity_run_name(on): identity_steps for on in (True, False)})
    return runs


def reuse_differences(configs: Path, runs: Path, planned: dict[str, int]) -> dict[str, list[str]]:
    """Run -> how its checkpoint under ``runs`` differs from what ``configs`` (:func:`prepare_configs`) train at its
    planned steps (:func:`mardini.reproduce.demo_chain.stage_differences`; one short of them resumes), for each run
    folder that holds a ``last.ckpt`` of other settings."""
    from mardini.lit.checkpoints import read_checkpoint
    from mardini.reproduce.demo_chain import stage_differences

    out = {}
    for name, steps in planned.items():
        path = runs / name / "checkpoints" / "last.ckpt"
        if path.is_file():
            diffs = stage_differences(read_checkpoint(path), name, source=configs, steps=steps, resumable=True)
            if diffs:
                out[name] = diffs
    return out


def check_reusable(configs: Path, runs: Path, planned: dict[str, int]) -> None:
    """Stop, before anything is trained, where a run folder under ``runs`` holds a checkpoint this command would reuse
    or resume although it was trained with other settings (:func:`reuse_differences`: an earlier run at another
    ``--scale`` or ``--identity-steps``, or under configs/tiny as they were then), naming what differs and the fix."""
    stale = reuse_differences(configs, runs, planned)
    if not stale:
        return
    named = "; ".join(f"{run}: {', '.join(diffs)}" for run, diffs in stale.items())
    folders = " ".join(str(runs / run) for run in stale)
    raise ValueError(
        f"{runs} holds runs trained with other settings than this command's ({named}: the checkpoint's -> this "
        "command's; an earlier run at another --scale or --identity-steps, or under other configs/tiny?), which it "
        f"would reuse or resume as its own: delete them (rm -r {folders}) to train them anew, give another --out, "
        "or run with the settings they were trained with")


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

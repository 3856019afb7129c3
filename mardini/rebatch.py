"""Rewrite a chain of stage configs for another batch size at the same clips seen (``python -m mardini.rebatch``).

    python -m mardini.rebatch configs/tiny configs/tiny_b4 --batch 4 --save-dir outputs/tiny_b4
    make train-tiny TINY_CONFIGS=configs/tiny_b4

Reads ``common.yaml`` and every stage file of ``SRC`` and writes them to ``DST`` with, for a batch of ``B'`` in
place of a stage's ``B`` (its own ``data.init_args.batch_size`` where it sets one, else ``common.yaml``'s) and
``r = B / B'``:

- ``data.init_args.batch_size: B'`` in ``common.yaml`` and in every stage that sets its own;
- ``trainer.max_steps``, ``model.init_args.warmup_steps`` and the ``step`` of every milestone of a
  ``Curriculum`` callback (or of a subclass) times ``r`` (rounded, at least 1 for the step counts): the same clips
  seen, the same learning-rate warm-up and curriculum in clips;
- ``model.init_args.ema_decay`` ``d`` -> ``1 - (1 - d) / r``: the same EMA time constant in clips once the decay
  reaches its cap. The warm-up ramp (``ema_warmup``, timm's ``1 - (1 + step)^(-2/3)``) counts steps and is not
  rescaled, so a stage that ends below the cap (every tiny stage) averages over fewer clips at a smaller batch:
  the tiny last stage ends at decay 0.9916 (about 119 steps, 950 clips) at batch 8 and 0.9947 (about 189 steps,
  760 clips) at batch 4;
- the logger's ``save_dir`` and the checkpoint paths (``init_from``, ``planner_ckpt``, ``generator_ckpt``) moved
  from the chain's save folder to ``--save-dir``, so the new chain never reads or writes the old one's runs.

Everything else (learning rate, schedules, sample grids, checkpoint interval) is kept. The files are written
without the source's comments, under a header naming the command. STUDIES.md, "Batches of 4", is what this made.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

from mardini.configs_table import NOT_STAGES, is_curriculum

CKPT_KEYS = ("init_from", "planner_ckpt", "generator_ckpt")


def _scaled(n: int, r: float) -> int:
    return max(1, round(n * r))


def _batch(cfg: dict) -> int | None:
    """``data.init_args.batch_size`` of one YAML file, or None when it sets none."""
    value = ((cfg.get("data") or {}).get("init_args") or {}).get("batch_size")
    return None if value is None else int(value)


def rebatch_stage(cfg: dict, batch: int, common_batch: int, old_dir: str, new_dir: str) -> dict:
    """One stage file's config at ``batch`` clips per step (see the module docstring); ``common_batch`` is what
    the stage trains at when it sets no batch of its own."""
    out = copy.deepcopy(cfg)
    own = _batch(out)
    r = (own or common_batch) / batch
    if own is not None:
        out["data"]["init_args"]["batch_size"] = batch
    trainer = out.get("trainer") or {}
    if "max_steps" in trainer:
        trainer["max_steps"] = _scaled(trainer["max_steps"], r)
    for cb in trainer.get("callbacks") or []:
        if is_curriculum(cb.get("class_path", "")):
            for m in (cb.get("init_args") or {}).get("milestones") or []:
                m["step"] = round(m["step"] * r)
    logger = (trainer.get("logger") or {}).get("init_args") or {}
    if "save_dir" in logger:
        logger["save_dir"] = new_dir
    args = (out.get("model") or {}).get("init_args") or {}
    for key in ("warmup_steps", "decay_steps"):  # step counts: as many clips into each phase of the LR schedule
        if isinstance(args.get(key), int):
            args[key] = round(args[key] * r)
    if "ema_decay" in args:
        args["ema_decay"] = 1 - (1 - args["ema_decay"]) / r
    prefix = old_dir.rstrip("/") + "/"
    for key in CKPT_KEYS:
        if isinstance(args.get(key), str) and args[key].startswith(prefix):
            args[key] = new_dir.rstrip("/") + "/" + args[key][len(prefix):]
    return out


def chain_save_dir(stages: dict[str, dict]) -> str:
    """The logger ``save_dir`` the chain's stages share (their checkpoints live under it)."""
    dirs = {((c.get("trainer") or {}).get("logger") or {}).get("init_args", {}).get("save_dir") for c in stages.values()}
    dirs.discard(None)
    if len(dirs) != 1:
        raise ValueError(f"the chain's stages do not share one logger save_dir (found {sorted(dirs)}); "
                         "rebatch needs one folder to move their checkpoints from")
    return dirs.pop()


def rebatch_chain(src: Path, dst: Path, batch: int, save_dir: str, force: bool = False) -> list[Path]:
    """Write ``src``'s chain rescaled to ``batch`` into ``dst``; returns the files written."""
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    common_path = src / "common.yaml"
    if not common_path.is_file():
        raise FileNotFoundError(f"{common_path} not found: SRC must be a chain folder with common.yaml and its "
                                "stage files (e.g. configs/tiny)")
    if src.resolve() == dst.resolve():
        raise ValueError("DST must differ from SRC: the rebatched chain is written beside the original")
    common = yaml.safe_load(common_path.read_text(encoding="utf-8"))
    old_batch = _batch(common)
    if old_batch is None:
        raise ValueError(f"{common_path} has no data.init_args.batch_size to rescale from")
    stage_paths = sorted(p for p in src.glob("*.yaml") if p.name not in NOT_STAGES)
    if not stage_paths:
        raise FileNotFoundError(f"no stage files (*.yaml besides common.yaml) in {src}")
    stages = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in stage_paths}
    old_dir = chain_save_dir(stages)
    if save_dir.rstrip("/") == old_dir.rstrip("/"):
        raise ValueError(f"--save-dir {save_dir} is the chain's own; pick another so the runs stay apart")
    targets = [dst / "common.yaml"] + [dst / name for name in stages]
    if not force and any(t.exists() for t in targets):
        raise FileExistsError(f"{dst} already holds some of these files; pass --force to overwrite them")
    header = (f"# Written by `python -m mardini.rebatch {src} {dst} --batch {batch} --save-dir {save_dir}`: "
              f"{src}/ at batch {batch} (was {old_batch}), the same clips seen.\n")
    # ASCII (a non-ASCII path escaped; safe_dump escapes values): train.py's LightningCLI reads a config in the
    # locale's encoding (cp1252 on Windows), so a UTF-8 comment it could not decode stopped the fit
    header = header.encode("ascii", "backslashreplace").decode("ascii")
    new_common = copy.deepcopy(common)
    new_common["data"]["init_args"]["batch_size"] = batch
    dst.mkdir(parents=True, exist_ok=True)
    targets[0].write_text(header + yaml.safe_dump(new_common, sort_keys=False), encoding="utf-8")
    for (name, cfg), target in zip(stages.items(), targets[1:]):
        stage = rebatch_stage(cfg, batch, old_batch, old_dir, save_dir)
        target.write_text(header + yaml.safe_dump(stage, sort_keys=False), encoding="utf-8")
    return targets


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="chain folder (common.yaml + stage files), e.g. configs/tiny")
    p.add_argument("dst", type=Path, help="folder for the rewritten chain")
    p.add_argument("--batch", type=int, required=True,
                   help="the new GLOBAL batch (data.batch_size); any world size up to it runs it, evenly or not")
    p.add_argument("--save-dir", required=True, help="logger save_dir of the new chain (its runs and checkpoints)")
    p.add_argument("--force", action="store_true", help="overwrite files already in DST")
    a = p.parse_args(argv)
    try:
        written = rebatch_chain(a.src, a.dst, a.batch, a.save_dir, a.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"rebatch: {e}")
    print(f"wrote {len(written)} files to {a.dst}/; train them with "
          f"`make train-tiny TINY_CONFIGS={a.dst}` or stage by stage with train.py")
    return written


if __name__ == "__main__":
    main()

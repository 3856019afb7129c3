"""Tables of the shipped stage configs, read from the YAML files themselves (so the docs cannot drift from them).

    python -m mardini.configs_table                              # one row per trained model: README's "Configs"
    python -m mardini.configs_table --chain configs/paper/mardini-s   # one row per stage of a chain

Without ``--chain`` it reads the shipped chains of the checkout (beside the package, from any folder).

Parameter counts come from building each stage's networks on the meta device (no memory, no weights) with the
stage's size and overrides, so they are the networks the stage trains (planner without its warm-up projection head
in joint stages). Latent channels: ``3 f^2`` for the space-to-depth autoencoder, the size's default (16, the
paper's VAE) for any other. The global batch is the clips of an optimiser step: ``data.batch_size`` (one batch over
all ranks) times ``trainer.accumulate_grad_batches``; clips seen = steps x global batch. The EMA decay a stage ends
at is timm's warm-up rule at its last step (``ema_warmup``), capped at ``ema_decay``: a stage shorter than the ramp
never reaches its cap.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import yaml
from timm.utils.model_ema import ModelEmaV3

from mardini.checkout import ROOT, repo_path
from mardini.class_paths import import_class_path
from mardini.lit.base import MarDiniBase
from mardini.models import build_generator, build_planner
from mardini.models.registry import generator_overrides

CHAINS = ("configs/tiny", "configs/paper/mardini-s", "configs/paper/mardini-l")
TRAINS = {"GenerationModule": "generator", "PlanningModule": "planner", "MarDiniModule": "both"}
NOT_STAGES = {"common.yaml", "cluster.yaml", "fsdp.yaml"}
_DEFAULTS = inspect.signature(MarDiniBase.__init__).parameters  # what a stage gets for a key it leaves out
_DEFAULT_LOW = _DEFAULTS["planner_resolution"].default
_DEFAULT_KEEP = _DEFAULTS["keep_ratio"].default
_DEFAULT_EMA = (_DEFAULTS["ema_decay"].default, _DEFAULTS["ema_warmup"].default)


@dataclass
class Stage:
    """What one stage YAML trains, on what data, for how long."""

    path: Path
    trains: str  # generator | planner | both
    size: str
    planner: tuple[int, int, float]  # width, depth, parameters
    generator: tuple[int, int, str, float]  # width, depth, attention, parameters
    frames: int
    fps: float | None
    resolution: int
    planner_resolution: int
    kept: str  # kept fraction at the start of the stage (-> at its end, with a Curriculum callback)
    batch: int  # data.batch_size: one batch's clips over all ranks
    steps: int
    accelerator: str
    ema: tuple[float, float]  # (the EMA decay at the stage's last step, its cap ``ema_decay``)
    title: str = ""  # the file's first comment line
    accumulate: int = 1  # trainer.accumulate_grad_batches: batches per optimiser step

    @property
    def step_clips(self) -> int:
        """Clips per optimiser step over all ranks (the global batch)."""
        return self.batch * self.accumulate

    @property
    def clips(self) -> int:
        return self.steps * self.step_clips


def _merge(base: dict, top: dict) -> dict:
    """Deep merge as LightningCLI reads several ``--config`` files; a new ``class_path`` resets ``init_args``."""
    out = dict(base)
    for key, value in top.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("class_path", old.get("class_path")) == \
                old.get("class_path"):
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def _load(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    common = path.parent / "common.yaml"
    if common.exists() and path.name != "common.yaml":
        cfg = _merge(yaml.safe_load(common.read_text(encoding="utf-8")) or {}, cfg)
    return cfg


def _latent_channels(autoencoder: dict | None) -> int | None:
    """Latent channels of the stage's autoencoder when known without weights (space-to-depth), else None."""
    if autoencoder and str(autoencoder.get("class_path", "")).endswith("SpaceToDepthAutoencoder"):
        f = int((autoencoder.get("init_args") or {}).get("downsample", 2))
        return 3 * f * f
    return None


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_curriculum(class_path: Any) -> bool:
    """True when a callback's ``class_path`` names :class:`~mardini.lit.curriculum.Curriculum` or a subclass of it
    (imported to check, as the CLI would import it); a path that does not import is judged by its name."""
    from mardini.lit.curriculum import Curriculum

    try:
        cls = import_class_path(class_path)
    except Exception:  # noqa: BLE001 -- no module part, not importable, or a user module failing as it imports
        return str(class_path).endswith("Curriculum")
    return isinstance(cls, type) and issubclass(cls, Curriculum)


def kept_fraction(model: dict, callbacks: list | None) -> str:
    """The kept fraction the stage starts with, and where a Curriculum callback's milestones take it."""
    ranges = [list(model.get("keep_ratio", _DEFAULT_KEEP))]
    for cb in callbacks or []:
        if is_curriculum(cb.get("class_path", "")):
            steps = (cb.get("init_args") or {}).get("milestones") or []
            ranges += [m["keep_ratio"] for m in steps if "keep_ratio" in m]
    start, end = (ranges[1] if len(ranges) > 1 else ranges[0]), ranges[-1]

    def fmt(r):
        return f"{100 * r[0]:g}-{100 * r[1]:g} %"

    return fmt(start) if end == start else f"{fmt(start)} -> {fmt(end)}"


def ema_decay_reached(steps: int, decay: float, warmup: bool) -> float:
    """The EMA decay of a stage's last update after ``steps`` steps: timm's rule, as :class:`MarDiniBase` builds its
    EMA (with ``warmup`` the decay ramps up with the step and is capped at ``decay``)."""
    return ModelEmaV3(torch.nn.Linear(1, 1), decay=decay, use_warmup=warmup).get_decay(steps)


def _title(path: Path) -> str:
    """The stage file's first line when it is a comment (``# ... -> MarDini-x/ST-512``), else ''."""
    first = (path.read_text(encoding="utf-8").splitlines() or [""])[0]
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def stage_networks(args: dict, joint: bool, adjust: Callable[[str, dict], dict] | None = None) -> tuple[Any, Any]:
    """The planner and generator a stage's ``model.init_args`` (``args``) builds, on the default device (counts:
    under ``torch.device("meta")``); a ``joint`` stage's planner without the warm-up's projection head unless it sets
    ``plan_recon_weight`` (as MarDiniModule does). ``adjust(network, overrides)`` returns the overrides a network is
    built with (``mardini.sizing`` narrows the widths and sets the depth)."""
    size = args.get("size", "tiny")
    adjust = adjust or (lambda network, over: over)
    channels = _latent_channels(args.get("autoencoder"))
    extra = {} if channels is None else {"in_channels": channels}
    p_over = adjust("planner", {**extra, **(args.get("planner") or {})})
    g_over = adjust("generator", {**extra, **generator_overrides(size, args.get("planner"), args.get("generator"),
                                                                 with_planner=joint)})
    planner, generator = build_planner(size, **p_over), build_generator(size, **g_over)
    if joint and not args.get("plan_recon_weight", 0.0):
        planner.drop_head()
    return planner, generator


def read_stage(path: str | Path) -> Stage:
    """Read one stage YAML (merged after ``common.yaml`` when the folder has one) into a :class:`Stage`."""
    path = Path(path)
    cfg = _load(path)
    model, data, trainer = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("trainer") or {}
    kind = str(model.get("class_path", "")).rsplit(".", 1)[-1]
    if kind not in TRAINS:
        raise ValueError(f"{path}: model.class_path {model.get('class_path')!r} is not a MarDini stage module "
                         f"({', '.join(TRAINS)}); is this a stage config?")
    args, dargs = model.get("init_args") or {}, data.get("init_args") or {}
    size = args.get("size", "tiny")
    with torch.device("meta"):
        planner, generator = stage_networks(args, joint=kind == "MarDiniModule")
    pc, gc = planner.cfg, generator.cfg
    return Stage(
        path=path, trains=TRAINS[kind], size=size,
        planner=(pc.dim, pc.depth, float(_count(planner))),
        generator=(gc.dim, gc.depth, gc.attention, float(_count(generator))),
        frames=int(args.get("frames") or dargs.get("frames") or 0), fps=dargs.get("fps"),
        resolution=int(dargs.get("resolution", 0)),
        planner_resolution=int(args.get("planner_resolution", _DEFAULT_LOW)),
        kept=kept_fraction(args, trainer.get("callbacks")), batch=int(dargs.get("batch_size", 1)),
        steps=int(trainer.get("max_steps", 0)), accelerator=str(trainer.get("accelerator", "gpu")),
        ema=_ema(args, int(trainer.get("max_steps", 0))), title=_title(path),
        accumulate=_accumulate(trainer, path),
    )


def _accumulate(trainer: dict, path: Path) -> int:
    """``trainer.accumulate_grad_batches`` of a stage: 1 unless set; a scheduler's dict is refused (by epoch)."""
    value = trainer.get("accumulate_grad_batches", 1)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: trainer.accumulate_grad_batches={value!r}: the tables need a positive integer "
                         "(the batches of every optimiser step)")
    return value


def _ema(args: dict, steps: int) -> tuple[float, float]:
    cap = float(args.get("ema_decay", _DEFAULT_EMA[0]))
    return ema_decay_reached(steps, cap, bool(args.get("ema_warmup", _DEFAULT_EMA[1]))), cap


def _ema_text(ema: tuple[float, float]) -> str:
    reached, cap = ema
    return f"{cap:g}" if reached >= cap else f"{reached:.4f} (cap {cap:g})"


def read_chain(folder: str | Path) -> list[Stage]:
    """Every stage YAML of a chain folder, in file order (``01_...`` first)."""
    folder = Path(folder)
    paths = sorted(p for p in folder.glob("*.yaml") if p.name not in NOT_STAGES)
    if not paths:
        raise FileNotFoundError(f"no stage YAML in {folder}; pass a folder like configs/tiny")
    return [read_stage(p) for p in paths]


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _clips(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _batch(s: Stage) -> str:
    """The global batch; under gradient accumulation with its batch and count (``1024 (512 x 2)``)."""
    return str(s.batch) if s.accumulate == 1 else f"{s.step_clips} ({s.batch} x {s.accumulate})"


def chain_table(stages: list[Stage]) -> str:
    """Markdown table, one row per stage."""
    rows = ["| stage | trains | planner (width x depth, params) | generator (width x depth, attention, params) "
            "| frames | px (generator / planner) | kept fraction | global batch | steps | clips seen | EMA decay at the end |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in stages:
        pw, pd, pn = s.planner
        gw, gd, ga, gn = s.generator
        planner = f"{pw} x {pd}, {_params(pn)}" if s.trains != "generator" else "-"
        generator = f"{gw} x {gd}, {ga.upper()}, {_params(gn)}" if s.trains != "planner" else "-"
        rows.append(f"| `{s.path.stem}` | {s.trains} | {planner} | {generator} | {s.frames} | "
                    f"{s.resolution} / {s.planner_resolution} | {s.kept} | {_batch(s)} | {s.steps} | "
                    f"{_clips(s.clips)} | {_ema_text(s.ema)} |")
    return "\n".join(rows)


def model_rows(stages: list[Stage]) -> list[dict]:
    """The final model of each generator attention a chain trains: the last stage whose title names a model
    (``-> MarDini-x/ST-512``), or the chain's last stage, per attention type. ``clips`` counts every stage up to it."""
    named = [i for i, s in enumerate(stages) if "-> MarDini" in s.title] + [len(stages) - 1]
    last = {stages[i].generator[2]: i for i in sorted(set(named)) if stages[i].trains == "both"}
    out = []
    for i in sorted(last.values()):
        s = stages[i]
        name = s.size
        if s.size.startswith("mardini-"):  # the paper's names: MarDini-S/ST-512, MarDini-L/T-1024 ...
            name = f"MarDini-{s.size.split('-')[1].split('/')[0].upper()}/{s.generator[2].upper()}-{s.resolution}"
        out.append({"model": name, "stages": f"`{_rel(s.path.parent)}/` {stages[0].path.stem[:2]}-{s.path.stem[:2]}",
                    "last": s, "clips": sum(x.clips for x in stages[: i + 1])})
    return out


def summary_table(chains: list[list[Stage]]) -> str:
    """Markdown table, one row per model the chains produce (their last stage's networks and data)."""
    rows = ["| model | stages | planner (width x depth, params) | generator (width x depth, attention, params) "
            "| frames | px (generator / planner) | clips seen in all | runs on |",
            "|---|---|---|---|---|---|---|---|"]
    for stages in chains:
        for r in model_rows(stages):
            s = r["last"]
            pw, pd, pn = s.planner
            gw, gd, ga, gn = s.generator
            where = "CPU, 2 cores" if s.accelerator == "cpu" else "GPUs (`configs/paper/cluster.yaml` or `fsdp.yaml`)"
            rows.append(f"| {r['model']} | {r['stages']} | {pw} x {pd}, {_params(pn)} | "
                        f"{gw} x {gd}, {ga.upper()}, {_params(gn)} | {s.frames} | "
                        f"{s.resolution} / {s.planner_resolution} | {_clips(r['clips'])} | {where} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", action="append", help="a chain folder (repeatable); default: the shipped chains")
    p.add_argument("--stages", action="store_true", help="one row per stage (default with a single --chain)")
    a = p.parse_args(argv)
    folders = a.chain or [repo_path(c) for c in CHAINS]  # the checkout's, from any folder
    chains = [read_chain(f) for f in folders]
    if a.stages or a.chain and len(a.chain) == 1:
        text = "\n\n".join(chain_table(c) for c in chains)
    else:
        text = summary_table(chains)
    print(text)
    return text


if __name__ == "__main__":
    from mardini.user_errors import run_reporting_user_errors

    raise SystemExit(run_reporting_user_errors("python -m mardini.configs_table", main))

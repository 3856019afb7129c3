"""Named model sizes and the two factories every stage calls: ``build_planner`` and ``build_generator``.

Paper sizes follow PAPER.md Table 1 (depth, hidden width, MLP width). Head counts are not in the paper;
we choose head dim 128 for the planner (32 heads at 4096) and 64 for the generator (16 heads at 1024).
"""

from __future__ import annotations

import numbers
import typing
from dataclasses import dataclass, field, fields, replace

from mardini.models.rope import check_rope_bands

# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def _check_common(name: str, cfg) -> None:
    for key in ("dim", "depth", "heads", "mlp_hidden", "patch_size", "in_channels"):
        if int(getattr(cfg, key)) < 1:
            raise ValueError(f"{name}.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.dim % cfg.heads:
        raise ValueError(f"{name}.dim={cfg.dim} is not divisible by heads={cfg.heads}; pick heads dividing dim")
    head_dim = cfg.dim // cfg.heads
    if head_dim % 2 or head_dim < 6:
        raise ValueError(
            f"{name} head dim dim/heads = {head_dim} must be even and >= 6 for the 3-D RoPE "
            "(one frequency pair per axis t, h, w); use fewer heads"
        )
    check_rope_bands(cfg.rope_theta, cfg.rope_max_freq, prefix=f"{name}.rope_")
    if not isinstance(cfg.abs_pos, bool):
        raise ValueError(f"{name}.abs_pos must be true or false, got {cfg.abs_pos!r}")


@dataclass
class PlannerConfig:
    """Planning model (MAR). ``mlp_hidden`` is the SwiGLU hidden width (Table 1's "MLP")."""

    dim: int
    depth: int
    heads: int
    mlp_hidden: int
    patch_size: int = 1
    in_channels: int = 16
    identity_scope: str = "frame"  # a reference token attends to its own frame ("frame") or itself ("token")
    qk_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_freq: float = 1.0  # radians per position of the fastest RoPE band (see AxialRope3d)
    abs_pos: bool = False  # add fixed sin-cos (t, y, x) features to the tokens (layers.position_features)
    checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_common("PlannerConfig", self)
        if self.identity_scope not in ("frame", "token"):
            raise ValueError(f"PlannerConfig.identity_scope must be 'frame' or 'token', got {self.identity_scope!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass
class GeneratorConfig:
    """Generation model (DM). ``plan_dim`` must equal the planner's ``dim`` (the stages default it to that, see
    :func:`generator_overrides`); ``mlp_hidden`` is the GELU MLP width."""

    dim: int
    depth: int
    heads: int
    mlp_hidden: int
    plan_dim: int
    patch_size: int = 1
    in_channels: int = 16
    attention: str = "st"  # "st": spatio-temporal, "t": temporal-only (same weights)
    cross_attention: str = "frame"  # "frame": a frame reads its own plan tokens; "all": all frames' tokens
    identity_attention: bool = True  # False: plain full attention in the temporal layers (Fig. 6c ablation)
    cross_rope: bool = True  # RoPE on cross-attention too (Fig. 2: "PosEmb" on every attention); False: a bag of plans
    cross_rope_grid: str = "centre"  # a plan token's place among the generator tokens it covers; "corner": before 2026-12-06
    plan_norm: str = "none"  # "center": remove the plan's per-clip mean token and scale its spread to unit RMS
    qk_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_freq: float = 1.0  # radians per position of the fastest RoPE band (see AxialRope3d)
    freq_dim: int = 256  # sinusoidal timestep features
    time_scale: float = 1000.0  # the embedding sees time_scale * t, t in [0, 1]
    abs_pos: bool = False  # add fixed sin-cos (t, y, x) features to the tokens (layers.position_features)
    self_cond: bool = False  # also read the previous step's x0 estimate (self-conditioning, Chen et al. 2022)
    checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_common("GeneratorConfig", self)
        if not isinstance(self.self_cond, bool):
            raise ValueError(f"GeneratorConfig.self_cond must be true or false, got {self.self_cond!r}")
        if self.plan_dim < 1:
            raise ValueError(f"GeneratorConfig.plan_dim must be >= 1, got {self.plan_dim}")
        if self.attention not in ("st", "t"):
            raise ValueError(f"GeneratorConfig.attention must be 'st' or 't', got {self.attention!r}")
        if not isinstance(self.cross_rope, bool):
            raise ValueError(f"GeneratorConfig.cross_rope must be true or false, got {self.cross_rope!r}")
        if self.cross_rope_grid not in ("centre", "corner"):
            raise ValueError(f"GeneratorConfig.cross_rope_grid must be 'centre' or 'corner', got {self.cross_rope_grid!r}")
        if not isinstance(self.identity_attention, bool):
            raise ValueError(f"GeneratorConfig.identity_attention must be true or false, got {self.identity_attention!r}")
        if self.plan_norm not in ("none", "center"):
            raise ValueError(f"GeneratorConfig.plan_norm must be 'none' or 'center', got {self.plan_norm!r}")
        if self.cross_attention not in ("frame", "all"):
            raise ValueError(
                f"GeneratorConfig.cross_attention must be 'frame' or 'all', got {self.cross_attention!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class ModelSize:
    """A named pair of configs; ``frames`` is the clip window of the paper configuration (info only: a
    checkpoint that records no window falls back to it, with a warning, when loaded for sampling)."""

    planner: PlannerConfig
    generator: GeneratorConfig
    frames: int | None = None
    note: str = ""
    paper_params: dict = field(default_factory=dict)  # Table 1 counts, for reports


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------


def _paper(planner_depth: int, planner_mlp: int, attention: str, frames: int, planner_params: float) -> ModelSize:
    return ModelSize(
        planner=PlannerConfig(dim=4096, depth=planner_depth, heads=32, mlp_hidden=planner_mlp),
        generator=GeneratorConfig(dim=1024, depth=8, heads=16, mlp_hidden=4096, plan_dim=4096, attention=attention),
        frames=frames,
        note="PAPER.md Table 1; heads chosen here (head dim 128 planner, 64 generator)",
        paper_params={"planner": planner_params, "generator": 288e6},
    )


# 8x8-16x16 token grids: faster, closer RoPE bands so attention can single out a neighbour (AxialRope3d)
_SMALL_GRID_ROPE = {"rope_theta": 16.0, "rope_max_freq": 2.5}

MODEL_SIZES: dict[str, ModelSize] = {
    # CPU sizes: SpaceToDepth(2) latents, 12 channels; generator 16x16 (32 px), planner 8x8 (16 px)
    "tiny": ModelSize(
        planner=PlannerConfig(dim=128, depth=2, heads=4, mlp_hidden=256, in_channels=12, **_SMALL_GRID_ROPE),
        generator=GeneratorConfig(dim=96, depth=2, heads=4, mlp_hidden=384, plan_dim=128, in_channels=12,
                                  **_SMALL_GRID_ROPE),
        frames=4,
        note="trains on 2 CPU cores in minutes",
    ),
    "small": ModelSize(
        planner=PlannerConfig(dim=512, depth=8, heads=8, mlp_hidden=1536),
        generator=GeneratorConfig(dim=384, depth=8, heads=6, mlp_hidden=1536, plan_dim=512),
        frames=9,
        note="a few tens of M parameters per network, for one GPU",
    ),
    "mardini-s/st": _paper(8, 4096, "st", 9, 1.3e9),
    "mardini-l/st": _paper(16, 8192, "st", 9, 3.1e9),
    "mardini-s/t": _paper(8, 4096, "t", 17, 1.3e9),
    "mardini-l/t": _paper(16, 8192, "t", 17, 3.1e9),
}


def list_sizes() -> list[str]:
    """Registered size names."""
    return list(MODEL_SIZES)


class UnknownSize(KeyError, ValueError):
    """A size name that is not registered: a ``KeyError`` (a failed look-up) and a ``ValueError`` (a setting the
    scripts report in one line; ``train.py`` printed a bare ``KeyError`` quoted and "raised at" jsonargparse)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # KeyError's would quote the message


def get_size(size: str) -> ModelSize:
    """The :class:`ModelSize` of a name (case-insensitive); :class:`UnknownSize` naming the registered ones."""
    key = str(size).lower()
    if key not in MODEL_SIZES:
        raise UnknownSize(f"unknown model size {size!r}; registered sizes: {list_sizes()}")
    return MODEL_SIZES[key]


def same_weights(a: str, b: str, networks: tuple[str, ...] = ("planner", "generator")) -> bool:
    """True when sizes ``a`` and ``b`` hold the same weights of ``networks``: equal, or registered sizes that differ
    only in the generator's attention (ST or T: one set of weights), the window (e.g. ``mardini-s/st`` and
    ``mardini-s/t``) and networks not named (the generator of ``mardini-s/st`` and ``mardini-l/st`` is one), so a
    stage of one can start from a checkpoint of the other. Case-insensitive, like :func:`get_size`."""
    a, b = str(a).lower(), str(b).lower()
    if a == b:
        return True
    if a not in MODEL_SIZES or b not in MODEL_SIZES:
        return False
    sa, sb = MODEL_SIZES[a], MODEL_SIZES[b]
    planner = "planner" not in networks or sa.planner == sb.planner
    generator = "generator" not in networks or replace(sa.generator, attention=sb.generator.attention) == sb.generator
    return planner and generator


def _override(cfg, overrides: dict, what: str):
    allowed = [f.name for f in fields(cfg)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} config field(s) {unknown}; allowed fields: {allowed}")
    _check_override_types(type(cfg), overrides, what)
    return replace(cfg, **overrides)  # re-runs __post_init__ validation


# what a network config field of each annotated type takes: an int field no float or bool, a float one any number
FIELD_KINDS = {
    int: ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _check_override_types(cls, overrides: dict, what: str) -> None:
    """Refuse an override whose value is not of its field's type, naming the field: the network dicts are free-form
    in the configs, so ``depth: three`` or ``depth: 2.5`` failed deep inside torch and ``qk_norm: "no"`` (a truthy
    string) was taken as true."""
    hints = typing.get_type_hints(cls)
    for key, value in overrides.items():
        kind, fits = FIELD_KINDS.get(hints[key], (None, None))
        if fits is not None and not fits(value):
            raise ValueError(f"model.init_args.{what}.{key}={value!r} must be {kind} (a {cls.__name__} field); "
                             f"fix the value in the config or the --model.init_args.{what}.{key} override")


def planner_config(size: str, **overrides) -> PlannerConfig:
    """The planner config of ``size`` with fields replaced by ``overrides``."""
    return _override(get_size(size).planner, overrides, "planner")


def generator_config(size: str, **overrides) -> GeneratorConfig:
    """The generator config of ``size`` with fields replaced by ``overrides``."""
    return _override(get_size(size).generator, overrides, "generator")


def generator_overrides(size: str, planner: dict | None = None, generator: dict | None = None,
                        with_planner: bool = True) -> dict:
    """A stage's ``generator`` overrides with ``plan_dim`` defaulting to the width of the planner that ``size`` and
    the ``planner`` overrides build (the generator reads that planner's tokens).

    A ``plan_dim`` that differs from that width raises when the stage has a planner (``with_planner``: the joint
    stages) or sets the planner's ``dim`` (a generation warm-up configured for a later joint stage).
    """
    over = dict(generator or {})
    planner = dict(planner or {})
    dim = int(planner.get("dim", get_size(size).planner.dim))
    if "plan_dim" not in over:
        over["plan_dim"] = dim
    elif int(over["plan_dim"]) != dim and (with_planner or "dim" in planner):
        where = "model.init_args.planner.dim" if "dim" in planner else f"size {size!r}"
        raise ValueError(
            f"model.init_args.generator.plan_dim={over['plan_dim']} differs from the planner's dim {dim} ({where}): "
            f"the generator reads the planner's tokens; leave generator.plan_dim out (it follows the planner's dim) "
            f"or set it to {dim}"
        )
    return over


# --------------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------------


def build_planner(size: str, **overrides):
    """A :class:`~mardini.models.planner.Planner` of a registered size: ``build_planner("tiny", in_channels=12)``."""
    from mardini.models.planner import Planner

    return Planner(planner_config(size, **overrides))


def build_generator(size: str, **overrides):
    """A :class:`~mardini.models.generator.Generator` of a registered size; ``attention='t'`` for /T."""
    from mardini.models.generator import Generator

    return Generator(generator_config(size, **overrides))

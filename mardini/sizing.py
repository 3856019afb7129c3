"""Per-GPU memory of a stage before booking GPUs: exact model-state bytes, measured and extrapolated activations.

    python -m mardini.sizing --config configs/paper/mardini-l/05_joint_model.yaml --world-size 256

Model states (exact, from the stage's networks built on the meta device, as ``mardini.configs_table`` counts them):
each trainable parameter holds 20 bytes in training -- fp32 weight 4, fp32 gradient 4, AdamW's two fp32 moments 8,
its fp32 EMA copy 4 (``MarDiniBase.ema``, of the trainable networks) -- stored per GPU under each FSDP
``sharding_strategy`` (``configs/paper/fsdp.yaml``; DDP stores as ``NO_SHARD``), with W ranks and G GPUs per node:
``20 P`` (``NO_SHARD``), ``20 P / W`` (``SHARD_GRAD_OP``, ``FULL_SHARD``), ``20 P / G`` (``HYBRID_SHARD``: sharded
within a node, replicated across nodes). Under ``bf16-mixed`` (every stage's precision) the forward and backward
also hold bf16 copies of the weights: all of them (``2 P``) from the forward to the end of the backward under
``NO_SHARD`` (DDP: autocast's casts, saved for the backward) and ``SHARD_GRAD_OP``; under ``FULL_SHARD`` and
``HYBRID_SHARD`` the units being gathered, counted as two of the largest block (the one computing, the one
prefetched: ``2 x 2 B``).

The frozen autoencoder (:mod:`mardini.sizing_autoencoder`): its parameters, a full copy on every rank, and where
frames are encoded on the fly (no latent cache) the temporaries of one encoder call at the stage's resolution,
measured and extrapolated in pixels. The CUDA context is not counted.

Activations (measured, then extrapolated): the bytes autograd saves for the backward in one clip's fp32 training
forward of the stage's networks (``torch.autograd.graph.saved_tensors_hooks``, each storage once, the weights left
out), measured on the CPU at width ``D / k`` (heads and MLP widths ``/ k``, head dims kept) and tokens per frame
``/ m`` (resolution ``/ sqrt(m)``), at the stage's frames, at depth 1 and 2 of each network; the mask gives frame 0 and
generates the rest (the most generated tokens). With ``A1``, ``A2`` the bytes at depth 1 and 2, a network of depth L
saves ``(A1 + (L - 1) (A2 - A1)) k m`` bytes per clip: linear in depth, width and tokens, which holds for
flash-style attention (no ``tokens^2`` term: torch's CPU SDPA saves what flash-attn saves) and ignores the small terms
that do not grow with the width (RoPE tables, masks). bf16-mixed saves the matmul inputs in bf16, so it saves less,
down to about half of this fp32 figure. With ``checkpointing: true`` (measured the same way, the checkpointed blocks
saving their inputs) a network keeps one block input ``(tokens, D)`` per block, and the backward adds one block's
saved bytes while it recomputes it: ``(C1 + (L - 1) (C2 - C1) + A2 - A1) k m``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mardini.configs_table import TRAINS, _latent_channels, _load, stage_networks
from mardini.data.batch_split import check_split, largest_rank_batch
from mardini.models.registry import get_size
from mardini.sizing_autoencoder import AutoencoderSize, autoencoder_size

BYTES_PER_TRAINED_PARAM = {"weight": 4, "gradient": 4, "adamw": 8, "ema": 4}  # fp32 each
STRATEGIES = ("NO_SHARD", "SHARD_GRAD_OP", "FULL_SHARD", "HYBRID_SHARD")
GB = 1e9


@dataclass
class StageShape:
    """What a stage trains and on what: its networks' settings, clips, frames and latent sizes."""

    kind: str  # generator | planner | both
    size: str
    args: dict  # the stage's model.init_args
    channels: int
    frames: int
    latent: int  # generator latent side
    latent_low: int  # planner latent side
    batch: int  # global
    checkpointing: dict  # network -> bool
    planner_head: bool = False  # a joint stage keeps the warm-up head only with plan_recon_weight
    resolution: int = 0  # pixel side of the training frames
    cached: bool = False  # trains on a latent cache (data.latents): the autoencoder encodes nothing


def read_shape(path: str | Path) -> StageShape:
    """A stage YAML (merged after its folder's ``common.yaml``) as a :class:`StageShape`."""
    cfg = _load(Path(path))
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    kind = TRAINS.get(str(model.get("class_path", "")).rsplit(".", 1)[-1])
    if kind is None:
        raise ValueError(f"{path}: model.class_path {model.get('class_path')!r} is not a MarDini stage module; pass a "
                         "stage YAML such as configs/paper/mardini-l/05_joint_model.yaml")
    args, dargs = model.get("init_args") or {}, data.get("init_args") or {}
    size = args.get("size", "tiny")
    ae = args.get("autoencoder")
    down = int(((ae or {}).get("init_args") or {}).get("downsample", 2)) if _latent_channels(ae) else 8
    channels = _latent_channels(ae) or get_size(size).planner.in_channels
    planner, generator = args.get("planner") or {}, args.get("generator") or {}
    return StageShape(kind=kind, size=size, args=args, channels=channels,
                      frames=int(args.get("frames") or _data_setting(dargs, "frames", path)),
                      latent=_side(dargs, path) // down,
                      latent_low=int(args.get("planner_resolution", 16)) // down,
                      batch=int(_data_setting(dargs, "batch_size", path)),
                      checkpointing={"planner": bool(planner.get("checkpointing")),
                                     "generator": bool(generator.get("checkpointing"))},
                      planner_head=kind == "planner" or bool(args.get("plan_recon_weight", 0.0)),
                      resolution=_side(dargs, path), cached=bool(dargs.get("latents", False)))


def _data_setting(dargs: dict, key: str, path: str | Path):
    """``data.init_args.<key>`` of the stage, or ``VideoDataModule``'s default where the config leaves it out (what
    the fit reads then); an explicit null is an error naming the key and the fix."""
    from mardini.data.datamodule import VideoDataModule

    if key not in dargs:
        return inspect.signature(VideoDataModule).parameters[key].default
    if dargs[key] is None:
        raise ValueError(f"{path}: data.init_args.{key} is null; set it to the stage's {key} (data/README.md lists "
                         "the DataModule's arguments)")
    return dargs[key]


def _side(dargs: dict, path: str | Path) -> int:
    """The stage's square pixel side (``data.init_args.resolution``: an int or a square ``[H, W]``)."""
    value = _data_setting(dargs, "resolution", path)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path}: data.init_args.resolution {value!r} is not one pixel side: the sizing measures "
                         "square frames; size the stage with a config of your own at the square side of as many "
                         "pixels (e.g. 48 for [36, 64])")
    return value


def build_trained(shape: StageShape, k: int = 1, depth: int | None = None, device: str = "meta",
                  checkpointing: bool = False) -> dict[str, nn.Module]:
    """The networks the stage trains (a joint stage's planner without its warm-up head), width ``/ k``, at ``depth``
    (None: the stage's); on ``device``, fp32, with activation ``checkpointing`` or without."""
    sz = get_size(shape.size)

    def scaled(network: str, over: dict) -> dict:
        cfg = getattr(sz, network)
        out = {**over, "checkpointing": checkpointing, "in_channels": shape.channels}
        widths = ("dim", "heads", "mlp_hidden") + (("plan_dim",) if network == "generator" else ())  # the planner's
        for key in widths:
            out[key] = int(over.get(key, getattr(cfg, key))) // k
        if depth is not None:
            out["depth"] = depth
        return out

    with torch.device(device):
        planner, generator = stage_networks(shape.args, joint=shape.kind == "both", adjust=scaled)
    return {name: net for name, net in (("planner", planner), ("generator", generator))
            if shape.kind in (name, "both")}


def trained_parameters(shape: StageShape) -> dict[str, int]:
    """Parameters of each network the stage trains, exact (built on the meta device)."""
    return {name: sum(p.numel() for p in net.parameters()) for name, net in build_trained(shape).items()}


def state_bytes(params: int, strategy: str, world: int, per_node: int) -> float:
    """Bytes per GPU of the fp32 weights, gradients, AdamW moments and EMA of ``params`` trained parameters stored
    under an FSDP ``strategy`` (module docstring)."""
    full = params * sum(BYTES_PER_TRAINED_PARAM.values())
    shards = {"NO_SHARD": 1, "SHARD_GRAD_OP": world, "FULL_SHARD": world, "HYBRID_SHARD": min(per_node, world)}
    if strategy not in shards:
        raise ValueError(f"sharding strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    return full / shards[strategy]


def bf16_weight_bytes(params: int, block: int, strategy: str) -> float:
    """Bytes per GPU of the bf16 weight copies a ``bf16-mixed`` step holds under ``strategy``: every weight
    (``NO_SHARD``, ``SHARD_GRAD_OP``) or two units of ``block`` parameters (the largest block) in flight."""
    return 2.0 * (params if strategy in ("NO_SHARD", "SHARD_GRAD_OP") else 2 * block)


def largest_block(shape: StageShape) -> int:
    """Parameters of the largest transformer block of the trained networks (one FSDP unit of fsdp.yaml's policy)."""
    return max(sum(p.numel() for p in net.blocks[0].parameters()) for net in build_trained(shape).values())


def saved_bytes(fn, params: list[nn.Parameter]) -> int:
    """Bytes of the tensors autograd saves for the backward while ``fn()`` runs, each storage counted once, the
    ``params`` left out (the weights a layer saves are the model states'; not activations)."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def clip_forward(nets: dict[str, nn.Module], shape: StageShape, latent: int, latent_low: int, network: str) -> int:
    """Saved bytes of ``network``'s part of one clip's training forward on random latents (frame 0 given, the rest
    generated): the planner's forward (and its warm-up head where the stage keeps it), or the generator's on a plan
    computed without autograd."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, shape.frames, dtype=torch.bool)  # (1, T) True = generated
    mask[0, 0] = False
    z_low = torch.randn(1, shape.frames, shape.channels, latent_low, latent_low, generator=g)  # (1, T, C, h', w')
    z = torch.randn(1, shape.frames, shape.channels, latent, latent, generator=g)  # (1, T, C, h, w)
    t = torch.rand(1, generator=g)
    if network == "planner":
        planner = nets["planner"]

        def forward():
            plan = planner(z_low, mask)  # (1, T, N', D)
            out = planner.project(plan, (latent_low, latent_low)) if shape.planner_head else plan
            out.square().mean()

        return saved_bytes(forward, list(planner.parameters()))
    plan = None
    if "planner" in nets:
        with torch.no_grad():
            plan = nets["planner"](z_low, mask)  # (1, T, N', D)
    generator = nets["generator"]
    return saved_bytes(lambda: generator(z, t, plan, mask).square().mean(), list(generator.parameters()))


def measured(shape: StageShape, k: int, m: int, depth: int, network: str, checkpointing: bool = False) -> int:
    """Saved bytes of ``network``'s part of one clip's forward at width ``/ k``, tokens per frame ``/ m``, ``depth``,
    with activation ``checkpointing`` or without (module docstring)."""
    side = int(round(math.sqrt(m)))
    if side * side != m:
        raise ValueError(f"--tokens-divisor {m} must be a square (4, 16, 64, ...): it divides both latent sides")
    if shape.latent % side or shape.latent_low % side:
        raise ValueError(f"--tokens-divisor {m}: the latent sides {shape.latent} and {shape.latent_low} do not "
                         f"divide by {side}; pick a smaller one")
    torch.manual_seed(0)
    nets = build_trained(shape, k=k, depth=depth, device="cpu", checkpointing=checkpointing)
    return clip_forward(nets, shape, shape.latent // side, shape.latent_low // side, network)


def depth_pair(shape: StageShape, k: int, m: int, network: str, checkpointing: bool) -> tuple[int, int]:
    """``(A1, A2)``: :func:`measured` at depth 1 and 2."""
    return measured(shape, k, m, 1, network, checkpointing), measured(shape, k, m, 2, network, checkpointing)


def at_depth(pair: tuple[int, int], depth: int, k: int, m: int) -> float:
    """``(A1 + (L - 1) (A2 - A1)) k m``: the saved bytes per clip at ``depth`` (module docstring)."""
    a1, a2 = pair
    return float((a1 + (depth - 1) * (a2 - a1)) * k * m)


def activation_bytes(shape: StageShape, k: int, m: int) -> dict[str, dict[str, float]]:
    """Per network: saved bytes per clip at the stage's depth without activation checkpointing, and with it plus one
    block's saved bytes (its recomputation in the backward), extrapolated (module docstring)."""
    out = {}
    for name, net in build_trained(shape).items():
        depth = net.cfg.depth
        plain, ckpt = depth_pair(shape, k, m, name, False), depth_pair(shape, k, m, name, True)
        block = float((plain[1] - plain[0]) * k * m)
        out[name] = {"plain": at_depth(plain, depth, k, m), "checkpointing": at_depth(ckpt, depth, k, m) + block,
                     "block": block}
    return out


def both_networks(acts: dict[str, dict[str, float]]) -> tuple[float, float]:
    """Saved bytes per clip of every trained network together (all live until their backward), without and with
    checkpointing (one block recomputed at a time: the largest block's bytes counted once)."""
    plain = sum(a["plain"] for a in acts.values())
    ckpt = sum(a["checkpointing"] - a["block"] for a in acts.values()) + max(a["block"] for a in acts.values())
    return plain, ckpt


def report(path: str, world: int, per_node: int, batch: int | None, k: int, m: int) -> str:
    """The sizing text for one stage; ``batch``: its ``data.batch_size`` (None: the stage's)."""
    shape = read_shape(path)
    if batch is not None:
        shape = dataclasses.replace(shape, batch=batch)
    check_split(shape.batch, world)
    params = trained_parameters(shape)
    total = sum(params.values())
    clips = largest_rank_batch(shape.batch, world)  # the largest rank's batch
    block = largest_block(shape)
    lines = [f"stage {path}: trains {shape.kind}; data.batch_size {shape.batch} on {world} GPUs ({per_node} per node): "
             f"{clips} clip(s) per GPU per batch",
             "trained parameters: " + ", ".join(f"{n} {p:,}" for n, p in params.items()) + f" (total {total:,}); "
             f"largest block {block:,}",
             "", "model states per GPU, sharding_strategy: stored (fp32 weights, gradients, AdamW moments, EMA: "
             "20 bytes per trained parameter) + bf16 weight copies under bf16-mixed"]
    for s in STRATEGIES:
        stored, copies = state_bytes(total, s, world, per_node), bf16_weight_bytes(total, block, s)
        lines.append(f"  {s:<14} {stored / GB:8.2f} GB + {copies / GB:6.2f} GB")
    acts = activation_bytes(shape, k, m)
    lines += ["", f"activations saved for the backward per GPU ({clips} clip(s), fp32 forward measured on the CPU at "
              f"width / {k}, tokens per frame / {m}, extrapolated; bf16-mixed saves less):"]
    for name, a in acts.items():
        on = " (the stage's setting)" if shape.checkpointing[name] else ""
        lines.append(f"  {name:<10} without checkpointing {a['plain'] * clips / GB:8.2f} GB, with checkpointing"
                     f"{on} {a['checkpointing'] * clips / GB:8.2f} GB; one block {a['block'] * clips / GB:.2f} GB")
    if len(acts) > 1:
        plain, ckpt = both_networks(acts)
        lines.append(f"  {'together':<10} without checkpointing {plain * clips / GB:8.2f} GB, with checkpointing"
                     f" {ckpt * clips / GB:8.2f} GB (one block recomputed at a time)")
    lines += ["", *autoencoder_lines(shape, clips, m),
              "", "not counted: the temporaries of one op, the CUDA context and allocator fragmentation"]
    return "\n".join(lines)


def autoencoder_lines(shape: StageShape, clips: int, m: int) -> list[str]:
    """The frozen autoencoder's lines of the report (:mod:`mardini.sizing_autoencoder`), for ``clips`` per GPU."""
    ae: AutoencoderSize | None = autoencoder_size(shape.args.get("autoencoder"), shape.resolution,
                                                  clips * shape.frames, m)
    if ae is None:
        return ["frozen autoencoder: none configured (the stage module's default)"]
    lines = [f"frozen autoencoder ({ae.name}), a full copy per GPU under every strategy: {ae.params:,} parameters, "
             f"{ae.param_bytes / GB:.2f} GB"]
    if shape.cached:
        return lines + ["  encodes nothing in training: the stage reads a latent cache (data.latents)"]
    return lines + [f"  encoding frames on the fly (no latent cache): {ae.encode_bytes / GB:.2f} GB of temporaries "
                    f"per encoder call ({ae.frames_per_call} frames at {shape.resolution} px, fp32-measured",
                    f"  at / {int(round(math.sqrt(m)))} per side, extrapolated), freed before the networks' forward: "
                    "part of the peak only where above their activations"]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a stage YAML, e.g. configs/paper/mardini-l/05_joint_model.yaml")
    p.add_argument("--world-size", type=int, default=256, help="GPUs in all (default 256)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="HYBRID_SHARD's shard group (default 8)")
    p.add_argument("--batch", type=int, help="data.init_args.batch_size, the clips of one batch over all ranks "
                   "(default: the stage's); with trainer.accumulate_grad_batches A, the stage's / A keeps the clips "
                   "per optimiser step")
    p.add_argument("--width-divisor", type=int, default=16, help="k: the measured forward's width / k (default 16)")
    p.add_argument("--tokens-divisor", type=int, default=16, help="m: its tokens per frame / m, a square (default 16)")
    a = p.parse_args(argv)
    for name in ("world_size", "gpus_per_node", "batch", "width_divisor", "tokens_divisor"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    text = report(a.config, a.world_size, a.gpus_per_node, a.batch, a.width_divisor, a.tokens_divisor)
    print(text)
    return text


if __name__ == "__main__":
    from mardini.user_errors import run_reporting_user_errors

    raise SystemExit(run_reporting_user_errors("python -m mardini.sizing", main))

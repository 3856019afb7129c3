"""Rebuild the sampling networks of a MarDini checkpoint: EMA or raw weights, autoencoder, schedule, window.

Kinds: a ``joint`` checkpoint samples every task; a ``generation`` warm-up has no planner, so it samples
plan-free (the learned null plan) and cannot use guidance; a ``planning`` warm-up has no generator and
cannot sample at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mardini.autoencoders import FrameAutoencoder, build_autoencoder
from mardini.diffusion import CosineSchedule
from mardini.diffusion.anchor import FrameAnchor
from mardini.lit.checkpoints import (
    EMA_PREFIX, KINDS, check_metadata, cross_rope_grid_of, other_fingerprint, read_checkpoint, warn_unfingerprinted,
)
from mardini.models.registry import build_generator, build_planner, generator_overrides, get_size


@dataclass
class Loaded:
    """Everything a pipeline needs from one checkpoint (networks in eval mode, on CPU, float32)."""

    kind: str
    size: str
    generator: nn.Module
    planner: nn.Module | None
    autoencoder: FrameAutoencoder
    schedule: CosineSchedule
    planner_resolution: int
    window: int  # frames of the trained window (the last curriculum value when there is one)
    resolution: tuple[int, int] | None  # pixel size of the training clips, when the checkpoint records it
    fps: float | None
    info: dict[str, Any] = field(default_factory=dict)
    anchor: FrameAnchor = field(default_factory=FrameAnchor)  # the diffused target (FrameAnchor)


def load_checkpoint(path: str | Path, ema: bool = True, window: int | None = None,
                    allow_autoencoders: Collection[str] = ()) -> Loaded:
    """Read a Lightning checkpoint written by ``train.py`` and rebuild its networks for sampling.

    Args:
        path: a ``.ckpt`` of a ``joint`` (or ``generation``) stage.
        ema: load the EMA weights (``ema.module.*``, the default for sampling) instead of the raw ones.
        window: the trained window in frames, for a checkpoint that records none (no curriculum, ``model.frames``
            or datamodule ``frames``: what ``trainer.fit(model, dataloader)`` writes). Such a checkpoint without
            ``window`` gets its size's registry window, with a warning; one that records a window refuses another.
        allow_autoencoders: class paths of autoencoders outside ``mardini.autoencoders`` that may be imported to
            rebuild the checkpoint's (one's own :class:`FrameAutoencoder`, e.g. ``"myext.ae.AvgPoolAE"``); a
            checkpoint naming any other is refused.
    """
    ckpt = read_checkpoint(path)
    meta = check_metadata(ckpt, KINDS, path)
    kind = meta["kind"]
    if kind == "planning":
        raise ValueError(
            f"{path} is a 'planning' warm-up checkpoint: it holds only the planner (trained to regress low-res "
            "latents) and no generator, so it cannot sample. Use a 'joint' checkpoint (or a 'generation' one for "
            "plan-free sampling)"
        )
    if "autoencoder_spec" not in meta:
        raise ValueError(f"{path} does not record its autoencoder (autoencoder_spec); re-save it with this code")
    hp = hyper_parameters_of(ckpt, path)
    autoencoder = checkpoint_autoencoder(meta, path, allow_autoencoders)  # a refused one: at once
    state = ckpt["state_dict"]
    prefix = EMA_PREFIX if ema else "networks."
    channels = int(meta["latent_channels"])
    curriculum = _curriculum_settings(ckpt.get("callbacks") or {})

    g_over = generator_overrides(meta["size"], hp.get("planner"), hp.get("generator"), with_planner=kind == "joint")
    g_over.setdefault("in_channels", channels)
    g_over.setdefault("cross_rope_grid", cross_rope_grid_of(meta))  # "corner" for checkpoints before the setting
    generator = build_generator(meta["size"], **g_over)
    load_network(generator, state, f"{prefix}generator.", path, ema)
    if "attention" in curriculum:
        generator.set_attention(curriculum["attention"])
    planner = None
    if kind == "joint":
        p_over = dict(hp.get("planner") or {})
        p_over.setdefault("in_channels", channels)
        planner = build_planner(meta["size"], **p_over)
        planner.drop_head()  # a joint run with plan_recon_weight > 0 kept a training-only head: left out
        state = {k: v for k, v in state.items() if not k.startswith(f"{prefix}planner.head.")}
        load_network(planner, state, f"{prefix}planner.", path, ema)

    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    window = _window(curriculum.get("frames") or hp.get("frames") or data.get("frames"), window, meta["size"], path)
    res = data.get("resolution")
    resolution = None if res is None else ((int(res), int(res)) if isinstance(res, int) else tuple(int(r) for r in res))
    return Loaded(
        kind=kind,
        size=meta["size"],
        generator=generator.eval().requires_grad_(False),
        planner=None if planner is None else planner.eval().requires_grad_(False),
        autoencoder=autoencoder,
        schedule=CosineSchedule(shift=float(hp.get("schedule_shift", 1.0))),
        anchor=FrameAnchor.from_hparams(hp),
        planner_resolution=int(meta["planner_resolution"]),
        window=int(window),
        resolution=resolution,
        fps=None if data.get("fps") is None else float(data["fps"]),
        info={"checkpoint": str(path), "kind": kind, "size": meta["size"], "ema": ema,
              "global_step": ckpt.get("global_step"), "attention": generator.attention_mode,
              "anchor": FrameAnchor.from_hparams(hp).anchor},
    )


def checkpoint_autoencoder(meta: dict[str, Any], path: str | Path,
                           allow_autoencoders: Collection[str] = ()) -> FrameAutoencoder:
    """The checkpoint's autoencoder, rebuilt (in eval mode) from its recorded spec (its VAE from the recorded
    ``path``), with a warning where the checkpoint records another fingerprint (:func:`warn_other_autoencoder`)."""
    autoencoder = build_autoencoder(meta["autoencoder_spec"], allow_autoencoders).eval()
    warn_other_autoencoder(meta, autoencoder, path)
    return autoencoder


SAMPLED_UNCHECKED = ("the VAE found at its recorded path ({}) is not checked against the one it was trained with, "
                     "so other weights there would encode and decode its samples")
UNFINGERPRINTED_FIX = ("keep the VAE it was trained with at that path; a checkpoint this code saves records it (resume "
                       "the stage, or start the next one from it)")


def warn_other_autoencoder(meta: dict[str, Any], autoencoder: FrameAutoencoder, path: str | Path) -> None:
    """Warn where the checkpoint (its ``mardini`` ``meta``) was trained with an autoencoder of another fingerprint
    than ``autoencoder`` (other weights behind the recorded path): its networks then sample in another latent
    space. A warning, not a refusal: sampling trains nothing, the checkpoint names the only VAE it can be given,
    and a VAE swapped on purpose (a fine-tuned decoder of the same encoder) is legitimate for decoding. Checkpoints
    written before the fingerprint was recorded (2026-12-07) cannot be checked: a warning says so, as in training."""
    if meta.get("autoencoder_fingerprint") is None:
        warn_unfingerprinted(str(path), meta.get("autoencoder_spec") or {}, UNFINGERPRINTED_FIX, SAMPLED_UNCHECKED)
        return
    problem = other_fingerprint(meta, autoencoder.fingerprint(), autoencoder.spec(), path)
    if problem:
        warnings.warn(
            f"{problem}; the samples decode (and given frames encode) with it. Put the VAE the checkpoint was "
            "trained with back at that path (or, for a decoder fine-tuned from the same encoder on purpose, "
            "ignore this warning)", UserWarning, stacklevel=3)


def hyper_parameters_of(ckpt: dict[str, Any], path) -> dict[str, Any]:
    """The checkpoint's ``hyper_parameters`` (network overrides, schedule, anchor, frames), or a ValueError saying it
    has none: the networks rebuilt from defaults instead would not fit its weights, or sample with other settings."""
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or not hp:
        raise ValueError(
            f"{path} has no hyper_parameters (not saved by a MarDini training run, or they were stripped), so its "
            "networks and sampling settings cannot be rebuilt: use the checkpoint the training run wrote "
            "(<stage>/checkpoints/*.ckpt) or its export (python -m mardini.lit.ema_export), or put the run's "
            "hyper_parameters back into it"
        )
    return dict(hp)


def _window(recorded: int | None, given: int | None, size: str, path) -> int:
    """The trained window: what the checkpoint records, else ``given``, else the size's registry window (warned)."""
    if given is not None:
        if not int(given) >= 2:
            raise ValueError(f"window={given!r} is impossible: a window holds at least 2 frames")
        if recorded is not None and int(given) != int(recorded):
            raise ValueError(f"{path} records a trained window of {recorded} frames; window={given} contradicts it: "
                             "leave window out")
        return int(given)
    if recorded is not None:
        return int(recorded)
    fallback = get_size(size).frames
    warnings.warn(
        f"{path} records no trained window (no curriculum, model.frames or datamodule frames: a checkpoint of "
        f"trainer.fit(model, dataloader)); using size {size!r}'s registry window of {fallback} frames, which may not "
        "be the model's. Pass the window it was trained on: MarDiniPipeline.from_checkpoint(path, window=T) "
        "(sample.py or evaluate.py: --window T)",
        UserWarning, stacklevel=3,
    )
    return fallback


def load_network(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, path, ema: bool) -> None:
    """Load the ``prefix*`` weights of a checkpoint's ``state`` into ``module``, strictly: a clear error when there are
    none (naming ``--no-ema`` or an EMA-only export) or when they do not fit the network rebuilt from the
    checkpoint's hyper-parameters."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        if ema:
            hint = " (it has no EMA weights: pass ema=False / --no-ema)"
        elif any(k.startswith(EMA_PREFIX) for k in state):
            hint = " (an EMA-only export: load it with ema=True, without --no-ema)"
        else:
            hint = ""
        raise ValueError(f"{path} holds no '{prefix}*' weights{hint}")
    own = module.state_dict()
    bad = sorted(set(own) ^ set(sub)) + [k for k in set(own) & set(sub) if own[k].shape != sub[k].shape]
    if bad:
        raise ValueError(
            f"{path}: the '{prefix}*' weights do not fit the network rebuilt from its hyper-parameters "
            f"(first mismatches: {bad[:5]}); was it written by another code version?"
        )
    module.load_state_dict(sub)


def _curriculum_settings(callbacks: dict) -> dict:
    """``frames`` / ``attention`` of the last applied curriculum milestone, when the run had a curriculum."""
    out: dict = {}
    for cb_state in callbacks.values():
        if not is_curriculum_state(cb_state):
            continue
        applied = cb_state.get("applied")
        for m in cb_state["milestones"][: (applied + 1) if applied is not None else 0]:
            out.update({k: m[k] for k in ("frames", "attention") if m.get(k) is not None})
    return out


def is_curriculum_state(cb_state: Any) -> bool:
    """True for what :meth:`~mardini.lit.curriculum.Curriculum.state_dict` writes (``applied`` and a list of milestone
    dicts), recognised by its content: Lightning keys a callback's state by its class's name, so a subclass's is
    not ``Curriculum``."""
    if not isinstance(cb_state, dict) or "applied" not in cb_state:
        return False
    milestones = cb_state.get("milestones")
    return isinstance(milestones, list) and all(isinstance(m, dict) and "step" in m for m in milestones)

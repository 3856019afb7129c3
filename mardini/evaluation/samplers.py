"""What the evaluation runs: any callable ``(video, mask, seed) -> video``, so baselines and the model plug in alike.

A sampler takes ``video (B, T, 3, H, W)`` in [-1, 1] (the masked frames' content must not be used), ``mask (B, T)``
bool (True = generate) and ``seed``, one int per clip (:func:`mardini.evaluation.protocol.clip_seeds`), and returns
``(B, T, 3, H, W)`` in [-1, 1] with the given frames unchanged. Baselines: :class:`LinearBlend` (the two nearest given frames blended linearly in time) and
:class:`NearestFrame` (the nearest given frame repeated). :class:`PipelineSampler` wraps ``MarDiniPipeline``;
:func:`to_real_size` brings a model's output sampled at its own size to the protocol's.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from mardini.data.transforms import resize_video
from mardini.diffusion.checks import check_eta
from mardini.masking import gather_frames, nearest_given_frames, neighbour_given


@runtime_checkable
class Sampler(Protocol):
    """``(video (B, T, 3, H, W) in [-1, 1], mask (B, T) bool, seed) -> video (B, T, 3, H, W) in [-1, 1]``; ``seed``
    is one int per clip (or one int, clip b using ``seed + b``)."""

    def __call__(self, video: torch.Tensor, mask: torch.Tensor, seed: int | Sequence[int]) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------
class LinearBlend:
    """Each generated frame = linear blend in time of the nearest given frames before and after it.

    Frames with a given frame on one side only (e.g. after the single frame of image-to-video) repeat it.
    """

    name = "linear_blend"

    def __call__(self, video: torch.Tensor, mask: torch.Tensor, seed: int | Sequence[int] = 0) -> torch.Tensor:
        prev, nxt = neighbour_given(mask)  # (B, T) each
        t = mask.shape[1]
        lo = torch.where(prev < 0, nxt, prev)  # (B, T) one-sided: use the other side
        hi = torch.where(nxt >= t, prev, nxt)  # (B, T)
        span = (hi - lo).clamp(min=1)  # (B, T)
        pos = torch.arange(t, device=mask.device)[None]  # (1, T)
        w = ((pos - lo).clamp(min=0) / span).clamp(0, 1).to(video.dtype)  # (B, T) weight of the later frame
        w = torch.where(hi == lo, torch.zeros_like(w), w)[..., None, None, None]  # (B, T, 1, 1, 1)
        out = (1 - w) * gather_frames(video, lo) + w * gather_frames(video, hi)  # (B, T, C, H, W)
        return torch.where(mask[..., None, None, None], out, video)  # given frames untouched


class NearestFrame:
    """Each generated frame repeats the nearest given frame in time (ties go to the earlier one)."""

    name = "nearest_frame"

    def __call__(self, video: torch.Tensor, mask: torch.Tensor, seed: int | Sequence[int] = 0) -> torch.Tensor:
        out = nearest_given_frames(video, mask)  # (B, T, C, H, W)
        return torch.where(mask[..., None, None, None], out, video)


BASELINES: dict[str, type] = {"linear_blend": LinearBlend, "nearest_frame": NearestFrame}


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
class PipelineSampler:
    """``MarDiniPipeline.generate`` as a :class:`Sampler` (DDIM ``steps`` and ``eta``, guidance on the plan)."""

    name = "mardini"

    def __init__(self, pipeline: Any, steps: int = 25, guidance_scale: float = 1.0, eta: float = 0.0) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        check_eta(eta)
        if getattr(pipeline, "planner", True) is None and guidance_scale != 1.0:
            warnings.warn(f"the pipeline has no planner (a generation warm-up): guidance {guidance_scale} -> 1.0")
            guidance_scale = 1.0
        self.pipeline, self.steps, self.guidance_scale = pipeline, steps, guidance_scale
        params = inspect.signature(pipeline.generate).parameters
        self._extra = {"progress": False} if "progress" in params else {}
        if eta != 0:
            if "eta" not in params:
                raise ValueError(f"eta={eta} needs a pipeline whose generate() takes eta")
            self._extra["eta"] = eta

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, mask: torch.Tensor, seed: int | Sequence[int] = 0) -> torch.Tensor:
        out = self.pipeline.generate(video, mask, steps=self.steps, guidance_scale=self.guidance_scale, seed=seed,
                                     **self._extra)
        return out.clamp(-1, 1).where(out.isfinite(), out)  # (B, T, 3, H, W); NaN/inf kept for the caller's check


def to_real_size(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A model's output ``(B, T, 3, S, S)``, sampled at its own size, as the protocol scores it: resized to the real
    clip's ``(B, T, 3, R, R)`` with the project's resize (bilinear, antialiased), the given frames the real ones."""
    out = resize_video(fake, tuple(real.shape[-2:]))  # (B, T, 3, R, R)
    return torch.where(mask[..., None, None, None], out, real)


def ema_context(pl_module: Any):
    """The module's EMA weights for the duration (a no-op when they are already swapped in, e.g. in validation)."""
    if getattr(pl_module, "_ema_backup", None) is not None or not hasattr(pl_module, "ema_weights"):
        return contextlib.nullcontext()
    return pl_module.ema_weights()


def pipeline_from_module(pl_module: Any, window: int) -> Any:
    """A ``MarDiniPipeline`` over the live networks of a training module (shared, not copied; the EMA weights are
    in them while :func:`ema_context` is open). Uses the pipeline's plain constructor."""
    try:
        from mardini.pipeline import MarDiniPipeline
    except ImportError as err:
        raise RuntimeError(
            "sampler='pipeline' needs mardini.pipeline (MarDiniPipeline), which is not importable here "
            f"({err}); use sampler='linear_blend' or 'nearest_frame', or pass a callable (video, mask, seed) -> video"
        ) from err
    nets = pl_module.networks
    if "generator" not in nets:
        raise ValueError(
            f"{type(pl_module).__name__} has no generator (a planning warm-up cannot sample); evaluate a generation "
            "or joint stage, or use sampler='linear_blend'"
        )
    return MarDiniPipeline(
        nets["generator"], pl_module.autoencoder, nets["planner"] if "planner" in nets else None,
        schedule=getattr(pl_module, "schedule", None), planner_resolution=pl_module.hparams.planner_resolution,
        window=window, kind=getattr(pl_module, "KIND", "joint"), device=pl_module.device,
        anchor=getattr(pl_module, "anchor", None),
    )


def make_sampler(
    spec: str | Sampler, pl_module: Any = None, steps: int = 25, guidance_scale: float = 1.0, window: int = 9,
    eta: float = 0.0,
) -> Sampler:
    """``"linear_blend"``, ``"nearest_frame"``, ``"pipeline"`` (built from ``pl_module``) or a callable."""
    if callable(spec):
        return spec
    if spec in BASELINES:
        return BASELINES[spec]()
    if spec == "pipeline":
        if pl_module is None:
            raise ValueError("sampler='pipeline' needs the LightningModule (or use MarDiniPipeline.from_checkpoint)")
        return PipelineSampler(pipeline_from_module(pl_module, window), steps, guidance_scale, eta)
    raise ValueError(f"unknown sampler {spec!r}; choose one of {[*BASELINES, 'pipeline']} or pass a callable")

"""The denoising function one window's DDIM loop calls: reference cache and guidance, fast or naive.

Fast (default): one :class:`~mardini.models.generator.ReferenceCache` per window and the conditional and null
branches in ONE batched call (:func:`mardini.diffusion.guided_velocity`). Naive (``cache=False``,
``batched=False``): full forwards, and guidance as two calls per step. Both give the same result; the naive
path exists to test and benchmark the fast one.
"""

from __future__ import annotations

import torch
from torch import nn

from mardini.diffusion import DenoiseFn, guided_velocity
from mardini.diffusion.schedule import CosineSchedule
from mardini.models.generator import ReferenceCache


class CachedGenerator:
    """``generator(z, t, plan, mask)`` bound to one window's :class:`ReferenceCache` (None = no cache)."""

    def __init__(self, generator: nn.Module, cache: bool = True) -> None:
        self.generator = generator
        self.cache = ReferenceCache() if cache else None
        self.estimate: torch.Tensor | None = None  # self-conditioning: the last step's x0 estimate (B, T, C, h, w)

    def __call__(self, z, t, plan, mask) -> torch.Tensor:
        if self.estimate is None:
            return self.generator(z, t, plan, mask, cache=self.cache)  # (B, T, C, h, w)
        estimate = self.estimate.to(z.dtype)  # (B, T, C, h, w)
        if estimate.shape[0] != z.shape[0]:  # guidance batches the conditional and null branches: (2B, ...)
            estimate = estimate.repeat(z.shape[0] // estimate.shape[0], 1, 1, 1, 1)
        return self.generator(z, t, plan, mask, cache=self.cache, self_cond=estimate)  # (B, T, C, h, w)

    def null_plan(self, batch: int, frames: int, tokens: int) -> torch.Tensor:
        return self.generator.null_plan(batch, frames, tokens)  # (B, T, N, D)


def make_denoise_fn(
    generator: nn.Module,
    plan: torch.Tensor | None,
    mask: torch.Tensor,
    guidance_scale: float = 1.0,
    cache: bool = True,
    batched: bool = True,
    dtype: torch.dtype | None = None,
    schedule: CosineSchedule | None = None,
) -> DenoiseFn:
    """``denoise_fn(z_t (B,T,C,h,w), t (B,)) -> v`` for one window.

    Args:
        generator: the generation model. plan: ``(B, T, N, D)`` or None (null plan, no guidance possible).
        mask: ``(B, T)`` bool, True = generate. guidance_scale: ``v_null + s (v_plan - v_null)``; 1 = none.
        cache: reuse reference-frame activations across steps (exact). batched: cond + null in one call.
        dtype: the networks' parameter dtype; the float32 sampler state is cast to it (float64 tests).
        schedule: the trained schedule; a self-conditioned generator (``cfg.self_cond``) needs it to turn each
            step's (guided) velocity into the x0 estimate the next step reads. A window's steps must run in order.
    """
    cast = (lambda z: z) if dtype in (None, torch.float32, torch.bfloat16) else (lambda z: z.to(dtype))
    if batched or plan is None:  # the naive path below computes both branches even at scale 1
        model = CachedGenerator(generator, cache)
        models = [model]

        def denoise_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_velocity(model, cast(z_t), t, plan, mask, guidance_scale)  # (B, T, C, h, w)

    else:
        cond, null = CachedGenerator(generator, cache), CachedGenerator(generator, cache)
        models = [cond, null]
        null_plan = generator.null_plan(*plan.shape[:3]).to(plan)  # (B, T, N, D), as the batched path builds it

        def denoise_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v_cond = cond(cast(z_t), t, plan, mask)  # (B, T, C, h, w)
            v_null = null(cast(z_t), t, null_plan, mask)  # (B, T, C, h, w)
            return v_null + guidance_scale * (v_cond - v_null)  # (B, T, C, h, w)

    if not getattr(getattr(generator, "cfg", None), "self_cond", False):
        return denoise_fn
    if schedule is None:
        raise ValueError("a self-conditioned generator (cfg.self_cond) needs the schedule: make_denoise_fn(..., "
                         "schedule=...) turns each step's velocity into the x0 estimate the next step reads")

    def self_conditioned_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = denoise_fn(z_t, t)  # (B, T, C, h, w)
        estimate = schedule.predict_x0_eps(z_t.float(), v.float(), t.float())[0]  # (B, T, C, h, w)
        for m in models:
            m.estimate = estimate
        return v

    return self_conditioned_fn

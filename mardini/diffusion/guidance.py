"""Classifier-free guidance on the planning signal (PAPER.md §4).

What the paper fixes: v-prediction, DDIM sampling, and CFG on the planning signal only: scale 2.5 for
image-to-video, none (scale 1) for interpolation; the null branch uses the generator's learned null plan, which
training exposes by dropping the plan 10 % of the time. What we choose: ``v = v_null + s (v_plan - v_null)``
with both branches in ONE batched forward (batch 2B), so guidance costs one network call per step, not two.
(Defaults elsewhere: cosine schedule, continuous time, 1000-step grid, uniform t, unweighted MSE.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mardini.diffusion.checks import check_latents, check_mask, check_t

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

IMAGE_TO_VIDEO_GUIDANCE = 2.5  # PAPER.md §4.1 / Table 5: the guidance scale of image-to-video (interpolation: none)


def guided_velocity(
    model: nn.Module,
    z_t: torch.Tensor,
    t: torch.Tensor,
    plan: torch.Tensor | None,
    mask: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """Velocity with classifier-free guidance on the plan, in one network call.

    Args:
        model: generator, ``model(z_t, t, plan | None, mask) -> v``; for guidance it must also provide
            ``model.null_plan(B, T, N) -> (B, T, N, D)``, its learned null planning signal.
        z_t: ``(B, T, C, h, w)`` current latents (references clean).
        t: ``(B,)`` times in [0, 1].
        plan: ``(B, T, N, D)`` planning signal, or None for the null plan (then no guidance is possible).
        mask: ``(B, T)`` bool, True = generate.
        scale: guidance scale s; 1 (or ``plan`` None) = one conditional forward, 0 = the null branch alone.
    Returns:
        ``(B, T, C, h, w)``: ``v_null + s (v_cond - v_null)``.
    """
    if plan is None or scale == 1.0:
        return model(z_t, t, plan, mask)  # (B, T, C, h, w)
    if scale == 0.0:
        return model(z_t, t, None, mask)  # (B, T, C, h, w), the null branch only
    check_latents(z_t, "z_t")
    check_t(t, z_t.shape[0])
    check_mask(mask, z_t)
    if plan.dim() != 4 or tuple(plan.shape[:2]) != tuple(z_t.shape[:2]):
        raise ValueError(f"plan must be (B, T, N, D) with (B, T) = {tuple(z_t.shape[:2])}, got {tuple(plan.shape)}")
    if not callable(getattr(model, "null_plan", None)):
        raise TypeError(
            f"{type(model).__name__} has no null_plan(B, T, N) method; guidance with scale != 1 needs the "
            "generator's learned null plan (or use scale=1.0)"
        )
    b, n_frames, n_tokens, _ = plan.shape
    null = model.null_plan(b, n_frames, n_tokens).to(plan)  # (B, T, N, D)
    if null.shape != plan.shape:
        raise ValueError(f"model.null_plan returned {tuple(null.shape)}, expected the plan's {tuple(plan.shape)}")
    v = model(
        torch.cat([z_t, z_t]),  # (2B, T, C, h, w)
        torch.cat([t, t]),  # (2B,)
        torch.cat([plan, null]),  # (2B, T, N, D)
        torch.cat([mask, mask]),  # (2B, T)
    )  # (2B, T, C, h, w)
    v_cond, v_null = v.chunk(2)  # (B, T, C, h, w) x 2
    return v_null + scale * (v_cond - v_null)  # (B, T, C, h, w)


def guided_denoise_fn(
    model: nn.Module, plan: torch.Tensor | None, mask: torch.Tensor, scale: float = 1.0
) -> DenoiseFn:
    """Bind model, plan, mask and scale into ``denoise_fn(z_t (B,T,C,h,w), t (B,)) -> v (B,T,C,h,w)``."""

    def denoise_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_velocity(model, z_t, t, plan, mask, scale)  # (B, T, C, h, w)

    return denoise_fn

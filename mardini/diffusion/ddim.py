"""DDIM sampler for v-prediction with frozen reference frames (PAPER.md §4, Fig. 6a).

What the paper fixes: v-prediction, a DDIM sampler (25 steps in Tables 2-3; Fig. 6a sweeps 1-100), CFG on the
planning signal (2.5 for I2V, none for interpolation). What we choose: a uniform grid of any number of steps >= 1
from t = 1 to t = 0 on our continuous-time cosine schedule (trained with a 1000-step grid, uniform t, unweighted
MSE). Masked frames start from N(0, I) drawn with an explicit generator; reference frames are copied from
``z_ref`` at every step and returned bit-identical.

The loop is split so a cache can wrap the network: :meth:`DDIMSampler.sample` takes any
``denoise_fn(z_t (B,T,C,h,w), t (B,)) -> v``; :func:`ddim_sample` builds one from a generator network.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from mardini.diffusion.checks import check_eta, check_latents, check_mask, check_t, check_time, frame_mask
from mardini.diffusion.guidance import DenoiseFn, guided_denoise_fn
from mardini.diffusion.schedule import CosineSchedule

StepCallback = Callable[[int, float, torch.Tensor], None]


# --------------------------------------------------------------------------------------------------
# One update (pure math)
# --------------------------------------------------------------------------------------------------


def ddim_update(
    schedule: CosineSchedule,
    z_t: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM move from time t to an earlier time s < t, on every frame.

    ``z_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c noise`` with ``(x0, eps)`` from ``v`` and
    ``c = eta sigma_s / sigma_t sqrt(1 - alpha_t^2 / alpha_s^2)`` (Song et al. 2021, Eq. 16, in alpha/sigma form).
    eta in [0, 1]: 0 is deterministic, 1 ancestral (DDPM-like) sampling; above 1, c would exceed sigma_s.

    Args:
        z_t, v: ``(B, T, C, h, w)``. t, s: ``(B,)`` in [0, 1] with s < t. noise: ``(B, T, C, h, w)`` N(0, I),
            needed only when eta > 0.
    Returns: ``(B, T, C, h, w)``.
    """
    check_latents(z_t, "z_t")
    if v.shape != z_t.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal z_t shape {tuple(z_t.shape)}")
    check_t(t, z_t.shape[0])
    check_t(s)
    return _ddim_update(schedule, z_t, v, t, s, eta, noise)


def _ddim_update(schedule: CosineSchedule, z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                 eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`ddim_update` of inputs its caller has checked (``DDIMSampler.step`` checks its times on the host)."""
    x0, eps = schedule._predict_x0_eps(z_t, v, t)  # (B, T, C, h, w) x 2
    alpha_s, sigma_s = schedule._alpha_sigma(s)  # (B, 1, 1, 1, 1) x 2
    if eta == 0.0:
        return alpha_s * x0 + sigma_s * eps  # (B, T, C, h, w)
    if noise is None:
        raise ValueError("eta > 0 needs noise: pass noise=torch.randn(z_t.shape, generator=...)")
    alpha_t, sigma_t = schedule._alpha_sigma(t)  # (B, 1, 1, 1, 1) x 2
    ratio = (alpha_t / alpha_s.clamp(min=1e-12)).square()  # (B, 1, 1, 1, 1)
    c = eta * sigma_s / sigma_t.clamp(min=1e-12) * (1 - ratio).clamp(min=0).sqrt()  # (B, 1, 1, 1, 1)
    keep = (sigma_s.square() - c.square()).clamp(min=0).sqrt()  # (B, 1, 1, 1, 1)
    return alpha_s * x0 + keep * eps + c * noise  # (B, T, C, h, w)


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    """The given generator, or a CPU one seeded 0 so that a call without one is still reproducible."""
    return generator if generator is not None else torch.Generator().manual_seed(0)


class DDIMSampler:
    """DDIM over a uniform time grid t_i = i / steps, i = steps .. 0.

    Args:
        schedule: the training schedule (default: ``CosineSchedule()``).
        steps: number of network calls, >= 1 (1 = predict x0 straight from pure noise).
        eta: in [0, 1]: 0 = deterministic DDIM; > 0 adds fresh noise each step (drawn from the sampling generator),
            1 = ancestral.
    """

    def __init__(self, schedule: CosineSchedule | None = None, steps: int = 25, eta: float = 0.0) -> None:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        check_eta(eta)
        self.schedule = schedule if schedule is not None else CosineSchedule()
        self.steps = int(steps)
        self.eta = float(eta)

    def timesteps(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The grid ``(steps + 1,)`` float32 from exactly 1 down to exactly 0."""
        i = torch.arange(self.steps, -1, -1, dtype=torch.float64, device=device)  # (S+1,)
        return (i / self.steps).float()  # (S+1,)

    def init_latents(self, z_ref: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Float32 start state ``(B, T, C, h, w)``: N(0, I) on masked frames, ``z_ref`` on references.

        The noise is drawn on the generator's device (so a CPU generator gives the same start on any device).
        """
        noise = torch.randn(z_ref.shape, generator=generator, device=generator.device)  # (B, T, C, h, w)
        noise = noise.to(device=z_ref.device, dtype=torch.float32)  # (B, T, C, h, w)
        return torch.where(frame_mask(mask), noise, z_ref.float())  # (B, T, C, h, w)

    def step(
        self,
        denoise_fn: DenoiseFn,
        z: torch.Tensor,
        t: float,
        s: float,
        mask: torch.Tensor,
        z_ref: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One network call and one update from time t to s; references are reset to ``z_ref``.

        Args:
            denoise_fn: ``(z_t (B,T,C,h,w), t (B,)) -> v (B,T,C,h,w)``; a reference-frame cache can wrap it.
            z: float32 state ``(B, T, C, h, w)``. t, s: grid times, s < t. mask: ``(B, T)`` bool.
            z_ref: ``(B, T, C, h, w)`` latents whose reference frames are kept.
            generator, noise: with eta > 0, the step's fresh N(0, I) noise ``(B, T, C, h, w)``, given or drawn
                from ``generator`` (unused at eta = 0 and on the last step).
        Returns: float32 ``(B, T, C, h, w)``.
        """
        check_latents(z, "z")
        check_time(t, "t")  # Python floats: checked here once, not as tensors in every function below
        check_time(s, "s")
        b = z.shape[0]
        t_vec = torch.full((b,), t, dtype=torch.float32, device=z.device)  # (B,)
        s_vec = torch.full((b,), s, dtype=torch.float32, device=z.device)  # (B,)
        v = denoise_fn(z, t_vec).float()  # (B, T, C, h, w)
        if v.shape != z.shape:
            raise ValueError(f"denoise_fn returned v of shape {tuple(v.shape)}, expected {tuple(z.shape)}")
        if self.eta == 0 or s == 0:
            noise = None
        elif noise is None:
            if generator is None:
                raise ValueError("eta > 0 draws fresh noise every step: pass the sampling torch.Generator or noise")
            noise = torch.randn(z.shape, generator=generator, device=generator.device).to(z.device)  # (B,T,C,h,w)
        elif noise.shape != z.shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} given for a state of shape {tuple(z.shape)}")
        z_s = _ddim_update(self.schedule, z, v, t_vec, s_vec, self.eta if s > 0 else 0.0, noise)  # (B,T,C,h,w)
        return torch.where(frame_mask(mask), z_s, z_ref.float())  # (B, T, C, h, w)

    @torch.no_grad()
    def sample(
        self,
        denoise_fn: DenoiseFn,
        z_ref: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Run the loop.

        Args:
            denoise_fn: ``(z_t, t) -> v``, see :meth:`step`.
            z_ref: ``(B, T, C, h, w)`` latents; reference frames (mask False) are kept, masked frames are ignored.
            mask: ``(B, T)`` bool, True = generate.
            generator: draws the start noise (and the eta noise); None = a CPU generator seeded 0.
            progress: show a tqdm bar over the steps.
            callback: ``callback(i, t_next, z)`` after step i (0-based) with the float32 state ``(B, T, C, h, w)``.
        Returns:
            ``(B, T, C, h, w)`` in z_ref's dtype, reference frames bit-identical to ``z_ref``.
        """
        check_latents(z_ref, "z_ref")
        check_mask(mask, z_ref)
        mask = mask.to(z_ref.device)  # (B, T)
        generator = _default_generator(generator)
        grid = self.timesteps().tolist()  # S+1 python floats, 1 -> 0
        z = self.init_latents(z_ref, mask, generator)  # (B, T, C, h, w)
        for i in tqdm(range(self.steps), desc="DDIM", disable=not progress, leave=False):
            z = self.step(denoise_fn, z, grid[i], grid[i + 1], mask, z_ref, generator)  # (B, T, C, h, w)
            if callback is not None:
                callback(i, grid[i + 1], z)
        return torch.where(frame_mask(mask), z.to(z_ref.dtype), z_ref)  # (B, T, C, h, w)


# --------------------------------------------------------------------------------------------------
# Model-based convenience
# --------------------------------------------------------------------------------------------------


def ddim_sample(
    model: nn.Module,
    z_ref: torch.Tensor,
    mask: torch.Tensor,
    plan: torch.Tensor | None,
    steps: int = 25,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    progress: bool = False,
    callback: StepCallback | None = None,
    schedule: CosineSchedule | None = None,
) -> torch.Tensor:
    """Sample the masked frames with a generator network and optional guidance on the plan.

    Args:
        model: ``model(z_t (B,T,C,h,w), t (B,), plan (B,T,N,D) | None, mask (B,T)) -> v``; with
            ``guidance_scale != 1`` also ``model.null_plan(B, T, N)``. Called once per step.
        z_ref: ``(B, T, C, h, w)`` latents holding the reference frames. mask: ``(B, T)`` bool, True = generate.
        plan: ``(B, T, N, D)`` planning signal, or None for the null plan.
        steps: DDIM steps >= 1. guidance_scale: 2.5 for I2V, 1.0 for interpolation (paper).
        generator, eta, progress, callback: see :meth:`DDIMSampler.sample`.
        schedule: the training schedule (default ``CosineSchedule()``; pass the trained shift).
    Returns:
        z0 ``(B, T, C, h, w)`` in z_ref's dtype, reference frames bit-identical to ``z_ref``.
    """
    check_mask(mask, z_ref)
    denoise_fn = guided_denoise_fn(model, plan, mask.to(z_ref.device), guidance_scale)
    sampler = DDIMSampler(schedule, steps, eta)
    return sampler.sample(denoise_fn, z_ref, mask, generator, progress, callback)

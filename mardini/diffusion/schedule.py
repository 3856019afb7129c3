"""Cosine noise schedule in continuous time with v-prediction (PAPER.md §3.1, §4).

What the paper fixes: v-prediction for the generation model, DDIM sampling, classifier-free guidance on the
planning signal (2.5 for image-to-video, none for interpolation). What it leaves open and we choose: a cosine
schedule in continuous time t in [0, 1] (0 = clean, 1 = pure noise), training times drawn uniformly from a
1000-step grid, unweighted MSE on the masked frames (ARCHITECTURE.md, decisions table).

    z_t = alpha(t) z0 + sigma(t) eps,   alpha = cos(pi/2 t'),  sigma = sin(pi/2 t'),  alpha^2 + sigma^2 = 1
    v   = alpha eps - sigma z0,         z0 = alpha z_t - sigma v,  eps = sigma z_t + alpha v

Only masked frames (mask True) are noised; reference frames stay clean and bit-identical.
"""

from __future__ import annotations

import math

import torch

from mardini.diffusion.checks import check_latents, check_mask, check_t, frame_mask


class CosineSchedule:
    """Variance-preserving cosine schedule with an optional resolution shift of the time axis.

    Args:
        num_train_steps: N, the size of the training grid {1/N, 2/N, ..., 1} that :meth:`sample_t` draws from.
        shift: s > 0. The network's time t is mapped to ``t' = s t / (1 + (s - 1) t)`` before the cosine
            (the time shift of Esser et al. 2024, SD3). It keeps t' = 0 and 1 fixed, is monotone, and for
            s > 1 spends more of the time axis at high noise, which larger frames need since neighbouring
            pixels/latents are more redundant (a rule of thumb: s = sqrt(pixels / reference pixels)).
            s = 1 is the plain cosine schedule. The network always sees the unshifted t.
    """

    def __init__(self, num_train_steps: int = 1000, shift: float = 1.0) -> None:
        if int(num_train_steps) != num_train_steps or num_train_steps < 1:
            raise ValueError(f"num_train_steps must be a positive integer, got {num_train_steps!r}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0 (1 = no shift), got {shift!r}")
        self.num_train_steps = int(num_train_steps)
        self.shift = float(shift)

    def __repr__(self) -> str:
        return f"CosineSchedule(num_train_steps={self.num_train_steps}, shift={self.shift})"

    # ----------------------------------------------------------------------------------------------
    # Time axis
    # ----------------------------------------------------------------------------------------------

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        """Network time t ``(B,)`` in [0, 1] -> schedule time t' ``(B,)`` in [0, 1] (identity when shift = 1)."""
        if self.shift == 1.0:
            return t
        s = self.shift
        return s * t / (1 + (s - 1) * t)  # (B,)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal and noise scales for times ``t`` ``(B,)`` in [0, 1].

        Returns ``(alpha, sigma)``, each ``(B, 1, 1, 1, 1)`` in t's float dtype, exact at the endpoints
        (t = 0 -> (1, 0), t = 1 -> (0, 1)). Computed in float64 so that alpha^2 + sigma^2 = 1 to rounding.
        """
        check_t(t)
        return self._alpha_sigma(t)

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`alpha_sigma` of a ``t`` its caller has checked."""
        tp = self.shifted(t.double())  # (B,)
        # sin of the complement instead of cos: cos(pi/2) is not exactly 0 in floating point.
        alpha = torch.sin(0.5 * math.pi * (1 - tp))  # (B,)
        sigma = torch.sin(0.5 * math.pi * tp)  # (B,)
        shape = (-1, 1, 1, 1, 1)
        return alpha.to(t.dtype).view(shape), sigma.to(t.dtype).view(shape)  # (B, 1, 1, 1, 1) x 2

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha^2 / sigma^2`` ``(B,)`` float64 for times ``t`` ``(B,)`` in (0, 1] (inf at 0)."""
        alpha, sigma = self.alpha_sigma(t.double())  # (B, 1, 1, 1, 1) x 2
        return (alpha.square() / sigma.square()).flatten()  # (B,)

    def sample_t(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Training times ``(batch,)`` float32, uniform over the grid {1/N, ..., 1}; never 0 (that is a clean frame).

        Drawn on the generator's device (CPU when ``generator`` is None, which uses the global RNG: pass one
        for reproducible runs), then moved to ``device`` (default: the generator's device).
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        k = torch.randint(1, self.num_train_steps + 1, (batch,), generator=generator, device=gen_device)  # (B,)
        t = k.float() / self.num_train_steps  # (B,)
        return t if device is None else t.to(device)

    # ----------------------------------------------------------------------------------------------
    # Forward process and parameterisation
    # ----------------------------------------------------------------------------------------------

    def q_sample(
        self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Noise the masked frames: ``z_t = alpha z0 + sigma noise`` where mask is True, ``z0`` elsewhere.

        Args:
            z0: clean latents ``(B, T, C, h, w)``.
            noise: standard normal ``(B, T, C, h, w)``.
            t: ``(B,)`` in [0, 1], one time per clip.
            mask: ``(B, T)`` bool, True = generate; None noises every frame.
        Returns:
            ``(B, T, C, h, w)`` in z0's dtype; reference frames are bit-identical to ``z0``.
        """
        check_latents(z0, "z0")
        if noise.shape != z0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal z0 shape {tuple(z0.shape)}")
        check_t(t, z0.shape[0])
        alpha, sigma = self._alpha_sigma(t)  # (B, 1, 1, 1, 1) x 2
        z_t = (alpha * z0 + sigma * noise).to(z0.dtype)  # (B, T, C, h, w)
        if mask is None:
            return z_t
        check_mask(mask, z0)
        return torch.where(frame_mask(mask), z_t, z0)  # (B, T, C, h, w), references untouched

    def v_target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity target ``v = alpha noise - sigma z0``: z0, noise ``(B, T, C, h, w)``, t ``(B,)`` -> same shape."""
        check_latents(z0, "z0")
        check_t(t, z0.shape[0])
        alpha, sigma = self._alpha_sigma(t)  # (B, 1, 1, 1, 1) x 2
        return (alpha * noise - sigma * z0).to(z0.dtype)  # (B, T, C, h, w)

    def predict_x0_eps(
        self, z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean latents and noise from a velocity: ``x0 = alpha z_t - sigma v``, ``eps = sigma z_t + alpha v``.

        Args: z_t, v ``(B, T, C, h, w)``; t ``(B,)`` in [0, 1]. Returns ``(x0, eps)``, each ``(B, T, C, h, w)``.
        """
        check_latents(z_t, "z_t")
        if v.shape != z_t.shape:
            raise ValueError(f"v shape {tuple(v.shape)} must equal z_t shape {tuple(z_t.shape)}")
        check_t(t, z_t.shape[0])
        return self._predict_x0_eps(z_t, v, t)

    def _predict_x0_eps(
        self, z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_x0_eps` of inputs its caller has checked."""
        alpha, sigma = self._alpha_sigma(t)  # (B, 1, 1, 1, 1) x 2
        x0 = alpha * z_t - sigma * v  # (B, T, C, h, w)
        eps = sigma * z_t + alpha * v  # (B, T, C, h, w)
        return x0, eps

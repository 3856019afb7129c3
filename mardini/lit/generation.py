"""Generator warm-up (PAPER.md Eq. 1): masked v-prediction with the learned null planning signal."""

from __future__ import annotations

import torch
from torch import nn

from mardini.diffusion.anchor import FrameAnchor, check_anchor
from mardini.diffusion.loss import masked_mse_per_sample, min_snr_weight, motion_weights
from mardini.diffusion.schedule import CosineSchedule
from mardini.lit.base import MarDiniBase
from mardini.lit.clip_draws import Draws, draw_rows
from mardini.models.registry import build_generator, generator_overrides


class GenerationModule(MarDiniBase):
    """Trains the generator alone on ``|| M v - M G(z_t, t, null_plan, M) ||^2``; references stay clean at t=0.

    Args:
        schedule_shift: resolution shift of the cosine schedule (1 = none); see ``CosineSchedule``.
        anchor: ``nearest`` diffuses each generated frame's change from its nearest given frame, divided by
            ``anchor_scale`` (beyond the paper); ``none`` = the paper's target, the frame; see ``FrameAnchor``.
        anchor_scale: the divisor of ``anchor: nearest``'s change (``python -m mardini.autoencoders.pixel_stats
            --anchor-keep-ratio LO HI`` measures it).
        loss_weighting: ``min_snr`` weighs each training clip's loss by Min-SNR-gamma (Hang et al. 2023; beyond the
            paper, see ``min_snr_weight``); ``motion`` weighs each element of a generated frame by how much it
            changed since the nearest given frame, ``1 + motion_strength * |change|`` normalised to mean 1 per clip
            (beyond the paper, see ``motion_weights``); ``none`` (the paper's) leaves it unweighted. Validation
            losses stay unweighted, so their curves compare across weightings.
        min_snr_gamma: the gamma of ``loss_weighting: min_snr`` (5 in Hang et al.).
        motion_strength: the strength of ``loss_weighting: motion`` (0 = unweighted).
        **kwargs: see :class:`MarDiniBase`.
    """

    KIND = "generation"

    WEIGHTINGS = ("none", "min_snr", "motion")

    def __init__(self, *args, schedule_shift: float = 1.0, anchor: str = "none", anchor_scale: float = 1.0,
                 loss_weighting: str = "none", min_snr_gamma: float = 5.0, motion_strength: float = 2.0,
                 **kwargs) -> None:
        if schedule_shift <= 0:
            raise ValueError(f"model.schedule_shift={schedule_shift!r} is impossible: it must be > 0")
        if loss_weighting not in self.WEIGHTINGS:
            raise ValueError(f"model.loss_weighting={loss_weighting!r} is impossible: allowed {list(self.WEIGHTINGS)}")
        if not min_snr_gamma > 0:
            raise ValueError(f"model.min_snr_gamma={min_snr_gamma!r} is impossible: it must be > 0 (5 in Hang et al.)")
        if not motion_strength >= 0:
            raise ValueError(f"model.motion_strength={motion_strength!r} is impossible: it must be >= 0 "
                             "(0 = unweighted)")
        check_anchor(anchor, anchor_scale)
        super().__init__(*args, **kwargs)
        self.schedule = CosineSchedule(shift=schedule_shift)
        self.anchor = FrameAnchor(anchor, anchor_scale)
        self.loss_weighting, self.min_snr_gamma = loss_weighting, float(min_snr_gamma)
        self.motion_strength = float(motion_strength)

    def build_networks(self) -> dict[str, nn.Module]:
        # plan_dim follows the planner a later joint stage builds from the same size and planner overrides
        overrides = generator_overrides(self.hparams.size, self.hparams.planner, self.hparams.generator,
                                        with_planner=False)
        overrides.setdefault("in_channels", self.autoencoder.latent_channels)
        return {"generator": build_generator(self.hparams.size, **overrides)}

    def diffusion_loss(
        self, z_high: torch.Tensor, plan: torch.Tensor | None, mask: torch.Tensor, generator: Draws,
        weighted: bool = True,
    ) -> torch.Tensor:
        """Per-sample masked v-prediction loss ``(B,)`` for latents ``(B, T, C, h, w)`` and a plan (or None),
        times the ``loss_weighting``'s per-clip weights when ``weighted``."""
        b = z_high.shape[0]
        t = draw_rows(lambda n, g: self.schedule.sample_t(n, generator=g), b, generator).to(z_high.device)  # (B,)
        noise = draw_rows(lambda n, g: torch.randn((n, *z_high.shape[1:]), generator=g), b,
                          generator).to(z_high.device)  # (B, T, C, h, w)
        z0 = self.anchor.to_target(z_high, mask)  # (B, T, C, h, w): the latents, or residuals from the anchor
        z_t = self.schedule.q_sample(z0, noise, t, mask)  # (B, T, C, h, w), references clean
        v_target = self.schedule.v_target(z0, noise, t)  # (B, T, C, h, w)
        net = self.networks["generator"]
        estimate = self.self_cond_estimate(z_t, t, plan, mask, generator) if net.cfg.self_cond else None
        v_hat = net(z_t, t, plan, mask, self_cond=estimate)  # (B, T, C, h, w)
        motion = weighted and self.loss_weighting == "motion"
        weight = motion_weights(z_high, mask, self.motion_strength) if motion else None  # (B, T, 1, h, w)
        loss = masked_mse_per_sample(v_hat.float(), v_target, mask, weight)  # (B,)
        if weighted and self.loss_weighting == "min_snr":
            loss = loss * min_snr_weight(self.schedule.snr(t), self.min_snr_gamma).to(loss)  # (B,)
        return loss

    @torch.no_grad()
    def self_cond_estimate(self, z_t: torch.Tensor, t: torch.Tensor, plan: torch.Tensor | None, mask: torch.Tensor,
                           generator: Draws) -> torch.Tensor:
        """Self-conditioning in training (Chen et al. 2022): for half of the clips, the x0 estimate of a first,
        gradient-free forward (what sampling feeds from the previous step); zeros for the rest (the first step).
        ``(B, T, C, h, w)``; only the chosen clips run the extra forward."""
        use = draw_rows(lambda n, g: torch.rand(n, generator=g), z_t.shape[0], generator) < 0.5  # (B,) on the CPU
        estimate = torch.zeros_like(z_t)  # (B, T, C, h, w)
        idx = use.nonzero().squeeze(1).to(z_t.device)  # (K,)
        if idx.numel():
            sub_plan = None if plan is None else plan.detach()[idx]  # (K, T, N, D)
            v = self.networks["generator"](z_t[idx], t[idx], sub_plan, mask[idx])  # (K, T, C, h, w)
            estimate[idx] = self.schedule.predict_x0_eps(z_t[idx], v.to(z_t.dtype), t[idx])[0].to(z_t.dtype)
        return estimate

    def compute_loss(self, batch: dict, generator: Draws, train: bool) -> torch.Tensor:
        z_high = self.latents_high(batch)  # (B, T, C, h, w)
        b, t = z_high.shape[:2]
        mask, template = draw_rows(lambda n, g: self.mask_sampler.draw(n, t, g), b, generator)  # (B, T), (B,)
        mask = mask.to(z_high.device)
        self._last_template = template.to(z_high.device)
        self._last_generated = mask.sum(1)  # (B,) generated frames per clip
        return self.diffusion_loss(z_high, None, mask, generator, weighted=train)

    def tokens_per_clip(self, batch: dict) -> int:
        f = self.autoencoder.downsample * self.networks["generator"].cfg.patch_size
        key = "z_high" if "z_high" in batch else "video"
        t, h, w = batch[key].shape[1], batch[key].shape[-2], batch[key].shape[-1]
        if key == "z_high":
            f = self.networks["generator"].cfg.patch_size
        return int(t if self.frames is None else self.frames) * (h // f) * (w // f)

"""Planner warm-up (PAPER.md Eq. 2): masked regression of the low-resolution latents through the projection head."""

from __future__ import annotations

import torch
from torch import nn

from mardini.diffusion.loss import masked_mse_per_sample
from mardini.lit.base import MarDiniBase
from mardini.lit.clip_draws import Draws, draw_rows
from mardini.models.registry import build_planner


class PlanningModule(MarDiniBase):
    """Trains the planner alone: ``|| M z_low - M head(planner(z_low, M)) ||^2`` over masked frames."""

    KIND = "planning"

    def build_networks(self) -> dict[str, nn.Module]:
        overrides = dict(self.hparams.planner or {})
        overrides.setdefault("in_channels", self.autoencoder.latent_channels)
        return {"planner": build_planner(self.hparams.size, **overrides)}

    def compute_loss(self, batch: dict, generator: Draws, train: bool) -> torch.Tensor:
        z_low = self.latents_low(batch)  # (B, T, C, h', w')
        b, t = z_low.shape[:2]
        mask, template = draw_rows(lambda n, g: self.mask_sampler.draw(n, t, g), b, generator)  # (B, T), (B,)
        mask = mask.to(z_low.device)
        planner = self.networks["planner"]
        plan = planner(z_low, mask)  # (B, T, N_low, D)
        recon = planner.project(plan, size=tuple(z_low.shape[-2:]))  # (B, T, C, h', w')
        self._last_template = template.to(z_low.device)
        self._last_generated = mask.sum(1)  # (B,) generated frames per clip
        return masked_mse_per_sample(recon.float(), z_low, mask)  # (B,)

    def tokens_per_clip(self, batch: dict) -> int:
        return self._planner_tokens(batch)

    def _planner_tokens(self, batch: dict) -> int:
        """The planner's tokens of one clip: its copy's (cached ``z_low``, or :func:`planner_size` of the frames,
        the aspect ratio kept) token grid x the frames."""
        from mardini.data.transforms import planner_size

        patch = self.networks["planner"].cfg.patch_size
        if "z_low" in batch:
            t, (h, w), f = batch["z_low"].shape[1], batch["z_low"].shape[-2:], patch  # latents: (B, T, C, h', w')
        else:
            video = batch["video"]  # (B, T, 3, H, W)
            t, f = video.shape[1], self.autoencoder.downsample * patch
            h, w = planner_size(video.shape[-2], video.shape[-1], self.hparams.planner_resolution)
        return int(t if self.frames is None else self.frames) * (h // f) * (w // f)

"""Joint training (PAPER.md Eq. 3): planner and generator end to end under one masked diffusion loss."""

from __future__ import annotations

import torch
from torch import nn

from mardini.lit.generation import GenerationModule
from mardini.lit.planning import PlanningModule
from mardini.models.registry import build_generator, build_planner


class MarDiniModule(GenerationModule):
    """The planner reads the low-res clip once, the generator denoises the high-res masked frames from its plan.

    Gradients of the diffusion loss reach the planner. With probability ``plan_dropout`` (10 % in the paper) a
    clip's planning signal is replaced by the generator's learned null plan, which classifier-free guidance
    needs at sampling time. The planner's projection head is not part of this stage.

    Args:
        planner_ckpt: a planner warm-up (``planning``) checkpoint to start the planner from.
        generator_ckpt: a generator warm-up (``generation``) checkpoint to start the generator from.
        plan_dropout: probability of the null plan per clip, in [0, 1).
        **kwargs: see :class:`GenerationModule` / :class:`MarDiniBase` (``init_from`` continues a joint stage).
    """

    KIND = "joint"

    def __init__(
        self,
        *args,
        planner_ckpt: str | None = None,
        generator_ckpt: str | None = None,
        plan_dropout: float = 0.1,
        **kwargs,
    ) -> None:
        if not 0.0 <= plan_dropout < 1.0:
            raise ValueError(f"model.plan_dropout={plan_dropout!r} is impossible: it must be in [0, 1)")
        super().__init__(*args, **kwargs)
        self.plan_dropout = plan_dropout
        if planner_ckpt:
            self.load_networks_from(planner_ckpt, kinds=("planning",), names=("planner",))
        if generator_ckpt:
            self.load_networks_from(generator_ckpt, kinds=("generation",), names=("generator",))

    def build_networks(self) -> dict[str, nn.Module]:
        channels = self.autoencoder.latent_channels
        p_over = dict(self.hparams.planner or {})
        p_over.setdefault("in_channels", channels)
        g_over = dict(self.hparams.generator or {})
        g_over.setdefault("in_channels", channels)
        planner = build_planner(self.hparams.size, **p_over)
        planner.drop_head()
        return {"planner": planner, "generator": build_generator(self.hparams.size, **g_over)}

    def compute_loss(self, batch: dict, generator: torch.Generator, train: bool) -> torch.Tensor:
        z_high = self.latents_high(batch)  # (B, T, C, h, w)
        z_low = self.latents_low(batch)  # (B, T, C, h', w')
        b, t = z_high.shape[:2]
        mask, template = self.mask_sampler.sample(b, t, generator)  # (B, T), (B,)
        mask = mask.to(z_high.device)
        self._last_template = template.to(z_high.device)
        plan = self.networks["planner"](z_low, mask)  # (B, T, N_low, D)
        if train and self.plan_dropout > 0:
            drop = (torch.rand(b, generator=generator) < self.plan_dropout).to(plan.device)  # (B,)
            null = self.networks["generator"].null_plan(b, t, plan.shape[2]).to(plan.dtype)  # (B, T, N_low, D)
            plan = torch.where(drop[:, None, None, None], null, plan)  # (B, T, N_low, D)
        return self.diffusion_loss(z_high, plan, mask, generator)

    def tokens_per_clip(self, batch: dict) -> int:
        return GenerationModule.tokens_per_clip(self, batch) + PlanningModule._planner_tokens(self, batch)

"""Joint training (PAPER.md Eq. 3): planner and generator end to end under one masked diffusion loss."""

from __future__ import annotations

import fnmatch

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from mardini.diffusion.loss import masked_mse_per_sample
from mardini.lit.base import window_means
from mardini.lit.clip_draws import Draws, draw_rows
from mardini.lit.generation import GenerationModule
from mardini.lit.planning import PlanningModule
from mardini.models.registry import build_generator, build_planner, generator_overrides


class MarDiniModule(GenerationModule):
    """The planner reads the low-res clip once, the generator denoises the high-res masked frames from its plan.

    Gradients of the diffusion loss reach the planner. With probability ``plan_dropout`` (10 % in the paper) a
    clip's planning signal is replaced by the generator's learned null plan, which classifier-free guidance
    needs at sampling time. The planner's projection head is not part of this stage. The generator's ``plan_dim``
    follows the planner's ``dim`` (``planner: {dim: 256}`` widens both); a different one is refused.

    Args:
        planner_ckpt: a planner warm-up (``planning``) checkpoint to start the planner from.
        generator_ckpt: a generator warm-up (``generation``) checkpoint to start the generator from.
        plan_dropout: probability of the null plan per clip, in [0, 1).
        plan_recon_weight: weight of an auxiliary masked reconstruction loss (the warm-up's Eq. 2) on the planner's
            projection head during joint training. 0 (the paper): the head is removed. > 0 keeps the head (loaded
            with the planner warm-up) so the plan stays a readable forecast of the masked frames while the
            generator learns to read it; the head is never used at sampling time. The stage's losses
            (``train/loss``, ``val/loss``, per template too) are then the diffusion loss plus this weight times the
            reconstruction loss; ``{train,val}/diffusion_loss`` and ``{train,val}/plan_recon_loss`` are the parts.
        train_only: ``fnmatch`` patterns of the network parameters this stage trains (names as in
            ``networks.named_parameters()``, e.g. ``generator.blocks.*.cross.*``); the rest stay frozen. None: all.
            A joint-model stage can train the planner and the generator's plan-reading layers only, so that the
            loss can only fall through the plan (a generator warmed up with a null plan otherwise ignores it).
            A frozen parameter of a network loaded from a checkpoint takes its loaded EMA weight, raw and EMA alike
            (:meth:`frozen_take_loaded_ema`): the weight that checkpoint samples with. A resume under a
            ``train_only`` that trains other parameters than the run did is refused (:meth:`_check_same_train_only`).
        **kwargs: see :class:`GenerationModule` / :class:`MarDiniBase` (``init_from`` continues a joint stage).
    """

    KIND = "joint"

    def __init__(
        self,
        *args,
        planner_ckpt: str | None = None,
        generator_ckpt: str | None = None,
        plan_dropout: float = 0.1,
        plan_recon_weight: float = 0.0,
        train_only: list[str] | None = None,
        **kwargs,
    ) -> None:
        if not 0.0 <= plan_dropout < 1.0:
            raise ValueError(f"model.plan_dropout={plan_dropout!r} is impossible: it must be in [0, 1)")
        if not plan_recon_weight >= 0.0:
            raise ValueError(f"model.plan_recon_weight={plan_recon_weight!r} is impossible: it must be >= 0 (0 = off)")
        super().__init__(*args, **kwargs)
        self.plan_dropout = plan_dropout
        self.plan_recon_weight = plan_recon_weight
        self._last_parts: torch.Tensor | None = None  # (B, [diffusion, plan recon]) of the last compute_loss
        self._val_part_sums: torch.Tensor | None = None  # ([diffusion sum, plan recon sum, clips]) of this validation
        if planner_ckpt:
            self.load_networks_from(planner_ckpt, kinds=("planning",), names=("planner",), setting="planner_ckpt")
        if generator_ckpt:
            self.load_networks_from(generator_ckpt, kinds=("generation",), names=("generator",),
                                    setting="generator_ckpt")
        if train_only is not None:
            self.freeze_all_but(list(train_only))
            self.frozen_take_loaded_ema()

    def freeze_all_but(self, patterns: list[str]) -> None:
        """Freeze every network parameter whose name matches none of the ``fnmatch`` patterns."""
        names = [name for name, _ in self.networks.named_parameters()]
        unused = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
        if not patterns or unused:
            what = f"{unused} matches no parameter" if unused else "is empty (null trains every parameter)"
            raise ValueError(
                f"model.train_only={patterns!r}: {what}; names look like "
                f"{names[0]!r}, {names[-1]!r} (fnmatch patterns, e.g. 'planner.*', 'generator.blocks.*.cross.*')"
            )
        trained = set(self.trained_parameters(patterns))
        for name, param in self.networks.named_parameters():
            param.requires_grad_(name in trained)

    def trained_parameters(self, patterns: list[str] | None) -> list[str]:
        """The network parameters that ``train_only=patterns`` trains (None: all), by name."""
        names = [name for name, _ in self.networks.named_parameters()]
        if patterns is None:
            return names
        return [name for name in names if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]

    def check_checkpoint(self, checkpoint: dict, path: str | None, fitting: bool) -> None:
        """The base's checks, and for a fit to resume the same trained parameters (:meth:`_check_same_train_only`)."""
        super().check_checkpoint(checkpoint, path, fitting)
        if fitting:
            self._check_same_train_only(checkpoint, path or "<resumed checkpoint>")

    def _check_same_train_only(self, checkpoint: dict, path: str) -> None:
        """Refuse to resume a run under a ``train_only`` that trains other parameters than the run did: its
        optimiser state holds the moments of the parameters it trained, which Lightning fails to load into this
        fit's optimiser ("loaded state dict contains a parameter group that doesn't match the size of optimizer's
        group") or, the counts alike, gives to other parameters."""
        theirs = (checkpoint.get("hyper_parameters") or {}).get("train_only")
        ours = self.hparams.get("train_only")
        was, now = self.trained_parameters(theirs), self.trained_parameters(ours)
        if set(was) == set(now):
            return
        more, fewer = [n for n in now if n not in was], [n for n in was if n not in now]  # in the networks' order
        differ = " and ".join(f"{what} {len(names)} parameters {whose} ({', '.join(names[:3])}"
                              f"{' ...' if len(names) > 3 else ''})"
                              for what, names, whose in (("trains", more, "the run froze"),
                                                         ("freezes", fewer, "it trained")) if names)
        raise ValueError(
            f"{path} was trained with model.init_args.train_only={theirs!r}, this fit has {ours!r}, which {differ}"
            ": a resume goes on with the run's optimiser, whose state holds the parameters it "
            f"trained. Resume with train_only: {theirs!r} (the run's config.yaml), or fine-tune its weights under the "
            f"new setting as a new run: --model.init_args.init_from {path} with --ckpt_path null and another "
            "trainer.logger name (a folder of its own)")

    def frozen_take_loaded_ema(self) -> None:
        """Set each parameter ``train_only`` froze, of a network whose EMA this start loaded (``init_from``,
        ``planner_ckpt``, ``generator_ckpt``), to its loaded EMA weight: the weight the checkpoint samples with, which
        the stage then trains beside and keeps as its EMA (an EMA that restarts from its raw weights, or goes on with
        ``ema_keep_loaded``, stays it exactly), so the stage samples with it too."""
        ema = dict(self.ema.module.named_parameters())
        frozen = [(name, p) for name, p in self.networks.named_parameters()
                  if not p.requires_grad and name.split(".", 1)[0] in self._ema_loaded]
        with torch.no_grad():
            for name, p in frozen:
                p.copy_(ema[name])
        if frozen:
            rank_zero_info(f"train_only: {_frozen_counts(self.networks, [name for name, _ in frozen])} take their "
                           "loaded EMA weights, the ones the checkpoint samples with, as raw and EMA weights alike")

    def build_networks(self) -> dict[str, nn.Module]:
        channels = self.autoencoder.latent_channels
        p_over = dict(self.hparams.planner or {})
        p_over.setdefault("in_channels", channels)
        g_over = generator_overrides(self.hparams.size, p_over, self.hparams.generator)  # plan_dim: planner's dim
        g_over.setdefault("in_channels", channels)
        planner = build_planner(self.hparams.size, **p_over)
        if not self.hparams.get("plan_recon_weight", 0.0):
            planner.drop_head()
        return {"planner": planner, "generator": build_generator(self.hparams.size, **g_over)}

    def compute_loss(self, batch: dict, generator: Draws, train: bool) -> torch.Tensor:
        z_high = self.latents_high(batch)  # (B, T, C, h, w)
        z_low = self.latents_low(batch)  # (B, T, C, h', w')
        b, t = z_high.shape[:2]
        mask, template = draw_rows(lambda n, g: self.mask_sampler.draw(n, t, g), b, generator)  # (B, T), (B,)
        mask = mask.to(z_high.device)
        self._last_template = template.to(z_high.device)
        self._last_generated = mask.sum(1)  # (B,) generated frames per clip
        planner = self.networks["planner"]
        plan = planner(z_low, mask)  # (B, T, N_low, D)
        recon_loss = None
        if self.plan_recon_weight > 0:  # Eq. 2 on the masked frames, as in the planner warm-up
            recon = planner.project(plan, size=tuple(z_low.shape[-2:]))  # (B, T, C, h', w')
            recon_loss = masked_mse_per_sample(recon.float(), z_low, mask)  # (B,)
        if train and self.plan_dropout > 0:
            drop = (draw_rows(lambda n, g: torch.rand(n, generator=g), b, generator)
                    < self.plan_dropout).to(plan.device)  # (B,)
            null = self.networks["generator"].null_plan(b, t, plan.shape[2]).to(plan.dtype)  # (B, T, N_low, D)
            plan = torch.where(drop[:, None, None, None], null, plan)  # (B, T, N_low, D)
        loss = self.diffusion_loss(z_high, plan, mask, generator, weighted=train)  # (B,)
        recon_part = recon_loss if recon_loss is not None else torch.zeros_like(loss)  # (B,)
        self._last_parts = torch.stack([loss.detach().float(), recon_part.detach().float()], 1)  # (B, 2)
        if recon_loss is not None:
            loss = loss + self.plan_recon_weight * recon_loss  # (B,)
        return loss

    def _log_train(self, batch: dict, per_sample: torch.Tensor, loss: torch.Tensor) -> None:
        """The base's, and the parts of the loss (:attr:`_last_parts`): ``train/diffusion_loss``, and
        ``train/plan_recon_loss`` where ``plan_recon_weight`` > 0: means over the clips of this batch, or under
        gradient accumulation over those of the window so far, as ``train/loss``. Logged here, by the training step,
        so that ``compute_loss`` logs nothing (it also runs outside a fit)."""
        super()._log_train(batch, per_sample, loss)
        parts = self._last_parts  # (B, [diffusion, plan recon])
        names = ("train/diffusion_loss", "train/plan_recon_loss")[: 2 if self.plan_recon_weight > 0 else 1]
        window = None
        if self._accumulating():
            rows = torch.stack([parts.sum(0), parts.new_full((2,), parts.shape[0])], 1)  # (2, [sum, clips])
            window = window_means(self._add_to_train_window("parts", rows))  # ((2,), clips)
        for i, name in enumerate(names):
            if window is None:  # one batch per step: its own means, as always
                self.log(name, parts[:, i].mean(), on_step=True, batch_size=parts.shape[0])
            else:
                self.log(name, window[0][i], on_step=True, batch_size=window[1][i])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The base's (``val/loss``: the diffusion loss plus ``plan_recon_weight`` x the reconstruction loss),
        and the sums of the two parts over this rank's clips, weighed as ``val/loss`` (a padded repeat: 0)."""
        super().validation_step(batch, batch_idx)
        weights = self._val_weights.to(self._last_parts)  # (B,)
        parts = self._last_parts * weights[:, None]  # (B, [diffusion, plan recon])
        sums = torch.cat([parts.sum(0), weights.sum()[None]])  # ([diffusion sum, recon sum, clips])
        self._val_part_sums = sums if self._val_part_sums is None else self._val_part_sums + sums

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_part_sums = None

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()  # val/loss; raises where no rank had a usable clip
        self._log_val_parts()

    def _log_val_parts(self) -> None:
        """``val/diffusion_loss`` and (``plan_recon_weight`` > 0) ``val/plan_recon_loss``: the parts of ``val/loss``
        as means over every rank's clips, reduced as it is (every rank sums, then one reduction at the epoch's end)."""
        sums = self._val_part_sums
        if sums is None:  # no validation batch on this rank
            sums = torch.zeros(3, device=self.device)
        sums = self._reduce_over_ranks(sums, "sum")  # ([diffusion sum, recon sum, clips])
        self.log("val/diffusion_loss", sums[0] / sums[2], sync_dist=True)  # equal on every rank
        if self.plan_recon_weight > 0:
            self.log("val/plan_recon_loss", sums[1] / sums[2], sync_dist=True)
        self._val_part_sums = None

    def tokens_per_clip(self, batch: dict) -> int:
        return GenerationModule.tokens_per_clip(self, batch) + PlanningModule._planner_tokens(self, batch)


def _frozen_counts(networks: nn.ModuleDict, frozen: list[str]) -> str:
    """``"the planner's frozen parameters (40 of 40)"``-style, for each network with a name in ``frozen``."""
    parts = []
    for net, module in networks.items():
        n = sum(1 for name in frozen if name.startswith(f"{net}."))
        if n:
            parts.append(f"the {net}'s frozen parameters ({n} of {sum(1 for _ in module.parameters())})")
    return " and ".join(parts)

"""The optimiser, the LR schedule, gradient clipping and the non-finite policy of a stage."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import grad_norm, rank_zero_warn
from torch import nn

from mardini.lit.fsdp import attached_trainer, fsdp_root, unwrapped_name
from mardini.lit.schedules import scaled_lr, short_warmup, warmup_cosine


class Optimisation:
    """:class:`~mardini.lit.base.MarDiniBase`'s AdamW (``blr * global_batch / 256``, weight decay on matrices),
    warm-up + cosine, clipping, and the optimiser step that skips non-finite steps and updates the EMA."""

    def global_batch_size(self) -> int:
        """Clips per optimiser step over all ranks (the LR rule's batch; the same on every rank)."""
        return self._step_clips(None) * self.trainer.accumulate_grad_batches

    def weight_decay_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The trainable parameters with weight decay (the networks' matrices) and without (biases, norms, tokens),
        by the shapes recorded at construction: FSDP flattens each parameter to a 1-D shard view, so its ``ndim`` no
        longer tells, and wrappers (FSDP units, activation checkpointing, compile) add to the names."""
        decay, no_decay = [], []
        for name, p in self.networks.named_parameters():
            if not p.requires_grad:
                continue
            ndim = self._param_ndim.get(unwrapped_name(name))
            if ndim is None:
                raise RuntimeError(f"parameter {name!r} was not in the networks when the module was built (a wrapper "
                                   "whose name prefix mardini.lit.fsdp.WRAPPED_PREFIXES does not know?), so its weight "
                                   "decay cannot be decided; add the prefix there")
            (decay if ndim >= 2 else no_decay).append(p)
        return decay, no_decay

    def peak_lr(self) -> float:
        """The LR schedule's peak: ``model.lr``, else ``model.blr`` scaled by this fit's global batch."""
        hp = self.hparams
        return hp.lr if hp.lr is not None else scaled_lr(hp.blr, self.global_batch_size())

    def configure_optimizers(self):
        hp = self.hparams
        lr = self.peak_lr()
        decay, no_decay = self.weight_decay_groups()
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))
        if self.trainer.max_steps == 0:  # below, 0 would read as unset (Lightning's -1)
            raise ValueError("trainer.max_steps=0 trains nothing: give a positive number of steps (-1 = bounded by "
                             "max_epochs)")
        # the schedule's length: decay_steps, else the fit's max_steps, else (a fit bounded by max_epochs) the
        # optimiser steps Lightning estimates for it
        steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if not hp.decay_steps and not (0 < steps < float("inf")):
            raise ValueError("the LR schedule needs a length: set trainer.max_steps, trainer.max_epochs or "
                             "model.init_args.decay_steps")
        total = hp.decay_steps or max(1, int(steps))
        note = short_warmup(hp.warmup_steps, steps, self.trainer.max_steps > 0)
        if note:
            rank_zero_warn(note)
        self._schedule_steps = total
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def apply_peak_lr_on_resume(self) -> None:
        """Give a resumed fit's LR schedule this fit's :meth:`peak_lr`. Lightning's restore puts the checkpoint's
        optimiser and scheduler states back, peak included (``initial_lr``, ``base_lrs``), so a resume with another
        ``model.lr``, ``model.blr`` or ``data.batch_size`` (``blr``'s rule) trained on at the old peak, while the
        resume said it went on under the new settings. Where the peak moves, every group's LR is set from the new
        one at the step resumed and one warning gives both peaks; a resume of the same peak changes nothing."""
        trainer = self.trainer
        if trainer.ckpt_path is None:
            return
        peak = self.peak_lr()
        for config in trainer.lr_scheduler_configs:
            schedule = config.scheduler
            old = list(schedule.base_lrs)
            if all(lr == peak for lr in old) or not isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
                continue
            schedule.base_lrs = [peak] * len(old)
            for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas):
                group["initial_lr"], group["lr"] = peak, peak * factor(schedule.last_epoch)
            schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]
            hp = self.hparams
            rule = (f"model.lr {hp.lr:g}" if hp.lr is not None else
                    f"model.blr {hp.blr:g} x this fit's global batch of {self.global_batch_size()} clips / 256")
            rank_zero_warn(
                f"resuming {trainer.ckpt_path} with another LR peak than it was trained with: {old[0]:.4g} -> "
                f"{peak:.4g} ({rule}); the run goes on from step {trainer.global_step} with the new peak, on the "
                f"same schedule. To keep the run's, set model.init_args.lr: {old[0]!r}")  # its exact float

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except under FSDP, whose precision plugin refuses norm clipping: there the wrapped
        root module clips by the global norm over all shards (``FullyShardedDataParallel.clip_grad_norm_``)."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = getattr(attached_trainer(self), "strategy", None)
        if isinstance(strategy, FSDPStrategy) and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            strategy.model.clip_grad_norm_(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """The precision plugin's enabled gradient scaler (``16-mixed``), or None."""
        trainer = attached_trainer(self)
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None) if trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def on_before_optimizer_step(self, optimizer) -> None:
        """The non-finite policy on the gradient norm, except under a GradScaler: there an inf/NaN gradient is its
        overflow (it skips the step and lowers its scale; :meth:`optimizer_step` then skips the EMA update). A step
        skipped before (a non-finite loss in its accumulation window) applies no gradient of its window."""
        if self._skip_step:
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters whose grad is None
            return
        norms = grad_norm(self.networks, norm_type=2)
        total = norms.get("grad_2.0_norm_total")
        if fsdp_root(self) is not None:  # each rank holds a shard's gradients: the global norm, one decision for all
            local = (total if total is not None else torch.zeros(())).to(self.device)
            total = self.trainer.strategy.reduce(local.double() ** 2, reduce_op="sum").sqrt().float()
        if total is None:
            return
        self.log("train/grad_norm", total, on_step=True, on_epoch=False)
        if not torch.isfinite(total):
            if self._grad_scaler() is not None:
                return
            if self.hparams.nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite gradient norm ({float(total)}) at step {self.global_step}; "
                    "lower the LR, enable gradient clipping, or set model.nonfinite=skip"
                )
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters whose grad is None
            self._skip_this_step()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then the EMA update -- before any callback can checkpoint this step. A step that
        changed no weight leaves the EMA as it is: one skipped as non-finite, or one a GradScaler skipped (an
        overflow, which lowered its scale). ``element`` under accumulation rescales the window's gradients right
        after the closure's backward (:meth:`_rescale_element_window`)."""
        scaler = self._grad_scaler()
        scale = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, self._then_rescale_element_window(optimizer_closure))
        # an overflow, and only one, multiplies the scale by the backoff factor (< 1); the midpoint tells it from a
        # kept scale also where the first step's init_scale was rounded to float32
        overflow = scaler is not None and scaler.get_scale() < scale * (1 + scaler.get_backoff_factor()) / 2
        if self.global_step != self._ema_step:
            if not (self._skip_step or overflow):
                self.update_ema()
            self._ema_step = self.global_step
        self._skip_step = False

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (one answer for all: they skip or stop together)."""
        finite = torch.isfinite(loss.detach()).float()
        finite = self._reduce_over_ranks(finite, "min")
        return bool(finite > 0)

    def _on_nonfinite(self, what: str, batch: dict) -> torch.Tensor | None:
        """``stop``: raise naming the step and the batch. ``skip``: drop the step and return what training_step
        returns for it: None in one process; on several (Lightning refuses None there) a zero loss on every trainable
        parameter, whose zero gradients DDP reduces as usual, the step then changing no weight (every rank skips it:
        :meth:`_all_finite` agrees on all)."""
        keys = batch.get("key")
        if self.hparams.nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite {what} at step {self.global_step} (batch keys: {keys}); "
                "set model.nonfinite=skip to skip such steps and count them"
            )
        self._skip_this_step()
        if self._world_size() == 1:
            return None
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0  # (), connected to every parameter

    def _skip_this_step(self) -> None:
        """Drop this optimiser step, its whole accumulation window (:meth:`on_before_optimizer_step` drops the
        window's gradients, :meth:`optimizer_step` the EMA update), counted once however many micro-batches failed."""
        if not self._skip_step:
            self.nonfinite_skipped += 1
            self._skip_step = True
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True)

"""The loss arithmetic of a training step: uneven per-rank batches, the ``element`` reduction, accumulation windows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mardini.lit.batch_weight import ElementWindow, element_mean_share, loss_scale, step_batches
from mardini.lit.fsdp import attached_trainer


class LossReduction:
    """How :class:`~mardini.lit.base.MarDiniBase` turns the per-clip losses into the loss it backpropagates and the
    sums its logs average under gradient accumulation."""

    def _step_clips(self, local: int | None) -> int:
        """Clips per training batch over all ranks: the datamodule's global batch when it splits one (the ranks'
        batches may differ by one clip), else ``local`` (or the datamodule's ``batch_size // world``) x world."""
        trainer = self.trainer
        dm = trainer.datamodule
        split = step_batches(dm)
        if split is not None:
            return split[1]
        if local is None:
            local = getattr(dm, "batch_size", 1) // max(1, trainer.world_size)
        return int(local) * trainer.world_size

    def _loss_scale(self) -> float | None:
        """The factor on this rank's per-clip-mean loss for uneven per-rank batches (:func:`loss_scale`); None
        when the ranks' batches are equal (the loss is left untouched)."""
        trainer = attached_trainer(self)
        if trainer is None:
            return None
        split = step_batches(trainer.datamodule)
        return None if split is None else loss_scale(split[0], trainer.world_size, split[1])

    def _check_loss_reduction(self, accumulate: int) -> None:
        """Refuse ``loss_reduction: element`` with gradient accumulation under a strategy that accumulates by itself
        (DeepSpeed's): the window's rescale (:meth:`_rescale_element_window`) needs one optimiser-step hook a window."""
        trainer = attached_trainer(self)
        if self.hparams.loss_reduction != "element" or accumulate == 1 or trainer is None:
            return
        strategy = getattr(trainer, "strategy", None)
        if getattr(strategy, "handles_gradient_accumulation", False):
            raise ValueError(
                f"model.loss_reduction=element with trainer.accumulate_grad_batches={accumulate} under "
                f"{type(strategy).__name__}, which accumulates the gradients itself: the window's gradients cannot "
                "be rescaled to its count of generated elements; use a ddp or fsdp strategy, "
                "trainer.accumulate_grad_batches: 1, or model.loss_reduction: clip")

    def _generated_frames(self) -> torch.Tensor:
        """``(B,)`` the generated frames of each clip of the last :meth:`compute_loss`, or a ValueError naming a
        ``compute_loss`` that did not set them."""
        if self._last_generated is None:
            raise ValueError(
                "model.loss_reduction=element weighs each clip by its generated frames, but "
                f"{type(self).__name__}.compute_loss did not set self._last_generated; set it to the (B,) count of "
                "the mask's generated frames (mask.sum(1)) as PlanningModule.compute_loss does, or use "
                "model.loss_reduction: clip")
        return self._last_generated

    def _element_loss(self, per_sample: torch.Tensor, accumulate: int = 1) -> torch.Tensor:
        """This rank's share of the mean over the generated elements of the global batch (the ``element``
        reduction, :func:`element_mean_share`): the generated frames are counted over every rank. Under gradient
        accumulation divided by the window's first count instead (:class:`ElementWindow`; rescaled at its end)."""
        generated = self._generated_frames().to(per_sample.device)  # (B,)
        everywhere = generated.sum().float()  # ()
        world = self._world_size()
        # every rank, every step (no rank returns before: the non-finite check agrees on all)
        everywhere = self._reduce_over_ranks(everywhere, "sum")  # ()
        if accumulate > 1:
            everywhere = self._current_element_window().add(everywhere)  # () the window's divisor
        return element_mean_share(per_sample, generated, everywhere, world)  # ()

    def _current_element_window(self) -> ElementWindow:
        """The ``element`` counts of the accumulation window in progress (a new one at each optimiser step)."""
        if self._element_window is None or self._element_window.step != self.global_step:
            self._element_window = ElementWindow(self.global_step)
        return self._element_window

    def _rescales_element_window(self) -> bool:
        """Whether optimiser steps rescale their window's gradients: ``element`` under gradient accumulation."""
        return self.hparams.loss_reduction == "element" and self._accumulate_batches() > 1

    def _then_rescale_element_window(self, closure: Callable[[], Any] | None) -> Callable[[], Any] | None:
        """``closure`` (the window's last ``training_step`` and backward, which ``optimizer.step`` runs) followed by
        :meth:`_rescale_element_window`; ``closure`` itself where no rescale is due."""
        if closure is None or not self._rescales_element_window():
            return closure

        def closure_then_rescale() -> Any:
            result = closure()
            self._rescale_element_window()
            return result

        return closure_then_rescale

    def _rescale_element_window(self) -> None:
        """``element`` under gradient accumulation: the window's accumulated gradients times
        :meth:`ElementWindow.gradient_factor`, the gradient of the mean over all its generated elements. Runs when
        the window's last backward has returned (:meth:`optimizer_step` wraps its closure): after DDP's or FSDP's
        reduction (done inside that backward), before a GradScaler's unscaling (linear: the same gradient), every
        ``on_before_optimizer_step`` (the callbacks' first, then this module's gradient norm), Lightning's clipping
        and the step. A step dropped as non-finite (its window may have counted nothing) is left to
        :meth:`on_before_optimizer_step`."""
        if not self._rescales_element_window() or self._skip_step:
            return
        accumulate = self.trainer.accumulate_grad_batches
        factor = self._current_element_window().gradient_factor(accumulate)  # (), the same on every rank
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor.to(grads[0].device))

    def _accumulating(self) -> bool:
        """True under gradient accumulation (``trainer.accumulate_grad_batches`` above 1): the step's logged losses
        are then means over its window (:meth:`_add_to_train_window`)."""
        return self._accumulate_batches() > 1

    def _add_to_train_window(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """This micro-batch's ``rows`` ``(R, [sum, clips])`` added to the sums kept under ``name`` for the optimiser
        step's gradient-accumulation window so far; returns them ``(R, 2)``. A window is the batches of one global
        step (Lightning's, a short last one of an epoch too); every name starts it afresh together."""
        if self._train_window is None or self._train_window[0] != self.global_step:  # a new window
            self._train_window = (self.global_step, {})
        sums = self._train_window[1]
        sums[name] = rows if name not in sums else sums[name] + rows
        return sums[name]

    def _train_window_sums(self, per_sample: torch.Tensor, templates: int) -> torch.Tensor:
        """Under gradient accumulation, the per-clip losses of the optimiser step's window so far, this batch's added:
        ``(1 + templates, [loss sum, clips])``, row 0 every clip's, row ``1 + i`` template ``i``'s."""
        loss_and_count = torch.stack([per_sample.detach().float(), torch.ones_like(per_sample, dtype=torch.float32)],
                                     1)  # (B, 2)
        rows = loss_and_count.new_zeros(1 + templates, 2)  # (1 + templates, [loss sum, clips])
        rows[0] = loss_and_count.sum(0)
        rows.index_add_(0, self._last_template.to(rows.device) + 1, loss_and_count)
        return self._add_to_train_window("loss", rows)


def window_means(sums: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The means ``(R,)`` of window sums ``(R, [sum, clips])`` (0 for a row without clips) and the clips of each row
    (one host read)."""
    return sums[:, 0] / sums[:, 1].clamp(min=1), [int(c) for c in sums[:, 1].tolist()]

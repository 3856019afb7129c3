"""Loss weighting for uneven per-rank batches (:mod:`mardini.data.batch_split`) and for the two loss reductions.

DDP and FSDP average the ranks' gradients. With ``local`` clips on this rank of a ``global_batch`` over ``world``
ranks, the per-clip-mean loss times ``local * world / global_batch`` makes that average the gradient of the mean
over the global batch: ``(1 / world) sum_r (n_r W / B) (1 / n_r) sum_{i in r} g_i = (1 / B) sum_i g_i``.

The ``element`` reduction (``model.loss_reduction``) weighs clip ``i`` by its generated frames ``m_i`` instead:
each rank's loss is ``sum_{i in r} m_i l_i * W / M``, with ``M`` the generated frames of all ranks (an all-reduce,
as the counts are drawn per step), so the ranks' average is the gradient of ``(1 / M) sum_i m_i g_i``, the mean
over every generated element of the global batch, however unevenly clips and frames fall on the ranks.

With gradient accumulation (``N`` micro-batches a step) ``M`` is the generated frames of the whole window, known only
after its last micro-batch: :class:`ElementWindow` divides every micro-batch's loss by the first one's count ``D``
instead, and the accumulated gradient (Lightning divides each micro-batch's loss by ``N``) times ``N D / M`` is, since
gradients are linear in the loss, the gradient of the mean over every generated element of the window.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def loss_scale(local: int, world: int, global_batch: int) -> float | None:
    """``local * world / global_batch``, or None when it is exactly 1 (the world size divides the global batch:
    the loss is left untouched, bit for bit)."""
    if local * world == global_batch:
        return None
    return local * world / global_batch


def step_batches(datamodule: Any) -> tuple[int, int] | None:
    """``(this rank's clips per step, the global clips per step)`` from a datamodule that splits a global batch
    (``batch_size`` and ``per_rank_batch_size``, as :class:`~mardini.data.datamodule.VideoDataModule`); None for
    any other (its per-rank batches are taken to be equal)."""
    local = getattr(datamodule, "per_rank_batch_size", None)
    if local is None:
        return None
    return int(local), int(datamodule.batch_size)


def element_mean_share(per_clip: torch.Tensor, generated: torch.Tensor, all_generated: torch.Tensor,
                       world: int) -> torch.Tensor:
    """This rank's loss under the ``element`` reduction: ``sum_i generated_i per_clip_i * world / all_generated``.

    Args:
        per_clip: ``(B,)`` each clip's mean over its generated elements (0 for a clip without one).
        generated: ``(B,)`` each clip's generated frames (a clip's elements are its frames x the same C*h*w).
        all_generated: ``()`` the generated frames of the global batch (``generated.sum()`` on one rank).
        world: ranks whose gradients DDP or FSDP average.
    Returns:
        scalar: on one rank the mean over the batch's generated elements, in ``per_clip``'s dtype.
    """
    weight = generated.to(per_clip)  # (B,)
    return (per_clip * weight).sum() * (world / all_generated.to(per_clip).clamp(min=1))  # ()


@dataclasses.dataclass
class ElementWindow:
    """The ``element`` reduction's counts over one gradient-accumulation window (the module docstring's rule)."""

    step: int  # the optimiser step the window's micro-batches build
    divisor: torch.Tensor | None = None  # () D: the first micro-batch's generated frames over all ranks (at least 1)
    generated: torch.Tensor | None = None  # () the window's generated frames over all ranks so far
    rank_sums: torch.Tensor | None = None  # (2,) this rank's [sum of generated x per-clip loss, generated frames]

    def add(self, all_generated: torch.Tensor) -> torch.Tensor:
        """Counts a micro-batch's generated frames ``()`` (all ranks'); returns its loss's divisor ``D`` ``()``."""
        if self.divisor is None:
            self.divisor = all_generated.clamp(min=1)
            self.generated = torch.zeros_like(all_generated)
        self.generated = self.generated + all_generated
        return self.divisor

    def gradient_factor(self, accumulate: int) -> torch.Tensor:
        """``N D / M``: the accumulated gradient times it is the gradient of the window's element mean ``()``."""
        if self.divisor is None:
            raise RuntimeError(f"no micro-batch of optimiser step {self.step} counted its generated frames")
        return accumulate * self.divisor / self.generated.clamp(min=1)

    def rank_mean(self, per_clip: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """Adds a micro-batch's per-clip losses ``(B,)`` and generated frames ``(B,)`` on this rank; returns this
        rank's mean over the generated elements of the window so far ``()`` (a log: detached)."""
        weight = generated.to(torch.float32)  # (B,)
        sums = torch.stack([(per_clip.detach().float() * weight).sum(), weight.sum()])  # (2,)
        self.rank_sums = sums if self.rank_sums is None else self.rank_sums + sums
        return self.rank_sums[0] / self.rank_sums[1].clamp(min=1)

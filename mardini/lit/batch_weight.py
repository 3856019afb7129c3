"""Loss weighting for uneven per-rank batches (:mod:`mardini.data.batch_split`) and for the two loss reductions.

DDP and FSDP average the ranks' gradients. With ``local`` clips on this rank of a ``global_batch`` over ``world``
ranks, the per-clip-mean loss times ``local * world / global_batch`` makes that average the gradient of the mean
over the global batch: ``(1 / world) sum_r (n_r W / B) (1 / n_r) sum_{i in r} g_i = (1 / B) sum_i g_i``.

The ``element`` reduction (``model.loss_reduction``) weighs clip ``i`` by its generated frames ``m_i`` instead:
each rank's loss is ``sum_{i in r} m_i l_i * W / M``, with ``M`` the generated frames of all ranks (an all-reduce,
as the counts are drawn per step), so the ranks' average is the gradient of ``(1 / M) sum_i m_i g_i``, the mean
over every generated element of the global batch, however unevenly clips and frames fall on the ranks.
"""

from __future__ import annotations

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

"""Loss weighting for uneven per-rank batches (:mod:`mardini.data.batch_split`).

DDP and FSDP average the ranks' gradients. With ``local`` clips on this rank of a ``global_batch`` over ``world``
ranks, the per-clip-mean loss times ``local * world / global_batch`` makes that average the gradient of the mean
over the global batch: ``(1 / world) sum_r (n_r W / B) (1 / n_r) sum_{i in r} g_i = (1 / B) sum_i g_i``.
"""

from __future__ import annotations

from typing import Any


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

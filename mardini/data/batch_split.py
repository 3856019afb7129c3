"""A global batch split over the ranks, evenly or not (the paper's 720 clips on 256 GPUs: 208 ranks x 3 + 48 x 2).

Rank ``r`` of ``W`` trains on ``B // W + (1 if r < B % W else 0)`` clips of a global batch ``B`` per step; the
training loss is weighted so the gradient DDP and FSDP average over the ranks is that of the mean over the global
batch (:func:`mardini.lit.batch_weight.loss_scale`). Every rank runs the same number of batches per epoch, counted
with the largest per-rank batch (ranks that stop early would leave the others waiting at a gradient sync).
"""

from __future__ import annotations


def check_split(global_batch: int, world_size: int) -> None:
    """Raise unless every rank gets one clip per step at least (a rank with an empty batch cannot train)."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if global_batch < world_size:
        raise ValueError(
            f"data.batch_size={global_batch} is the GLOBAL batch and is smaller than the world size {world_size}: "
            f"every rank needs one clip per step at least; use data.batch_size >= {world_size} or run on fewer "
            "processes"
        )


def rank_batch(global_batch: int, rank: int, world_size: int) -> int:
    """Clips per step of ``rank``: ``global_batch // world_size``, plus one on the first ``global_batch %
    world_size`` ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} does not fit world size {world_size}")
    return global_batch // world_size + (rank < global_batch % world_size)


def largest_rank_batch(global_batch: int, world_size: int) -> int:
    """The largest per-rank batch (rank 0's): ``ceil(global_batch / world_size)``."""
    return -(-global_batch // world_size)


def epoch_batches(epoch_size: int, global_batch: int, world_size: int) -> int:
    """Training batches per epoch, the same on every rank: ``epoch_size`` (clips per rank) over the largest
    per-rank batch (the per-rank batch itself when the world size divides the global batch)."""
    return epoch_size // largest_rank_batch(global_batch, world_size)

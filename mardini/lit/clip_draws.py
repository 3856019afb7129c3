"""Random draws per batch (training) or per clip (validation), through one call site.

Training draws a batch's crops, masks, times and noise from one ``torch.Generator`` seeded by (seed, rank, step).
Validation gives every clip a generator of its own, seeded by the clip's identity (its key; a batch without keys:
its index in the dataset, :func:`validation_order`), so a clip's draws, and with them ``val/loss``, do not depend on
how the clips are batched: the same clips in batches of 2 or 4, or under another ``data.num_workers``, give the same
loss. A ``compute_loss`` draws through :func:`draw_rows`, which takes either.

Key-less clips under DDP: Lightning gives each rank its share of a map-style dataset through a ``DistributedSampler``,
whose indices are the clips' identities, so ``val/loss`` does not depend on the world size. Where the world size does
not divide the clips, the sampler pads the ranks' shares to one length by repeating the first clips of its order: those
repeats weigh 0 in every validation sum (:attr:`ValidationOrder.distinct`, :func:`clip_weights`), so each clip counts
once, keyed or not; so do those of Lightning's ``DistributedSamplerWrapper`` (a sampler of one's own under DDP). A
loader whose order cannot be read back (an iterable dataset, a random or a batch sampler of one's own) numbers its
clips by their position on each rank, and under DDP the ranks then draw alike: the module warns once
(:func:`keyless_warning`); collate a ``key`` per clip (``VideoDataModule`` does) to avoid it. Such a loader counts
every clip it yields (``VideoDataModule``'s validation stream gives each clip to exactly one rank and worker): where
its ranks' shares hold more clips than its map-style dataset, each repeat counts once more (the means lean toward the
repeated clips), and the module warns once, naming the consequence and the fix (:func:`padding_warning`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar, Union

import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler

Draws = Union[torch.Generator, "ClipGenerators"]
T = TypeVar("T", torch.Tensor, tuple)


class ClipGenerators(list):
    """One ``torch.Generator`` per clip of a batch, in the batch's order (validation's draws)."""

    @classmethod
    def for_batch(cls, seed: int, batch: dict, rows: int, first: int,
                  order: Sequence[int] | None = None) -> ClipGenerators:
        """Generators for the ``rows`` clips of ``batch``: each seeded by (``seed``, its ``key``), or for a batch
        without keys by (``seed``, ``order[first + i]``): the dataset index of the clip at position ``first + i`` of
        this rank's pass (``order``: :func:`validation_order`; None: the position itself), where ``first`` is the
        batch's index times the loader's batch size (the batches before it full)."""
        keys = batch.get("key")
        if keys is not None:
            ids = [f"key {k}" for k in keys]
        else:
            ids = [f"index {first + i if order is None else order[first + i]}" for i in range(rows)]
        if len(ids) != rows:
            raise ValueError(f"the batch has {len(ids)} keys for {rows} clips; collate one key per clip")
        return cls(torch.Generator().manual_seed(clip_seed(seed, name)) for name in ids)


class ValidationOrder(NamedTuple):
    """What :func:`validation_order` reads of this rank's validation loader."""

    batch_size: int  # the loader's batches: all full but the last
    indices: list[int] | None  # the dataset index of each clip of this rank's pass, in order (None: not readable)
    distinct: int  # the first ``distinct`` clips of the pass are the rank's own; the rest repeat the sampler's padding
    whole_set: bool = False  # a SequentialSampler: the whole set in order (every rank's, where Lightning leaves it)


def validation_order(loader) -> ValidationOrder | None:
    """The :class:`ValidationOrder` a map-style validation ``loader`` reads on this rank: its sampler's, where that
    is a ``DistributedSampler`` (Lightning's under DDP: this rank's share of the global order, each clip by its index
    in the dataset) or a ``SequentialSampler`` (one process), batched by a plain ``BatchSampler``. None for any other
    loader (an iterable dataset, a random or wrapped sampler, a batch sampler of one's own), whose order cannot be
    read back without drawing it anew. A ``SequentialSampler``'s order is the whole set (``whole_set``): under DDP
    with ``trainer.use_distributed_sampler: false`` every rank reads every clip (the evaluation callbacks then deal the
    clips they score over the ranks by index: :func:`~mardini.evaluation.callbacks.scored_positions`).

    Lightning's ``DistributedSamplerWrapper`` (its sharding of a sampler of one's own under DDP) pads by position as
    the ``DistributedSampler`` does, so its ``distinct`` is read, but not its ``indices`` (None): drawing the wrapped
    sampler again could change the pass it gives the loader."""
    sampler, batches = getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)
    if type(batches) is not BatchSampler or batches.sampler is not sampler:
        return None
    if type(sampler) is DistributedSamplerWrapper:
        return ValidationOrder(batches.batch_size, None, _distinct_share(sampler))
    if type(sampler) is not DistributedSampler and not isinstance(sampler, SequentialSampler):
        return None
    indices = list(sampler)
    if type(sampler) is DistributedSampler:
        return ValidationOrder(batches.batch_size, indices, _distinct_share(sampler))
    return ValidationOrder(batches.batch_size, indices, len(indices), whole_set=True)


def _distinct_share(sampler: DistributedSampler) -> int:
    """Clips of this rank's share that are not padding. Without ``drop_last`` the sampler pads its order of ``N``
    clips to a multiple of the ranks ``R`` by repeating its first indices, and rank ``r`` takes the positions
    ``r, r + R, ...``: those from ``N`` on are the repeats, at the end of its share (with ``drop_last``: none)."""
    if sampler.drop_last:
        return sampler.num_samples
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))


def clip_weights(order: ValidationOrder | None, first: int, rows: int) -> torch.Tensor:
    """``(rows,)`` float32 weights of the batch of clips at positions ``first ...`` of this rank's pass: 1 for a
    clip, 0 for a repeat the ``DistributedSampler`` padded in (:attr:`ValidationOrder.distinct`); all 1 where the
    order cannot be read (``order`` None)."""
    if order is None:
        return torch.ones(rows)
    return (torch.arange(first, first + rows) < order.distinct).float()  # (rows,)


def padding_warning(loader, world_size: int) -> str | None:
    """The warning for a map-style validation ``loader`` whose order :func:`validation_order` cannot read, where its
    shares over ``world_size`` ranks (each as long as this rank's: a sampler's length) hold more clips than the
    dataset: at least that many validations repeat a clip, and each repeat counts as a clip of its own (weight 1:
    :func:`clip_weights` cannot tell it apart; a keyed clip draws alike on every rank, so its loss counts again). None
    where they do not, or cannot be counted (shares that overlap within the set's size are not seen)."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    dataset = getattr(loader, "dataset", None)
    try:
        share, clips = len(sampler), len(dataset)
    except TypeError:  # no sampler or dataset length (an iterable dataset, a batch sampler of one's own)
        return None
    validated = share * world_size
    if validated <= clips:
        return None
    return (f"the validation loader gives each of the {world_size} ranks {share} clips of its {clips} "
            f"({validated} in all, {validated - clips} more than the set holds): its sampler "
            f"({type(sampler).__name__}) is not split over the ranks by Lightning, so at least {validated - clips} "
            "validations repeat a clip, and each counts once more: val/loss (its per-template and per-part means too) "
            "and, within their num_clips, the evaluation callbacks' scores are means weighted toward the repeated "
            "clips, not one process's; let Lightning split it (trainer.use_distributed_sampler: true, its default: "
            "the loader's default sampler becomes a DistributedSampler and a sampler of one's own is wrapped in its "
            "DistributedSamplerWrapper, whose padding repeats weigh 0), or give each rank a disjoint share of the set")


def keyless_warning(world_size: int) -> str:
    """The warning for key-less validation batches whose order :func:`validation_order` cannot read, under DDP."""
    return (f"validation batches without a 'key' on {world_size} ranks, from a loader whose clip order cannot be read "
            "back (not a DistributedSampler over a map-style dataset): each rank numbers its clips from 0, so the "
            "ranks draw alike (crop, mask, t, noise) and val/loss depends on the world size; collate a 'key' per clip "
            "(a string naming it) to seed each clip's draws by it")


def clip_seed(seed: int, clip: str) -> int:
    """A seed fixed by (seed, clip identity) alone: sha256, 63 bits (Python's ``hash`` of a str varies by process)."""
    digest = hashlib.sha256(f"{seed}/val/{clip}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def draw_rows(draw: Callable[[int, torch.Generator], T], rows: int, generator: Draws) -> T:
    """``draw(rows, generator)`` with one generator (the batch's draws, as training has always drawn); with
    :class:`ClipGenerators`, ``draw(1, g)`` for each clip's ``g``, concatenated along dim 0 (elementwise for a
    tuple of tensors, such as a mask sampler's ``(mask, template)``)."""
    if isinstance(generator, torch.Generator):
        return draw(rows, generator)
    if len(generator) != rows:
        raise ValueError(f"{len(generator)} clip generators for a draw of {rows} rows; give one per clip")
    parts = [draw(1, g) for g in generator]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts))
    return torch.cat(parts)


def one_per_clip(generator: Draws) -> bool:
    """True for :class:`ClipGenerators` (validation's per-clip draws)."""
    return not isinstance(generator, torch.Generator)


__all__ = ["ClipGenerators", "Draws", "ValidationOrder", "clip_seed", "clip_weights", "draw_rows", "keyless_warning",
           "one_per_clip", "padding_warning", "validation_order"]

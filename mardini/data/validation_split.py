"""Checks on the validation split at ``setup`` for a world of ranks: every rank gets a clip, ``data.val_clips``
under DDP says what it leaves out, and under FSDP every rank streams as many validation batches."""

from __future__ import annotations

import copy
import math
import os

import torch
from lightning.pytorch.strategies import FSDPStrategy

from mardini.data.setup_warnings import warn_once
from mardini.data.shard_checks import count_samples
from mardini.data.stream import ClipStream, worker_quota


def check_validation_split(pattern: str, shards: list[str], world_size: int) -> None:
    """Raise if the validation split holds fewer clips than ranks: a rank without a validation batch would leave
    the others waiting on it when they sync the metrics. Counts clips (json members) only when there are fewer
    shards than ranks: a shard holds one clip at least, and the ranks' shares differ by one clip at most."""
    if len(shards) >= world_size or not all(os.path.isfile(shard) for shard in shards):  # remote: cannot count
        return
    clips = sum(count_samples(shard) for shard in shards)
    if clips < world_size:
        raise ValueError(
            f"the validation split {pattern!r} holds {clips} clips, fewer than the {world_size} ranks: every rank "
            "needs one validation clip at least (the others wait on its share of the metrics); write more clips "
            "in the validation split, run on fewer processes, or set data.val_shards: null"
        )


def val_clips_warning(stream: ClipStream, workers: int) -> str | None:
    """The warning for ``data.val_clips`` (``stream.max_clips``) on ``stream.world_size`` ranks of ``workers``
    loader workers where the cap leaves clips of the split out (some reader's share holds more samples than its part,
    :func:`~mardini.data.stream.worker_quota`), or may (shards that are not local files are not counted); None where
    every reader reads its whole share: the whole split, the same clips on any world size."""
    local = all(os.path.isfile(shard) for shard in stream.shards)
    if local:
        counts = {shard: count_samples(shard) for shard in stream.shards}
        readers = [copy.copy(stream) for _ in range(stream.world_size)]
        for rank, reader in enumerate(readers):
            reader.rank = rank
        if all(reader.share_samples(worker, workers, counts) <= worker_quota(stream.max_clips, worker, workers)
               for reader in readers for worker in range(workers)):
            return None
    cap, world = stream.max_clips, stream.world_size
    leaves = "leaves clips of the split out" if local else "may leave clips out (remote shards: not counted)"
    return (f"data.val_clips={cap} is a limit per rank, split over its {workers} loader worker(s): these {world} ranks "
            f"validate at most {cap * world} clips, the first of each (rank, worker)'s share, and this {leaves}; "
            "which clips val/loss and the evaluation callbacks score then depends on the world size and "
            "data.num_workers. Set data.val_clips: null to validate the whole split (the same clips on any world "
            "size), or compare runs at one world size and worker count")


def needs_equal_validation_steps(trainer) -> bool:
    """Whether every rank must run as many validation steps: under FSDP each forward gathers the parameters from all
    ranks, so a rank with one batch more waits for ever (DDP's validation forwards need no other rank)."""
    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def validation_step_limit(trainer) -> int | None:
    """The validation steps a rank runs at most whatever its batches: ``trainer.limit_val_batches`` where it counts
    batches (an int; Lightning stops each rank's validation there), else None (a fraction: every batch)."""
    limit = getattr(trainer, "limit_val_batches", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def validation_batches(stream: ClipStream, workers: int, counts: dict[str, int]) -> list[int]:
    """The validation batches each rank of ``stream.world_size`` streams from a finite split whose shards hold
    ``counts`` samples (all of them good), over ``workers`` loader workers: each (rank, worker) batches its share
    (:meth:`ClipStream.share_samples`), capped by its part of ``stream.max_clips``
    (:func:`~mardini.data.stream.worker_quota`)."""
    per_rank = []
    for rank in range(stream.world_size):
        clips = [_reader(stream, rank).share_samples(worker, workers, counts) for worker in range(workers)]
        if stream.max_clips is not None:
            clips = [min(n, worker_quota(stream.max_clips, worker, workers)) for worker, n in enumerate(clips)]
        per_rank.append(sum(math.ceil(n / stream.batch_size) for n in clips))
    return per_rank


def equalising_val_clips(stream: ClipStream, workers: int, counts: dict[str, int]) -> int | None:
    """The largest ``data.val_clips`` that every (rank, worker) share fills (so every rank streams as many
    clips, and batches, as the others); None where no cap does (a worker's share is empty)."""
    fewest = [min(_reader(stream, rank).share_samples(worker, workers, counts) for rank in range(stream.world_size))
              for worker in range(workers)]
    for cap in range(sum(fewest), 0, -1):
        if all(worker_quota(cap, worker, workers) <= n for worker, n in enumerate(fewest)):
            return cap
    return None


def _reader(stream: ClipStream, rank: int) -> ClipStream:
    reader = copy.copy(stream)
    reader.rank = rank
    return reader


def check_equal_validation_batches(stream: ClipStream, workers: int, pattern: str,
                                   limit: int | None = None) -> int | None:
    """Refuse a validation split that gives the ranks unequal numbers of validation steps where every rank must run
    as many (:func:`needs_equal_validation_steps`): ``data.val_clips: null`` on shards of unequal sizes (each rank
    reads its own shards), or a cap some share does not fill; each rank runs its batches up to ``limit``
    (``trainer.limit_val_batches``: :func:`validation_step_limit`), so batches that differ beyond it are no
    problem. The steps every rank runs, which a rank whose bad samples skipped while validating leave short pads
    with zero-weight batches (``ClipStream.min_batches``); None where nothing is counted: no validation step
    (``limit`` 0), or shards that are not local files (a warning says so). A collective where a process group of
    ``stream.world_size`` runs: call it on every rank (:func:`shard_counts`)."""
    if limit == 0:  # no validation step on any rank
        return None
    counts = shard_counts(stream)
    if counts is None:
        warn_once(f"the validation shards {pattern!r} are not local files and cannot be counted: under FSDP every "
                   "rank must stream as many validation batches; set data.val_clips to at most the clips of the "
                   "smallest (rank, loader worker) share")
        return None
    batches = validation_batches(stream, workers, counts)
    steps = {n if limit is None else min(n, limit) for n in batches}  # the steps each rank runs
    if len(steps) == 1:
        return steps.pop()
    cap = equalising_val_clips(stream, workers, counts)
    cap_now = "null" if stream.max_clips is None else stream.max_clips
    fix = (f"set data.val_clips: {cap} (a cap per rank that every rank's share fills)" if cap is not None else
           "write the validation split in more shards of equal size, or use fewer data.num_workers")
    if min(batches) > 0:  # every rank then stops at the same step
        fix += f", or trainer.limit_val_batches: {min(batches)}"
    raise ValueError(
        f"under FSDP every rank must run as many validation steps (each forward gathers the parameters from all "
        f"ranks: a rank with a batch more waits for ever), but data.val_clips: {cap_now} gives these "
        f"{stream.world_size} ranks {batches} validation batches of {stream.batch_size} from {pattern!r} "
        f"({sum(counts.values())} clips in {len(counts)} shards, {workers} loader worker(s) per rank); {fix}"
    )


def shard_counts(stream: ClipStream) -> dict[str, int] | None:
    """The samples of each of ``stream.shards`` (their tar headers: :func:`count_samples`); None where one is not a
    local file. Where a process group of ``stream.world_size`` runs, each rank reads only its own slice (every
    ``world_size``-th shard from its rank) and one all-gather shares the counts: each shard's headers are read once,
    not once per rank. A process alone (or ranks without a process group) reads them all."""
    mine = stream.shards[stream.rank::stream.world_size]
    parts = all_gather_ranks(_local_counts(mine), stream.world_size)
    if parts is None:
        return _local_counts(stream.shards)
    if any(part is None for part in parts):
        return None
    counts = {shard: n for part in parts for shard, n in part.items()}
    return {shard: counts[shard] for shard in stream.shards}


def _local_counts(shards: list[str]) -> dict[str, int] | None:
    """:func:`count_samples` of each of ``shards``; None where one is not a local file."""
    if not all(os.path.isfile(shard) for shard in shards):
        return None
    return {shard: count_samples(shard) for shard in shards}


def all_gather_ranks(value, world_size: int) -> list | None:
    """``value`` of every rank (``all_gather_object``) where a process group of ``world_size`` > 1 runs, else None."""
    dist = torch.distributed
    if world_size < 2 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world_size:
        return None
    values: list = [None] * world_size
    dist.all_gather_object(values, value)
    return values

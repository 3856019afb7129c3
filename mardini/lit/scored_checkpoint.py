"""One checkpoint for every rank of a ``train.py validate``: the one global rank 0 read.

Under DDP (Lightning's ``ddp``: the other ranks rerun the command once rank 0 starts its validate) each rank resolves
``--ckpt_path last`` itself and reads the file itself (``MarDiniCLI._read_scored``), at its own time; a fit of the same
folder saving in between (a newer ``stepN.ckpt``, ``last.ckpt`` replaced) gave the ranks different files, or the same
path holding another step, and Lightning's DDP restore does not reconcile them (it loads each rank's path through its
CheckpointIO; only FSDP broadcasts rank 0's path, and then reads that path again: README, Training). Here, once the
ranks are connected (the callback's ``setup``, before Lightning's restore), each rank compares what it read with rank
0's (:func:`read_identity`: path, global step, the file's inode and time), and where any differs rank 0's checkpoint
is broadcast and pinned on every rank (a rare path: the whole checkpoint goes through ``broadcast``). A rank other
than 0 that found no checkpoint to read (the fit deleted it after rank 0's read) pins that it found none
(:func:`none_found`) and takes rank 0's likewise; before, it raised while rank 0 waited for it in a collective for
ever.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.callbacks import Callback

from mardini.lit.checkpoint_io import AtomicCheckpointIO, local_path

NOT_RESTORED_BY_VALIDATE = ("optimizer_states", "lr_schedulers")
NONE_FOUND = "none found"  # the identity's first field where a rank found no checkpoint to read
READS = 3  # reads of a checkpoint replaced during each before its identity is given up (then rank 0's is sent)


def file_identity(path) -> tuple[int, int, int] | None:
    """``(inode, size, modification time in ns)`` of the local file ``path``; None where it is gone or remote."""
    local = local_path(path)
    try:
        info = os.stat(local) if local is not None else None
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns) if info is not None else None


def read_identity(io: AtomicCheckpointIO, path, weights_only: bool | None) -> tuple[dict[str, Any], tuple | None]:
    """The checkpoint at ``path`` read through ``io``, and which file it was: ``(path, global step, file_identity)``
    where the file was the same before and after the read (a fit replaces its checkpoints whole, ``os.replace``:
    a new inode), after up to ``READS`` reads; None where it changed during each."""
    for _ in range(READS):
        before = file_identity(path)
        checkpoint = io.load_checkpoint(path, weights_only=weights_only)
        if before is not None and file_identity(path) == before:
            return checkpoint, (str(path), checkpoint.get("global_step"), before)
    return checkpoint, None


def none_found(error: BaseException) -> tuple[str, str]:
    """The identity a rank pins (with no checkpoint) where it found none to read, ``error`` saying why."""
    return NONE_FOUND, f"{type(error).__name__}: {error}"


def agree_on_pinned(strategy, io: AtomicCheckpointIO) -> bool:
    """Have every rank score the checkpoint global rank 0 pinned (a collective: every rank calls it): where any rank's
    pinned read (:meth:`AtomicCheckpointIO.pinned_read`) is not rank 0's, or it found none (:func:`none_found`), rank
    0's checkpoint is broadcast and pinned under each rank's own path (the one its restore asks for). Where rank 0
    found none, every rank raises the same error. Whether it was sent."""
    path, identity = io.pinned_read()
    mine = identity if identity is not None else ("not identified", strategy.global_rank)
    chosen = strategy.broadcast(mine, src=0)
    if chosen[0] == NONE_FOUND:
        raise FileNotFoundError(f"global rank 0 found no checkpoint to score ({chosen[1]}): no rank validates; rerun "
                                "validate, or score a copy of the checkpoint with --ckpt_path COPY")
    if strategy.reduce_boolean_decision(mine == chosen, all=True):
        return False
    checkpoint = strategy.broadcast(scored_part(io.pinned_checkpoint()) if strategy.global_rank == 0 else None, src=0)
    io.pin(path, checkpoint, identity=chosen)
    return True


def scored_part(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` less what a validate never restores (Lightning restores optimiser and LR-scheduler states only
    when fitting): under NCCL a broadcast pickles what it sends into a GPU byte tensor on every rank, and MarDini-L's
    AdamW moments alone are twice its weights."""
    return {k: v for k, v in checkpoint.items() if k not in NOT_RESTORED_BY_VALIDATE}


class ScoredOnEveryRank(Callback):
    """``agree_on_pinned`` at ``setup`` (the ranks connected, the checkpoint not restored yet), where the strategy's
    CheckpointIO holds a pinned read (``MarDiniCLI.validate``)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, AtomicCheckpointIO) and io.pinned_read()[0] is not None:
            agree_on_pinned(trainer.strategy, io)

"""Random draws per batch (training) or per clip (validation), through one call site.

Training draws a batch's crops, masks, times and noise from one ``torch.Generator`` seeded by (seed, rank, step).
Validation gives every clip a generator of its own, seeded by the clip's identity (its key; a batch without keys:
its position), so a clip's draws, and with them ``val/loss``, do not depend on how the clips are batched: the same
clips in batches of 2 or 4, or under another ``data.num_workers``, give the same loss. A ``compute_loss`` draws
through :func:`draw_rows`, which takes either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar, Union

import torch

Draws = Union[torch.Generator, "ClipGenerators"]
T = TypeVar("T", torch.Tensor, tuple)


class ClipGenerators(list):
    """One ``torch.Generator`` per clip of a batch, in the batch's order (validation's draws)."""

    @classmethod
    def for_batch(cls, seed: int, batch: dict, rows: int, first: int) -> ClipGenerators:
        """Generators for the ``rows`` clips of ``batch``: each seeded by (``seed``, its ``key``), or for a batch
        without keys by (``seed``, ``first + i``): its position in the pass, where ``first`` is the batch's index
        times its size (the batches before it full)."""
        keys = batch.get("key")
        ids = [f"key {k}" for k in keys] if keys is not None else [f"index {first + i}" for i in range(rows)]
        if len(ids) != rows:
            raise ValueError(f"the batch has {len(ids)} keys for {rows} clips; collate one key per clip")
        return cls(torch.Generator().manual_seed(clip_seed(seed, name)) for name in ids)


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


__all__ = ["ClipGenerators", "Draws", "clip_seed", "draw_rows", "one_per_clip"]

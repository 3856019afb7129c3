"""Setup-check warnings given once per process: the data checks at ``setup`` repeat on every stage and rank 0 only
says each once."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

WARNED: set[str] = set()  # setup-check warnings already given in this process (each once)


def warn_once(message: str) -> None:
    """``rank_zero_warn`` ``message`` unless this process gave it already."""
    if message not in WARNED:
        WARNED.add(message)
        rank_zero_warn(message)

"""Checks on what a task of ``evaluate.py`` reads and samples: a method's outputs are finite, the clips a resumed
run reads again are the stopped run's, and the model's read at its own size holds the same clips."""

from __future__ import annotations

from typing import Any

import torch


def check_done_clips(batch: dict[str, Any], saved: list[dict[str, Any]], model_batches: Any) -> None:
    """A batch done before a resume: its keys must be the saved run's (the clips go on in the same order); the
    model's read at its own size (``model_batches``) moves on with it."""
    keys = list(batch["key"])
    if keys != [c["key"] for c in saved[:len(keys)]]:
        raise ValueError("the data gives other clips than the stopped run read (it changed since): start over with "
                         "--fresh, or write to another --out")
    if model_batches is not None:
        next(model_batches, None)


def model_clips(batches: Any, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The next batch of the model's read of the clips, ``(B, T, 3, SH, SW)``, checked to hold ``batch``'s clips."""
    other = next(batches, None)
    if other is None or list(other["key"]) != list(batch["key"]):
        raise ValueError("the data gave other clips at --sample-resolution than at --resolution (it changed during "
                         "the run); run again once it is written")
    return other["video"].to(device)


def check_finite(fake: torch.Tensor, method: str, keys: list[str]) -> None:
    """Refuse a method's output ``(B, T, 3, RH, RW)`` holding NaN or inf (clamping would hide inf and keep NaN),
    naming the method and the clips."""
    bad = (~torch.isfinite(fake)).flatten(1).sum(1)  # (B,) non-finite values per clip
    if bad.any():
        clips = [f"{keys[i]} ({int(bad[i])})" for i in bad.nonzero().flatten().tolist()]
        shown = ", ".join(clips[:5]) + (f" and {len(clips) - 5} more" if len(clips) > 5 else "")
        hint = " (check the checkpoint; bf16 sampling can overflow: --dtype fp32)" if method == "mardini" else ""
        raise ValueError(f"method {method!r} generated non-finite values (NaN or inf) in {len(clips)} of "
                         f"{len(keys)} clips of a batch: {shown}; they cannot be scored{hint}")

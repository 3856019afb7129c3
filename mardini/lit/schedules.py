"""Learning-rate rule and schedule shared by every training stage."""

from __future__ import annotations

import math


def scaled_lr(blr: float, global_batch: int) -> float:
    """``blr * global_batch / 256`` (the linear scaling rule of MAE/MAR-style codebases)."""
    return blr * global_batch / 256


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0 over ``warmup_steps``, then cosine to ``min_ratio`` at ``decay_steps``.

    After ``decay_steps`` the multiplier stays at ``min_ratio``. ``decay_steps <= warmup_steps`` gives a constant
    LR after warm-up.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

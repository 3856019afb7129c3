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


def short_warmup(warmup_steps: int, steps: float, by_max_steps: bool) -> str | None:
    """The warning for a fit of ``steps`` optimiser steps (``trainer.max_steps`` where ``by_max_steps``, else what
    ``trainer.max_epochs`` gives) that ends inside its LR warm-up, so its LR never reaches the peak: one line naming
    both values and the fix; None where the warm-up ends in time."""
    if not 0 < steps < warmup_steps:
        return None
    length = f"trainer.max_steps={int(steps)}" if by_max_steps else f"the {int(steps)} steps of trainer.max_epochs"
    return (f"model.warmup_steps={warmup_steps} is longer than this fit ({length}): its LR ends the fit at "
            f"{steps / warmup_steps:.0%} of the peak and never reaches it; lower model.init_args.warmup_steps to at "
            f"most {int(steps)} or raise the fit's steps (a short smoke run may leave it)")

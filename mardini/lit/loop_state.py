"""Lightning's loop counters in a checkpoint saved after its epoch had ended, put where a resume reads them right."""

from __future__ import annotations


def start_next_epoch(checkpoint: dict) -> bool:
    """Zero the batch counters of a training epoch that ``checkpoint`` records as finished; True when it did.

    A fit that stops (``max_steps``) at the last batch of an epoch and then saves (``StepCheckpoint`` at the fit's end,
    ``trainer.save_checkpoint`` after ``fit``) records the next epoch as current but the finished epoch's batch
    counters with it. Where that epoch ended without a validation (``limit_val_batches: 0``, validation every n
    epochs), Lightning resumed it at the batch after them: one batch more than the epoch holds (under gradient
    accumulation a step of one micro-batch), read from the next data epoch, then another epoch, so the resumed run
    trained other clips than one uninterrupted run. An uninterrupted run zeroes those counters when the next epoch
    starts; this does it in the checkpoint, before Lightning restores its loops (a validated epoch resumes as before).
    """
    loops = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs = loops.get("epoch_progress", {}).get("current", {})
    batches = loops.get("epoch_loop.batch_progress", {}).get("current", {})
    if not epochs or not batches or not epochs.get("completed") or epochs["completed"] != epochs.get("ready"):
        return False  # no loops, nothing trained, or an epoch still in progress: Lightning resumes it as it is
    if not any(batches.values()):
        return False
    for key in batches:
        batches[key] = 0
    loops["epoch_loop.batch_progress"]["is_last_batch"] = False
    return True

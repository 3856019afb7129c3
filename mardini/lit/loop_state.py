"""Lightning's loops: the counters in a checkpoint saved after its epoch had ended, put where a resume reads them
right; the workers of a validation pass shut down at its end."""

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


def end_validation_workers(trainer) -> None:
    """Shut down the worker processes of the validation pass that is ending (call at ``on_validation_end``).

    A pass that ``limit_val_batches`` (or the sanity check) cuts short leaves its loaders' iterators unfinished, and
    Lightning keeps them in the evaluation loop's data fetcher (``_data_fetcher``, through its ``CombinedLoader``)
    until the next pass replaces them: each rank's ``num_workers`` validation workers stayed alive through the whole
    training between two validations, holding their memory and open shard files. This runs the teardown Lightning
    runs at the end of a fit (the fetcher's teardown: ``CombinedLoader.reset``), which shuts them down. The next pass starts its iterators
    afresh, as it did: the validation stream restarts at its first clip each pass, so what it computes is unchanged.
    Validation loaders asking for ``persistent_workers`` keep theirs between passes by design: then nothing is done.
    """
    from lightning.pytorch.trainer.states import TrainerFn

    from mardini.data.worker_signals import dataloaders_in

    if any(getattr(dl, "persistent_workers", False) for dl in dataloaders_in(trainer.val_dataloaders)):
        return
    validating = trainer.state.fn == TrainerFn.VALIDATING  # else the fit's validation (or its sanity check)
    loop = trainer.validate_loop if validating else trainer.fit_loop.epoch_loop.val_loop
    if loop._data_fetcher is not None:  # what _EvaluationLoop.teardown does with it at the end of a fit
        loop._data_fetcher.teardown()
        loop._data_fetcher = None  # (a second teardown of it fails: its CombinedLoader has no iterator left)

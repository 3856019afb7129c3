"""The private (underscore) and undocumented APIs of torch, Lightning, torchmetrics, webdataset, PyAV and jsonargparse
that our code relies on, checked on the installed versions. Run this file first after bumping a pin in
requirements.txt (RELIABILITY.md, "Upgrading the libraries"): each failure names our file that depends on the API and
what to do, before a fit fails deep inside (or, worse, goes on with other behaviour)."""

from __future__ import annotations

import lightning as L
import pytest


def trainer(tmp_path, **kwargs) -> L.Trainer:
    """A quiet CPU trainer for BoringModel fits."""
    defaults = dict(default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, logger=False, enable_checkpointing=False)
    return L.Trainer(**{**defaults, **kwargs})


def test_a_lightning_without_batches_that_stepped_is_one_error_at_a_resume(tmp_path):
    """Before, ResumedLogs assigned ``_batches_that_stepped`` whether Lightning had it or not: on a Lightning that
    logs at another counter a resumed fit's scalars silently went back to logging one step further on."""
    from types import SimpleNamespace

    from mardini.lit.resumed_logs import ResumedLogs

    fit = trainer(tmp_path)
    del fit.fit_loop.epoch_loop._batches_that_stepped  # as in a Lightning that no longer has it
    callback = ResumedLogs()
    callback._restored = True  # a fit resumed from a checkpoint
    with pytest.raises(RuntimeError, match="no _batches_that_stepped.*install requirements.txt's lightning"):
        callback.on_train_batch_start(fit, SimpleNamespace(automatic_optimization=True), None, 0)


def test_a_lightning_without_can_stop_early_is_one_error_naming_the_fix(tmp_path, monkeypatch):
    """Before, stops_inside_epoch took a missing ``_can_stop_early`` for True: a fit set to stop below ``min_steps``
    saved a checkpoint at every step it trained on."""
    from lightning.pytorch.loops.fit_loop import _FitLoop

    from mardini.lit.step_checkpoint import stops_inside_epoch

    fit = trainer(tmp_path)
    fit.should_stop = True  # and the epoch's last batch not reached
    monkeypatch.delattr(_FitLoop, "_can_stop_early")
    with pytest.raises(RuntimeError, match="no _can_stop_early; install requirements.txt's lightning"):
        stops_inside_epoch(fit)

"""Lightning's eval-mode, IterableDataset-length and unresumable-loader warnings: silenced for MarDini's own runs only,
never at import nor for the rest of the process; at the end only our own filters are removed."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.lit import MarDiniModule

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
EVAL_MODE = "module(s) in eval mode at the start of training"
ITERABLE_LEN = "Your `IterableDataset` has `__len__` defined"
QUIET = dict(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, limit_val_batches=0)


def _said(fit) -> list[str]:
    """The messages of the warnings ``fit()`` raises that the process's filters let through."""
    with warnings.catch_warnings(record=True) as caught:  # the filters in place apply (no simplefilter here)
        fit()
    return [str(w.message) for w in caught]


def test_importing_mardini_leaves_the_warning_filters_as_they_were():
    code = ("import warnings; before = list(warnings.filters)\n"
            "import mardini.cli, mardini.lit, mardini.data.datamodule\n"
            "print([f[1].pattern for f in warnings.filters if f not in before and f[1] is not None])")
    added = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "eval mode" not in added and "__len__" not in added, added


def test_a_fit_of_ours_shows_neither_warning_and_restores_the_filters(tmp_path):
    tiny_synthetic(tmp_path, train=4, val=2, frames=9, size=32)
    data = VideoDataModule(train_shards=str(tmp_path / "train"), val_shards=None, frames=9, fps=None, resolution=32,
                           batch_size=2, num_workers=0, epoch_size=4)
    model = MarDiniModule(size="tiny", planner_resolution=16, generator={"patch_size": 2}, lr=1e-3)
    before = list(warnings.filters)
    said = _said(lambda: L.Trainer(**QUIET).fit(model, data))
    assert not [m for m in said if EVAL_MODE in m or ITERABLE_LEN in m], said
    assert warnings.filters == before


class _OwnFilter(L.Callback):
    """Adds a warning filter of its own during the fit (as a user's callback or a library may), then maybe raises."""

    def __init__(self, fail: bool) -> None:
        self.fail, self.entry = fail, None

    def on_train_start(self, trainer, pl_module):
        warnings.filterwarnings("ignore", message="a filter of one's own")
        self.entry = warnings.filters[0]
        if self.fail:
            raise RuntimeError("the fit fails")


@pytest.mark.parametrize("fail", [False, True], ids=["fit", "exception"])
def test_a_filter_added_during_our_fit_stays_and_ours_are_gone_after_it(tmp_path, fail):
    """Before, the end of the fit restored the whole filter list found at setup (catch_warnings), which dropped the
    filter a callback added during the fit. Now only ours go, after the fit and after an exception alike."""
    tiny_synthetic(tmp_path, train=4, val=2, frames=9, size=32)
    data = VideoDataModule(train_shards=str(tmp_path / "train"), val_shards=None, frames=9, fps=None, resolution=32,
                           batch_size=2, num_workers=0, epoch_size=4)
    model = MarDiniModule(size="tiny", planner_resolution=16, generator={"patch_size": 2}, lr=1e-3)
    own = _OwnFilter(fail)
    before = list(warnings.filters)
    if fail:
        with pytest.raises(RuntimeError, match="the fit fails"):
            L.Trainer(**QUIET, callbacks=[own]).fit(model, data)
    else:
        L.Trainer(**QUIET, callbacks=[own]).fit(model, data)
    assert own.entry is not None and warnings.filters == [own.entry, *before]


class _Sized(IterableDataset):
    def __iter__(self):
        return iter(torch.randn(4, 2))

    def __len__(self) -> int:
        return 4


class _Own(L.LightningModule):
    """A module of one's own with a frozen part in eval mode."""

    def __init__(self):
        super().__init__()
        self.layer, self.frozen = nn.Linear(2, 1), nn.Linear(2, 1).eval()

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:The '(train|val)_dataloader' does not have many workers")
def test_a_module_and_dataset_of_one_s_own_still_get_both_warnings():
    said = _said(lambda: L.Trainer(**QUIET).fit(_Own(), DataLoader(_Sized(), batch_size=2)))
    assert [m for m in said if EVAL_MODE in m] and [m for m in said if ITERABLE_LEN in m], said


UNRESUMABLE = ("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not "
               "resumable.")


def _shown_after(text: str) -> bool:
    """Whether a warning of ``text``, raised now where Lightning raises it, gets through the filters in place."""
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(text, PossibleUserWarning, "training_epoch_loop.py", 224,
                               module="lightning.pytorch.loops.training_epoch_loop")
    return [str(w.message) for w in caught] == [text]


def test_our_cli_silences_the_unresumable_loader_warning_in_its_fit_only(tmp_path, monkeypatch):
    """A mid-epoch resume through train.py fit: Lightning raises the unresumable-loader warning (the VideoDataModule
    resumes its stream exactly), which the fit does not show; after the fit it shows again. Before, train.py's fit
    ignored it with a process-wide filter that stayed for the rest of the process (a notebook, a second fit with
    loaders of one's own)."""
    from mardini.cli import main

    tiny_synthetic(tmp_path / "data" / "shards" / "synthetic", train=8, val=2, frames=18, size=32)
    monkeypatch.chdir(tmp_path)
    fast = ["--config", str(TINY / "common.yaml"), "--config", str(TINY / "01_dm_warmup_4f.yaml"),
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.precision=32-true",
            "--data.init_args.num_workers=0", "--data.init_args.batch_size=2", "--data.init_args.epoch_size=8",
            "--model.init_args.decay_steps=4"]  # 4 steps an epoch
    main(["fit", *fast, "--trainer.max_steps=1"])
    assert _shown_after(UNRESUMABLE)  # a fit through our CLI leaves no filter of it behind
    raised: list[str] = []
    warn = warnings.warn

    def spy(message, category=None, stacklevel=1, **kwargs):  # every warning raised, filtered or not
        raised.append(str(message))
        warn(message, category, stacklevel + 1, **kwargs)  # attributed to the same caller as without the spy

    monkeypatch.setattr(warnings, "warn", spy)
    said = _said(lambda: main(["fit", *fast, "--trainer.max_steps=2"]))  # resumes at step 1 of 4
    assert [m for m in raised if m.startswith(UNRESUMABLE)], raised  # Lightning raised it
    assert not [m for m in said if m.startswith(UNRESUMABLE)], said  # and the fit did not show it
    assert _shown_after(UNRESUMABLE)  # nor does the resumed one

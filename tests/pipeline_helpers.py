"""A tiny trained checkpoint of each kind, made in seconds, for the sampling tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mardini.lit import GenerationModule, MarDiniModule, PlanningModule

MODULES = {"joint": MarDiniModule, "generation": GenerationModule, "planning": PlanningModule}


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """One intra-op thread for the module (restored after): on a shared 2-core machine two threads spin-wait
    on each other and make these small networks many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _clips(n: int, frames: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"video": torch.rand(frames, 3, size, size, generator=g) * 2 - 1} for _ in range(n)]


def make_checkpoint(path: Path, kind: str = "joint", frames: int = 5, size: int = 16) -> Path:
    """Fit ``kind`` (size tiny) for one step on random clips, perturb its weights, save a Lightning checkpoint.

    The perturbation (raw and EMA differently) makes the zero-initialised adaLN layers matter, so that a broken
    cache, guidance or weight choice changes the samples.
    """
    torch.manual_seed(0)
    module = MODULES[kind](size="tiny", frames=frames, planner_resolution=16, lr=1e-3)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(_clips(2, frames, size), batch_size=2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net, amp in ((module.networks, 0.05), (module.ema.module, 0.06)):
            for p in net.parameters():
                p.add_(amp * torch.randn(p.shape, generator=g))
    trainer.save_checkpoint(path)
    return path

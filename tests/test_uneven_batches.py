"""Uneven per-rank batches (a global batch the world size does not divide): the loss weighting gives the gradient
of the mean over the global batch, and the LR rule and throughput read the global batch on every rank."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mardini.data.batch_split import rank_batch
from mardini.data.datamodule import VideoDataModule
from mardini.lit import PlanningModule
from mardini.lit.batch_weight import loss_scale


def _rank_mean_gradient(weight: torch.Tensor, x: torch.Tensor, world: int, scaled: bool) -> torch.Tensor:
    """What DDP steps with: the mean over ranks of each rank's gradient of its (scaled) per-clip-mean loss."""
    grads, start = [], 0
    for rank in range(world):
        n = rank_batch(x.shape[0], rank, world)
        w = weight.clone().requires_grad_(True)
        loss = ((x[start:start + n] @ w) ** 2).mean()  # (n, D) @ (D,) -> (n,) -> scalar
        scale = loss_scale(n, world, x.shape[0]) if scaled else None
        (loss if scale is None else loss * scale).backward()
        grads.append(w.grad)
        start += n
    return torch.stack(grads).mean(0)  # (D,)


@pytest.mark.parametrize(("batch", "world"), [(3, 2), (7, 3), (10, 4), (720, 256)])
def test_the_loss_scale_makes_the_rank_average_the_global_batch_s_gradient(batch, world):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 5, generator=gen, dtype=torch.float64)  # (B, D)
    weight = torch.randn(5, generator=gen, dtype=torch.float64)  # (D,)
    w = weight.clone().requires_grad_(True)
    ((x @ w) ** 2).mean().backward()  # one process on the whole batch
    assert torch.allclose(_rank_mean_gradient(weight, x, world, scaled=True), w.grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(_rank_mean_gradient(weight, x, world, scaled=False), w.grad, rtol=1e-6)


def test_an_even_split_leaves_the_loss_untouched():
    assert loss_scale(2, 4, 8) is None and loss_scale(8, 1, 8) is None  # no multiplication: bit-identical
    assert loss_scale(3, 256, 720) == pytest.approx(3 * 256 / 720)
    assert loss_scale(2, 256, 720) == pytest.approx(2 * 256 / 720)


def test_lr_rule_loss_scale_and_throughput_read_the_global_batch_on_every_rank():
    """720 clips on 256 ranks: the LR rule's batch is 720 on the ranks of 3 clips and on those of 2 (ranks with
    different learning rates would drift apart), each weighs its loss by its own share, clips_per_s counts 720."""
    module = PlanningModule(size="tiny", planner_resolution=16, lr=1e-3)
    for rank, local in [(0, 3), (207, 3), (208, 2), (255, 2)]:
        dm = VideoDataModule(batch_size=720, val_shards=None, num_workers=0)
        dm.configure_ranks(rank, 256)
        module._trainer = SimpleNamespace(datamodule=dm, world_size=256, accumulate_grad_batches=2)
        assert dm.per_rank_batch_size == local
        assert module.global_batch_size() == 720 * 2
        assert module._loss_scale() == pytest.approx(local * 256 / 720)
        assert module._step_clips(local) == 720
    module._trainer = None

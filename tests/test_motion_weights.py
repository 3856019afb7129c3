"""Motion-weighted loss (``model.init_args.loss_weighting: motion``): the weights, and where they apply."""

from __future__ import annotations

import pytest
import torch

from mardini.diffusion.loss import masked_mse_per_sample, motion_weights
from mardini.lit import GenerationModule, MarDiniModule


def test_motion_weights_by_hand():
    # one clip, 3 frames, 1 channel, 1 x 2 positions; frame 0 given, frames 1-2 generated
    z = torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 0.0]]).reshape(1, 3, 1, 1, 2)
    mask = torch.tensor([[False, True, True]])
    w = motion_weights(z, mask, strength=1.0)  # raw 1 + |change|: frame 1 (1, 3), frame 2 (2, 1); mean 7 / 4
    expect = torch.tensor([[1.0, 1.0], [1.0, 3.0], [2.0, 1.0]]) / torch.tensor([[1.0], [1.75], [1.75]])
    assert w.shape == (1, 3, 1, 1, 2)
    assert torch.allclose(w.reshape(3, 2), expect)
    assert torch.allclose(w[0, 1:].mean(), torch.tensor(1.0))  # generated positions average 1


def test_motion_weights_are_one_without_motion_strength_or_reference():
    g = torch.Generator().manual_seed(0)
    moving = torch.randn(2, 4, 3, 2, 2, generator=g)  # (B, T, C, h, w)
    static = moving[:, :1].expand(-1, 4, -1, -1, -1)  # every frame the same
    mask = torch.tensor([[True, False, True, True], [True, True, True, True]])  # clip 1 has no given frame
    assert torch.equal(motion_weights(static, mask, 4.0), torch.ones(2, 4, 1, 2, 2))
    assert torch.equal(motion_weights(moving, mask, 0.0), torch.ones(2, 4, 1, 2, 2))
    w = motion_weights(moving, mask, 4.0)
    assert torch.equal(w[1], torch.ones(4, 1, 2, 2))  # nothing to compare with
    assert torch.equal(w[0, 1], torch.ones(1, 2, 2))  # the reference frame
    assert not torch.allclose(w[0, [0, 2, 3]], torch.ones(3, 1, 2, 2))
    with pytest.raises(ValueError, match="motion_strength=-1.0 is impossible"):
        motion_weights(moving, mask, -1.0)


def test_weighted_masked_mse_weighs_each_element():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 3, 2, 2, 2, generator=g), torch.randn(2, 3, 2, 2, 2, generator=g)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    weight = torch.rand(2, 3, 1, 2, 2, generator=g)
    err = (pred - target).square() * weight * mask[:, :, None, None, None]  # (B, T, C, h, w)
    expect = err.flatten(1).sum(1) / (mask.sum(1) * 8)  # (B,)
    assert torch.allclose(masked_mse_per_sample(pred, target, mask, weight), expect)
    assert torch.equal(masked_mse_per_sample(pred, target, mask, torch.ones(2, 3, 1, 2, 2)),
                       masked_mse_per_sample(pred, target, mask))


@pytest.mark.parametrize("cls", [GenerationModule, MarDiniModule])
def test_each_stage_weights_its_training_loss_by_motion_and_not_its_validation_loss(cls):
    def make(weighting: str, strength: float = 4.0):
        torch.manual_seed(0)
        extra = {"planner_resolution": 16, "plan_dropout": 0.0} if cls is MarDiniModule else {}
        return cls(size="tiny", frames=5, loss_weighting=weighting, motion_strength=strength, **extra)

    plain, weighted, zero = make("none"), make("motion"), make("motion", 0.0)
    weighted.load_state_dict(plain.state_dict())
    zero.load_state_dict(plain.state_dict())
    batch = {"video": torch.rand(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1}
    with torch.no_grad():
        loss = {(m, train): m.compute_loss(dict(batch), torch.Generator().manual_seed(7), train)
                for m in (plain, weighted, zero) for train in (True, False)}  # (B,) each
    assert not torch.allclose(loss[weighted, True], loss[plain, True])
    assert torch.allclose(loss[zero, True], loss[plain, True], rtol=1e-6)
    assert torch.equal(loss[weighted, False], loss[plain, False])

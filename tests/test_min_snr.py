"""Min-SNR-gamma loss weighting (``model.init_args.loss_weighting: min_snr``): the weights, and where they apply."""

from __future__ import annotations

import math

import pytest
import torch

from mardini.diffusion.loss import min_snr_weight
from mardini.diffusion.schedule import CosineSchedule
from mardini.lit import GenerationModule, MarDiniModule


def test_snr_is_cot_squared_of_the_shifted_time():
    t = torch.tensor([0.1, 0.25, 0.5, 0.9, 1.0])
    for shift in (1.0, 2.0):
        sched = CosineSchedule(shift=shift)
        tp = shift * t.double() / (1 + (shift - 1) * t.double())
        expect = 1 / torch.tan(0.5 * math.pi * tp).square()  # cot^2
        got = sched.snr(t)
        assert got.dtype == torch.float64 and got.shape == (5,)
        assert torch.allclose(got[:-1], expect[:-1], rtol=1e-9)
        assert got[-1] == 0  # pure noise


def test_min_snr_weight_by_hand():
    snr = torch.tensor([0.0, 1.0, 5.0, 20.0, float("inf")], dtype=torch.float64)
    w = min_snr_weight(snr, gamma=5.0)
    assert torch.allclose(w, torch.tensor([0.0, 0.5, 5 / 6, 5 / 21, 0.0], dtype=torch.float64))
    assert (w <= 5 / 6 + 1e-12).all()  # largest at SNR = gamma
    with pytest.raises(ValueError, match="min_snr_gamma=0.0 is impossible"):
        min_snr_weight(snr, gamma=0.0)


@pytest.mark.parametrize("cls", [GenerationModule, MarDiniModule])
def test_each_stage_weights_its_training_loss_and_not_its_validation_loss(cls):
    def make(weighting: str):
        torch.manual_seed(0)
        extra = {"planner_resolution": 16, "plan_dropout": 0.0} if cls is MarDiniModule else {}
        return cls(size="tiny", frames=5, loss_weighting=weighting, **extra)

    plain, weighted = make("none"), make("min_snr")
    weighted.load_state_dict(plain.state_dict())
    batch = {"video": torch.rand(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1}
    with torch.no_grad():
        loss = {(m, train): m.compute_loss(dict(batch), torch.Generator().manual_seed(7), train)
                for m in (plain, weighted) for train in (True, False)}  # (B,) each
    g = torch.Generator().manual_seed(7)
    weighted.mask_sampler.sample(2, 5, g)  # the draws compute_loss made before the times
    t = weighted.schedule.sample_t(2, generator=g)  # (B,)
    w = min_snr_weight(weighted.schedule.snr(t), 5.0).float()  # (B,)
    assert (w < 1).all()
    assert torch.allclose(loss[weighted, True], loss[plain, True] * w, rtol=1e-5)
    assert torch.equal(loss[weighted, False], loss[plain, False])

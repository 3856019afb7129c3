"""Min-SNR-gamma loss weighting (``model.init_args.loss_weighting: min_snr``): the weights, and where they apply."""

from __future__ import annotations

import math

import pytest
import torch

from mardini.diffusion.loss import min_snr_weight
from mardini.diffusion.schedule import CosineSchedule
from mardini.lit import GenerationModule


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


def _module(weighting: str) -> GenerationModule:
    torch.manual_seed(0)
    return GenerationModule(size="tiny", frames=4, loss_weighting=weighting, min_snr_gamma=5.0)


def test_training_loss_is_weighted_per_clip_and_validation_is_not():
    plain, weighted = _module("none"), _module("min_snr")
    weighted.load_state_dict(plain.state_dict())
    c = plain.autoencoder.latent_channels
    z = torch.randn(3, 4, c, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, T, C, h, w)
    mask = torch.tensor([[False, True, True, False], [True, True, True, False], [False, True, False, True]])
    with torch.no_grad():
        base = plain.diffusion_loss(z, None, mask, torch.Generator().manual_seed(7))  # (B,)
        train = weighted.diffusion_loss(z, None, mask, torch.Generator().manual_seed(7), weighted=True)
        val = weighted.diffusion_loss(z, None, mask, torch.Generator().manual_seed(7), weighted=False)
    t = weighted.schedule.sample_t(3, generator=torch.Generator().manual_seed(7))  # the same first draw
    w = min_snr_weight(weighted.schedule.snr(t), 5.0).float()  # (B,)
    assert (w < 1).all() and (w > 0).all()
    assert torch.allclose(train, base * w, rtol=1e-5)
    assert torch.equal(val, base)

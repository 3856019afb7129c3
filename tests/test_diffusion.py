"""Schedule and masked loss: endpoints, variance preservation, masking of references, hand computations."""

import math

import pytest
import torch

from mardini.diffusion import CosineSchedule, masked_mse, masked_mse_per_sample

B, T, C, H, W = 3, 4, 2, 3, 5


def _latents(seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, C, H, W, generator=g).to(dtype)


MASK = torch.tensor([[False, True, True, False], [True, True, True, False], [False, True, False, True]])


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_endpoints_are_exact(shift):
    alpha, sigma = CosineSchedule(shift=shift).alpha_sigma(torch.tensor([0.0, 1.0]))
    assert alpha.shape == (2, 1, 1, 1, 1)
    assert alpha.flatten().tolist() == [1.0, 0.0]
    assert sigma.flatten().tolist() == [0.0, 1.0]


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_variance_preserving_and_monotone(shift):
    t = torch.linspace(0, 1, 101)
    alpha, sigma = CosineSchedule(shift=shift).alpha_sigma(t)
    torch.testing.assert_close(alpha.square() + sigma.square(), torch.ones_like(alpha), atol=1e-6, rtol=0)
    assert (alpha.flatten().diff() < 0).all() and (sigma.flatten().diff() > 0).all()


def test_cosine_values_and_shift_formula():
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    alpha, sigma = CosineSchedule().alpha_sigma(t)
    torch.testing.assert_close(alpha.flatten(), torch.cos(math.pi / 2 * t))
    torch.testing.assert_close(sigma.flatten(), torch.sin(math.pi / 2 * t))
    s = 3.0
    shifted = s * t / (1 + (s - 1) * t)
    a_shift, _ = CosineSchedule(shift=s).alpha_sigma(t)
    torch.testing.assert_close(a_shift.flatten(), torch.cos(math.pi / 2 * shifted))
    assert (a_shift < alpha).all()  # shift > 1 means more noise at the same t


def test_sample_t_on_grid_uniform_and_seeded():
    sched = CosineSchedule(num_train_steps=4)
    t = sched.sample_t(4000, generator=torch.Generator().manual_seed(1))
    assert t.shape == (4000,) and t.dtype == torch.float32
    values, counts = torch.unique(t, return_counts=True)
    assert values.tolist() == [0.25, 0.5, 0.75, 1.0]  # never 0: the grid is {1/N, ..., 1}
    assert (counts - 1000).abs().max() < 150  # roughly uniform
    again = sched.sample_t(4000, generator=torch.Generator().manual_seed(1), device="cpu")
    assert torch.equal(t, again)
    other = sched.sample_t(4000, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(t, other)


def test_q_sample_noises_only_masked_frames():
    sched = CosineSchedule()
    z0, noise = _latents(0), _latents(1)
    t = torch.tensor([0.3, 0.7, 1.0])
    z_t = sched.q_sample(z0, noise, t, MASK)
    assert torch.equal(z_t[~MASK], z0[~MASK])  # bit-identical references
    alpha, sigma = sched.alpha_sigma(t)
    expected = alpha * z0 + sigma * noise
    torch.testing.assert_close(z_t[MASK], expected[MASK])
    assert not torch.allclose(z_t[MASK], z0[MASK])
    torch.testing.assert_close(z_t[2, 1], noise[2, 1], atol=1e-7, rtol=0)  # t = 1: pure noise


def test_q_sample_keeps_dtype_and_bf16_references():
    sched = CosineSchedule()
    z0, noise = _latents(0, torch.bfloat16), _latents(1, torch.bfloat16)
    z_t = sched.q_sample(z0, noise, torch.full((B,), 0.5), MASK)
    assert z_t.dtype == torch.bfloat16
    assert torch.equal(z_t[~MASK], z0[~MASK])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_v_target_round_trip(shift):
    sched = CosineSchedule(shift=shift)
    z0, noise = _latents(0), _latents(1)
    t = torch.tensor([0.001, 0.5, 1.0])
    z_t = sched.q_sample(z0, noise, t)
    v = sched.v_target(z0, noise, t)
    x0_hat, eps_hat = sched.predict_x0_eps(z_t, v, t)
    torch.testing.assert_close(x0_hat, z0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, noise, atol=1e-5, rtol=1e-5)


def test_schedule_errors():
    sched = CosineSchedule()
    z0 = _latents()
    with pytest.raises(ValueError, match="mask"):
        sched.q_sample(z0, z0, torch.zeros(B), MASK[:, :3])
    with pytest.raises(ValueError, match="bool"):
        sched.q_sample(z0, z0, torch.zeros(B), MASK.float())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sched.q_sample(z0, z0, torch.full((B,), 1.5), MASK)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        sched.v_target(z0, z0, torch.zeros(B + 1))
    with pytest.raises(ValueError, match="shift"):
        CosineSchedule(shift=0.0)


# --------------------------------------------------------------------------------------------------
# Masked loss
# --------------------------------------------------------------------------------------------------


def test_masked_mse_ignores_reference_frames():
    pred, target = _latents(0), _latents(1)
    loss = masked_mse(pred, target, MASK)
    per = masked_mse_per_sample(pred, target, MASK)
    changed = pred.clone()
    changed[~MASK] = torch.randn_like(changed[~MASK]) * 100
    changed[0, 0, 0, 0, 0] = float("nan")  # reference frame of clip 0
    assert torch.equal(masked_mse(changed, target, MASK), loss)
    assert torch.equal(masked_mse_per_sample(changed, target, MASK), per)
    changed[0, 1] += 1.0  # a masked frame: the loss must move
    assert masked_mse(changed, target, MASK) != loss


def test_a_non_finite_reference_frame_reaches_no_gradient():
    pred, target = _latents(0).requires_grad_(True), _latents(1).clone()
    target[0, 0] = float("inf")  # reference frame of clip 0
    masked_mse(pred, target, MASK).backward()
    assert torch.isfinite(pred.grad).all() and torch.all(pred.grad[~MASK] == 0)


def test_masked_mse_hand_computation():
    pred, target = _latents(0), _latents(1)
    total, n_elem, per = 0.0, 0, []
    for b in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if MASK[b, t]:
                s += float(((pred[b, t] - target[b, t]) ** 2).sum())
                n += C * H * W
        per.append(s / n)
        total, n_elem = total + s, n_elem + n
    assert masked_mse(pred, target, MASK).item() == pytest.approx(total / n_elem, rel=1e-5)
    assert masked_mse_per_sample(pred, target, MASK).tolist() == pytest.approx(per, rel=1e-5)


def test_masked_mse_gradient_and_empty_rows():
    pred = _latents(0).requires_grad_(True)
    target = _latents(1)
    masked_mse(pred, target, MASK).backward()
    assert (pred.grad[~MASK] == 0).all() and (pred.grad[MASK] != 0).any()
    none = torch.zeros(B, T, dtype=torch.bool)
    assert masked_mse(pred, target, none).item() == 0.0
    assert masked_mse_per_sample(pred, target, none).tolist() == [0.0] * B
    even = torch.tensor([[True, False, True, False]] * B)  # equal counts: the two normalisations agree
    torch.testing.assert_close(masked_mse(pred, target, even), masked_mse_per_sample(pred, target, even).mean())


def test_masked_mse_shape_errors():
    pred = _latents()
    with pytest.raises(ValueError, match="target shape"):
        masked_mse(pred, pred[:, :2], MASK)
    with pytest.raises(ValueError, match="mask shape"):
        masked_mse(pred, pred, MASK.T)

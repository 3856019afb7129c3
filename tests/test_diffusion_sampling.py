"""DDIM sampler and guidance, with stub networks (no dependency on mardini.models)."""

import pytest
import torch
from torch import nn

from mardini.diffusion import (
    CosineSchedule,
    DDIMSampler,
    ddim_sample,
    guided_denoise_fn,
    guided_velocity,
)

B, T, C, H, W, N, D = 2, 4, 3, 2, 3, 5, 6
MASK = torch.tensor([[False, True, True, False], [False, True, True, True]])


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Stub networks
# --------------------------------------------------------------------------------------------------


class OracleModel(nn.Module):
    """Knows the clean latents x0: returns the exact v for any z_t, so DDIM must land on x0."""

    def __init__(self, x0: torch.Tensor, schedule: CosineSchedule) -> None:
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, z_t, t, plan, mask):
        alpha, sigma = self.schedule.alpha_sigma(t)  # (B, 1, 1, 1, 1)
        eps = (z_t - alpha * self.x0) / sigma  # (B, T, C, h, w)
        return alpha * eps - sigma * self.x0  # (B, T, C, h, w)


class StubGenerator(nn.Module):
    """Per-sample network whose output depends on z_t, t, the plan and the mask; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.null = nn.Parameter(_randn(D, seed=7))
        self.proj = nn.Parameter(_randn(D, C, seed=8) * 0.3)
        self.calls: list[int] = []

    def null_plan(self, b, t, n):
        return self.null.expand(b, t, n, D)  # (B, T, N, D)

    def forward(self, z_t, t, plan, mask):
        self.calls.append(z_t.shape[0])
        if plan is None:
            plan = self.null_plan(z_t.shape[0], z_t.shape[1], N)  # (B, T, N, D)
        cond = plan.mean(dim=2) @ self.proj  # (B, T, C)
        gate = 1.0 + mask.float()[:, :, None, None, None]  # (B, T, 1, 1, 1)
        return 0.5 * z_t * (1 + t[:, None, None, None, None]) * gate + torch.tanh(cond)[..., None, None]


class NoNullModel(nn.Module):
    def forward(self, z_t, t, plan, mask):
        return z_t


# --------------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_oracle_recovers_x0(steps, shift):
    schedule = CosineSchedule(shift=shift)
    x0 = _randn(B, T, C, H, W, seed=1)
    z_ref = torch.where(MASK[:, :, None, None, None], _randn(B, T, C, H, W, seed=2), x0)  # masked content ignored
    out = ddim_sample(OracleModel(x0, schedule), z_ref, MASK, None, steps=steps, schedule=schedule)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_trajectory_follows_the_forward_process():
    """With exact v, deterministic DDIM keeps the start noise: z at t_i = alpha_i x0 + sigma_i eps_start."""
    schedule = CosineSchedule()
    sampler = DDIMSampler(schedule, steps=5)
    x0 = _randn(B, T, C, H, W, seed=1)
    oracle = OracleModel(x0, schedule)
    eps = sampler.init_latents(x0, MASK, torch.Generator().manual_seed(3))
    states = []
    denoise_fn = guided_denoise_fn(oracle, None, MASK)
    record = lambda i, t, z: states.append((t, z))  # noqa: E731
    sampler.sample(denoise_fn, x0, MASK, torch.Generator().manual_seed(3), callback=record)
    assert [t for t, _ in states] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    for t, z in states:
        alpha, sigma = schedule.alpha_sigma(torch.full((B,), t))
        expected = alpha * x0 + sigma * eps
        torch.testing.assert_close(z[MASK], expected[MASK], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_stochastic_ddim_keeps_the_marginal_and_lands_on_x0(eta):
    """With exact v and eta > 0, z_t stays distributed as N(alpha_t x0, sigma_t^2) and still ends at x0."""
    schedule = CosineSchedule()
    x0 = _randn(1, 2, 4, 32, 32, seed=1)
    mask = torch.tensor([[False, True]])
    states = {}
    denoise_fn = guided_denoise_fn(OracleModel(x0, schedule), None, mask)
    sampler = DDIMSampler(schedule, steps=4, eta=eta)
    record = lambda i, t, z: states.update({t: z})  # noqa: E731
    out = sampler.sample(denoise_fn, x0, mask, torch.Generator().manual_seed(0), callback=record)
    for t in (0.75, 0.5, 0.25):
        alpha, sigma = schedule.alpha_sigma(torch.tensor([t]))
        resid = (states[t] - alpha * x0)[:, 1] / sigma  # should be N(0, 1) over 4096 elements
        assert abs(resid.std().item() - 1) < 0.05 and abs(resid.mean().item()) < 0.05
    deterministic = DDIMSampler(schedule, steps=4).sample(
        denoise_fn, x0, mask, torch.Generator().manual_seed(0), callback=lambda i, t, z: states.update({-t: z})
    )
    assert not torch.allclose(states[0.5], states[-0.5])  # eta > 0 really adds noise
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(deterministic, x0, atol=1e-5, rtol=1e-5)


def test_the_fresh_noise_of_a_stochastic_step_has_the_ddpm_posterior_std_times_eta():
    """With x0 = eps = 0 (z_t = v = 0) a step returns ``c * noise``: at eta = 1, c is the DDPM posterior std
    ``sigma_s / sigma_t sqrt(1 - alpha_t^2 / alpha_s^2)`` (Song et al. 2021, Eq. 16), and c is linear in eta.
    The oracle tests cannot see c: any c <= sigma_s keeps the marginal and lands on x0."""
    import math

    from mardini.diffusion import ddim_update

    t, s = [0.9, 0.6, 0.3, 0.5], [0.7, 0.2, 0.1, 0.45]
    zeros = torch.zeros(4, 2, 3, 2, 2, dtype=torch.float64)  # (B, T, C, h, w)
    ones = torch.ones_like(zeros)
    alpha = lambda u: math.cos(0.5 * math.pi * u)  # noqa: E731 (the plain cosine schedule)
    sigma = lambda u: math.sin(0.5 * math.pi * u)  # noqa: E731
    posterior = torch.tensor([sigma(b) / sigma(a) * math.sqrt(1 - alpha(a) ** 2 / alpha(b) ** 2) for a, b in zip(t, s)],
                             dtype=torch.float64)  # (B,)
    for eta in (1.0, 0.5, 0.25):
        out = ddim_update(CosineSchedule(), zeros, zeros, torch.tensor(t, dtype=torch.float64),
                          torch.tensor(s, dtype=torch.float64), eta=eta, noise=ones)  # (B, T, C, h, w)
        torch.testing.assert_close(out, (eta * posterior).view(4, 1, 1, 1, 1).expand_as(out))


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_bit_identical_and_seen_clean(eta, dtype):
    z_ref = _randn(B, T, C, H, W, seed=4).to(dtype)
    seen = []

    def denoise_fn(z_t, t):
        seen.append(z_t.clone())
        return _randn(*z_t.shape, seed=len(seen)) * 50  # garbage everywhere, references included

    out = DDIMSampler(steps=4, eta=eta).sample(denoise_fn, z_ref, MASK, torch.Generator().manual_seed(0))
    assert out.dtype == dtype
    assert torch.equal(out[~MASK], z_ref[~MASK])
    assert not torch.allclose(out[MASK].float(), z_ref[MASK].float())
    for z_t in seen:
        assert torch.equal(z_t[~MASK], z_ref[~MASK].float())


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_seeded_and_reproducible(eta):
    model = StubGenerator()
    z_ref = _randn(B, T, C, H, W, seed=4)
    plan = _randn(B, T, N, D, seed=5)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return ddim_sample(model, z_ref, MASK, plan, steps=3, generator=g, eta=eta, guidance_scale=2.5)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


ETA_RULE = r"DDIM's eta is in \[0, 1\]: 0 deterministic, 1 ancestral"


@pytest.mark.parametrize("eta", [-0.5, float("inf"), float("nan")])
def test_an_eta_that_is_not_a_finite_number_at_least_0_is_refused(eta):
    """inf passed the check and gave all-NaN latents."""
    with pytest.raises(ValueError, match=rf"^eta={eta!r} is impossible: {ETA_RULE}$"):
        DDIMSampler(steps=2, eta=eta)


def test_an_eta_above_1_is_refused_wherever_eta_enters():
    """Above 1 the step's noise scale c exceeds sigma_s (ddim_update): more noise than the schedule allows, the
    estimate's share clamped to 0. eta 5 was accepted by the sampler, the pipeline's and the evaluation's checks
    (they asked for >= 0 only). Each one refuses it now; 1 (ancestral) stays allowed."""
    from mardini.evaluation import InterpolationEval
    from mardini.evaluation.protocol import EvalProtocol
    from mardini.evaluation.samplers import PipelineSampler

    for eta in (1.5, 5.0):
        with pytest.raises(ValueError, match=rf"^eta={eta} is impossible: {ETA_RULE}$"):
            DDIMSampler(steps=2, eta=eta)
        with pytest.raises(ValueError, match=rf"^eta={eta} is impossible: {ETA_RULE}$"):
            ddim_sample(StubGenerator(), torch.zeros(B, T, C, H, W), MASK, None, steps=2, eta=eta)
        with pytest.raises(ValueError, match=rf"^eta={eta} is impossible: {ETA_RULE}$"):
            PipelineSampler(object(), steps=5, eta=eta)  # evaluate.py's model
        allowed = r"it must be in \[0, 1\] \(DDIM's eta: 0 deterministic, 1 ancestral\)"
        with pytest.raises(ValueError, match=rf"^evaluation eta={eta} is impossible: {allowed}$"):
            EvalProtocol(eta=eta)  # evaluate.py's settings
        with pytest.raises(ValueError, match=rf"^evaluation eta={eta} is impossible: {allowed}$"):
            InterpolationEval(eta=eta)  # the evaluation callback's settings
    DDIMSampler(steps=2, eta=1.0)
    EvalProtocol(eta=1.0)


def test_ddim_one_call_per_step_with_guidance_and_callback():
    model = StubGenerator()
    z_ref = _randn(B, T, C, H, W, seed=4)
    calls = []
    ddim_sample(
        model, z_ref, MASK, _randn(B, T, N, D, seed=5), steps=7, guidance_scale=2.5, progress=True,
        callback=lambda i, t, z: calls.append(i),
    )
    assert model.calls == [2 * B] * 7
    assert calls == list(range(7))


def test_sampler_errors():
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(steps=0)
    z_ref = _randn(B, T, C, H, W)
    with pytest.raises(ValueError, match="mask"):
        DDIMSampler(steps=2).sample(lambda z, t: z, z_ref, MASK[:, :2])
    with pytest.raises(ValueError, match="denoise_fn returned"):
        DDIMSampler(steps=2).sample(lambda z, t: z[:, :2], z_ref, MASK)


# --------------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------------


def _inputs():
    return _randn(B, T, C, H, W, seed=1), torch.tensor([0.3, 0.9]), _randn(B, T, N, D, seed=2)


def test_guidance_scale_one_is_the_conditional_branch():
    model = StubGenerator()
    z_t, t, plan = _inputs()
    v = guided_velocity(model, z_t, t, plan, MASK, scale=1.0)
    assert model.calls == [B]
    assert torch.equal(v, model(z_t, t, plan, MASK))


@pytest.mark.parametrize("scale", [2.5, 0.5, -1.0])
def test_guidance_is_one_batched_forward_matching_two_forwards(scale):
    model = StubGenerator()
    z_t, t, plan = _inputs()
    v = guided_velocity(model, z_t, t, plan, MASK, scale=scale)
    assert model.calls == [2 * B]
    v_cond = model(z_t, t, plan, MASK)
    v_null = model(z_t, t, None, MASK)
    assert not torch.allclose(v_cond, v_null)  # the plan matters, so the test can see guidance
    torch.testing.assert_close(v, v_null + scale * (v_cond - v_null))


def test_guidance_without_plan_or_null_plan():
    model = StubGenerator()
    z_t, t, plan = _inputs()
    v = guided_velocity(model, z_t, t, None, MASK, scale=2.5)  # no plan: nothing to guide
    assert model.calls == [B]
    torch.testing.assert_close(v, model(z_t, t, None, MASK))
    fn = guided_denoise_fn(model, plan, MASK, 0.0)  # scale 0: the null branch alone
    torch.testing.assert_close(fn(z_t, t), model(z_t, t, None, MASK))
    with pytest.raises(TypeError, match="null_plan"):
        guided_velocity(NoNullModel(), z_t, t, plan, MASK, scale=2.5)
    with pytest.raises(ValueError, match="plan must be"):
        guided_velocity(model, z_t, t, plan[:, :2], MASK, scale=2.5)


@pytest.mark.parametrize("eta", [float("inf"), -1.0])
def test_the_evaluation_sampler_refuses_an_eta_the_pipeline_refuses(eta):
    """evaluate.py's PipelineSampler checks eta when built, with the pipeline's rule (inf passed it before)."""
    from mardini.evaluation.samplers import PipelineSampler

    with pytest.raises(ValueError, match=rf"^eta={eta!r} is impossible: {ETA_RULE}$"):
        PipelineSampler(object(), steps=5, eta=eta)


def test_eta_takes_a_0_d_tensor_and_refuses_a_bool():
    """A 0-d tensor (e.g. from a sweep) passed the old check and still does; True (an int to Python) is refused."""
    import numpy as np

    from mardini.diffusion.checks import check_eta

    check_eta(torch.tensor(0.5))
    check_eta(np.float32(1.0))
    for bad in (True, torch.tensor(True), torch.tensor([0.5])):
        with pytest.raises(ValueError, match=f"is impossible: {ETA_RULE}$"):
            check_eta(bad)

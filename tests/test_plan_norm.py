"""``GeneratorConfig.plan_norm='center'``: the generator reads the plan without its shared component."""

from __future__ import annotations

import pytest
import torch

from mardini.models import build_generator
from mardini.models.generator import ReferenceCache

MASK = torch.tensor([[False, True, True, False], [True, False, True, True]])  # (B, T), True = generate


def _generator(plan_norm: str):
    torch.manual_seed(0)
    gen = build_generator("tiny", plan_norm=plan_norm).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised adaLN/cross outputs would hide the plan path
        for p in gen.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return gen.eval()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 12, 8, 8, generator=g, dtype=torch.float64)  # (B, T, C, h, w)
    t = torch.rand(2, generator=g, dtype=torch.float64)  # (B,)
    plan = torch.randn(2, 4, 16, 128, generator=g, dtype=torch.float64)  # (B, T, M, plan_dim)
    return z, t, plan


def test_centred_plan_has_zero_mean_token_unit_rms_and_is_per_clip():
    gen = _generator("center")
    _, _, plan = _inputs()
    shared = 10 * torch.randn(2, 1, 1, 128, dtype=torch.float64)  # (B, 1, 1, P): one large vector per clip
    out = gen.normalize_plan(plan + shared)  # (B, T, M, P)
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.zeros(2, 128, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(out.square().mean(dim=(1, 2, 3)), torch.ones(2, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(out[1:], gen.normalize_plan(plan[1:] + shared[1:]))  # no batch statistics
    null = gen.null_plan(2, 4, 16)  # constant tokens
    assert gen.normalize_plan(null).abs().max() < 1e-9  # rounding only


def test_centred_generator_ignores_the_shared_plan_component_and_reads_the_rest():
    gen = _generator("center")
    z, t, plan = _inputs()
    with torch.no_grad():
        base = gen(z, t, plan, MASK)  # (B, T, C, h, w)
        shifted = gen(z, t, plan + 5 * torch.randn(1, 1, 1, 128, dtype=torch.float64), MASK)
        other = gen(z, t, plan.flip(2), MASK)  # same tokens at other positions
    torch.testing.assert_close(shifted, base)
    assert (other - base)[MASK].abs().max() > 1e-3


def test_default_generator_reads_the_plan_unchanged():
    gen = _generator("none")
    z, t, plan = _inputs()
    assert gen.normalize_plan(plan) is plan
    with torch.no_grad():
        assert (gen(z, t, plan + 5, MASK) - gen(z, t, plan, MASK))[MASK].abs().max() > 1e-3


def test_reference_cache_matches_the_full_forward_with_a_centred_plan():
    gen = _generator("center")
    z, t, plan = _inputs()
    mask = torch.tensor([[False, True, True, False], [True, False, True, False]])  # two generated frames per row
    cache = ReferenceCache()
    with torch.no_grad():
        for step, scale in enumerate((1.0, 0.6, 0.2)):
            zs = torch.where(mask[:, :, None, None, None], z + 0.3 * step, z)  # generated frames change per step
            ts = t * scale  # (B,)
            torch.testing.assert_close(gen(zs, ts, plan, mask, cache=cache), gen(zs, ts, plan, mask), rtol=0, atol=1e-12)
    assert cache.calls == 2


def test_unknown_plan_norm_is_refused():
    with pytest.raises(ValueError, match=r"plan_norm must be 'none' or 'center', got 'batch'"):
        build_generator("tiny", plan_norm="batch")

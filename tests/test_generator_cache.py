"""Reference-frame cache of the generator: cached steps equal full forwards and run the generated frames only."""

from __future__ import annotations

import pytest
import torch

from mardini.models import build_generator
from mardini.models.generator import ReferenceCache
from pipeline_helpers import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = torch.tensor([[False, True, True, False, True], [True, False, True, True, False]])  # (B, T), True = generate


def _generator(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    gen = build_generator("tiny", **kw).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb so adaLN-Zero layers do not hide any path
        for p in gen.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return gen


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 5, 12, 4, 4, generator=g, dtype=torch.float64)  # (B, T, C, h, w)
    plan = torch.randn(2, 5, 16, 128, generator=g, dtype=torch.float64)  # (B, T, N_low, D)
    return z, plan


def _renoise(z: torch.Tensor, seed: int) -> torch.Tensor:
    z2 = z.clone()
    z2[MASK] = torch.randn(z2[MASK].shape, generator=torch.Generator().manual_seed(seed), dtype=z.dtype)
    return z2


@pytest.mark.parametrize(
    "mode, cross, with_plan, abs_pos",
    [("st", "frame", True, False), ("t", "all", True, False), ("t", "frame", False, False),
     ("st", "all", False, False), ("st", "frame", True, True), ("t", "frame", True, True)],
)
def test_cached_steps_equal_full_forwards(mode, cross, with_plan, abs_pos):
    gen = _generator(attention=mode, cross_attention=cross, abs_pos=abs_pos)
    z, plan = _inputs()
    plan = plan if with_plan else None
    cache = ReferenceCache()
    seen = []
    gen.embed.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))  # frames embedded per call
    with torch.no_grad():
        for step, t in enumerate((1.0, 0.7, 0.3)):
            zs, tt = _renoise(z, step), torch.full((2,), t, dtype=torch.float64)
            cached = gen(zs, tt, plan, MASK, cache=cache)
            full = gen(zs, tt, plan, MASK)
            torch.testing.assert_close(cached, full, rtol=0, atol=1e-12)
    assert cache.calls == 2
    # the first call fills the cache (5 frames), later cached calls embed only the 3 generated frames
    assert seen == [5, 5, 3, 5, 3, 5]


def test_cache_rejects_another_window_and_autograd():
    gen = _generator()
    z, plan = _inputs()
    t = torch.full((2,), 0.5, dtype=torch.float64)
    cache = ReferenceCache()
    with torch.no_grad():
        gen(z, t, plan, MASK, cache=cache)
        with pytest.raises(ValueError, match="new ReferenceCache"):
            gen(z, t, plan, MASK.flip(1), cache=cache)
        uneven = MASK.clone()
        uneven[0, 0] = True
        with pytest.raises(ValueError, match="same number of generated frames"):
            gen(z, t, plan, uneven, cache=ReferenceCache())
    with pytest.raises(RuntimeError, match="no_grad"):
        gen(z, t, plan, MASK, cache=ReferenceCache())

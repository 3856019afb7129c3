"""``GeneratorConfig.identity_attention``: the Fig. 6c switch changes who reference tokens attend to."""

from __future__ import annotations

import pytest
import torch

from mardini.models import build_generator
from mardini.models.generator import ReferenceCache

MASK = torch.tensor([[False, True, True, False], [True, False, True, True]])  # (B, T), True = generate


def _generator(identity: bool, attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    gen = build_generator("tiny", identity_attention=identity, attention=attention).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adaLN-Zero would hide the temporal path at init
        for p in gen.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return gen


def _pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two latents ``(B, T, 12, 8, 8)`` that differ only in the generated frames, and t ``(B,)``."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 12, 8, 8, generator=g, dtype=torch.float64)  # (B, T, C, h, w)
    z2 = torch.where(MASK[..., None, None, None], torch.randn(z.shape, generator=g, dtype=z.dtype), z)
    return z, z2, torch.rand(2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("attention", ["st", "t"])
def test_switch_changes_what_reference_frames_see(attention):
    z, z2, t = _pair()
    ref = ~MASK  # (B, T)
    with torch.no_grad():
        on = _generator(True, attention)
        v, v2 = on(z, t, None, MASK), on(z2, t, None, MASK)  # (B, T, C, h, w)
        assert torch.equal(v[ref], v2[ref])  # identity attention: references ignore the generated frames
        off = _generator(False, attention)
        w, w2 = off(z, t, None, MASK), off(z2, t, None, MASK)
        assert (w[ref] - w2[ref]).abs().max() > 1e-6  # plain attention: references read the generated frames
        assert not torch.allclose(v[MASK], w[MASK])  # the generated frames see a different network too


def test_switch_off_bypasses_the_reference_cache():
    """Without identity attention reference activations change per step, so a cache must not be used."""
    z, z2, t = _pair()
    gen = _generator(False, "st")
    cache = ReferenceCache()
    with torch.no_grad():
        first = gen(z, t, None, MASK, cache=cache)
        second = gen(z2, t, None, MASK, cache=cache)
        assert torch.equal(first, gen(z, t, None, MASK)) and torch.equal(second, gen(z2, t, None, MASK))
    assert not cache.ready and cache.calls == 0


def test_switch_is_validated():
    with pytest.raises(ValueError, match="identity_attention"):
        build_generator("tiny", identity_attention="no")

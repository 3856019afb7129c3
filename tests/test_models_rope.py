"""Axial 3-D RoPE: relative-position property, axis split, padding channels."""

from __future__ import annotations

import pytest
import torch

from mardini.models.rope import AxialRope3d, apply_rope


def _pos(t, y, x, grid):
    return (t * grid[1] + y) * grid[2] + x


@pytest.mark.parametrize("head_dim", [24, 32, 64])
def test_rope_dot_product_depends_only_on_offset(head_dim):
    grid = (5, 6, 7)
    sin, cos = AxialRope3d(head_dim)(grid, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)

    def score(pq, pk):
        qr = apply_rope(q.view(1, 1, 1, -1), sin[pq : pq + 1].double(), cos[pq : pq + 1].double())
        kr = apply_rope(k.view(1, 1, 1, -1), sin[pk : pk + 1].double(), cos[pk : pk + 1].double())
        return float((qr * kr).sum())

    # the same (t, h, w) offset (1, 2, -3) at two different absolute places
    s1 = score(_pos(1, 4, 1, grid), _pos(0, 2, 4, grid))
    s2 = score(_pos(4, 5, 3, grid), _pos(3, 3, 6, grid))
    assert s1 == pytest.approx(s2, rel=1e-5, abs=1e-6)  # float32 tables
    s3 = score(_pos(4, 5, 3, grid), _pos(3, 3, 5, grid))  # a different offset changes the score
    assert abs(s3 - s2) > 1e-3


def test_rope_axes_and_padding():
    head_dim = 32  # 5 bands per axis -> 30 rotated channels + 2 plain
    rope = AxialRope3d(head_dim)
    sin, cos = rope((3, 4, 5), torch.device("cpu"))
    assert sin.shape == cos.shape == (60, head_dim)
    assert torch.all(sin[:, 30:] == 0) and torch.all(cos[:, 30:] == 1)
    # moving only in time changes only the time channels (0..9), only in width only 20..29
    d_t = (sin[_pos(1, 0, 0, (3, 4, 5))] - sin[0]).abs() > 0
    d_w = (sin[_pos(0, 0, 1, (3, 4, 5))] - sin[0]).abs() > 0
    assert d_t[:10].any() and not d_t[10:].any()
    assert d_w[20:30].any() and not d_w[:20].any()
    assert rope((3, 4, 5), torch.device("cpu"))[0] is sin  # cached


def test_rope_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="even head_dim >= 6"):
        AxialRope3d(7)
    with pytest.raises(ValueError, match="even head_dim >= 6"):
        AxialRope3d(4)


def _band_angles(rope: AxialRope3d) -> torch.Tensor:
    """Angle per position of every width band ``(bands,)``: the table at w = 1 of a (1, 1, 2) grid."""
    sin, cos = rope((1, 1, 2), torch.device("cpu"))
    b = rope.bands
    return torch.atan2(sin[1], cos[1])[4 * b : 6 * b : 2]  # (bands,) width channels, one per pair


def test_rope_bands_fall_geometrically_from_max_freq():
    default = _band_angles(AxialRope3d(32))
    assert torch.allclose(default, 1.0 / 10000.0 ** (torch.arange(5) / 5))  # the usual RoPE
    fast = _band_angles(AxialRope3d(32, theta=16.0, max_freq=2.5))
    assert torch.allclose(fast, 2.5 / 16.0 ** (torch.arange(5) / 5))


def test_rope_small_grid_setting_tells_neighbours_apart():
    """On an 8-token axis the summed cosine of offset 1 (of offset 0 = 1) is what limits a sharp look-up."""

    def worst_neighbour(rope: AxialRope3d) -> float:
        f = _band_angles(rope).double()  # (bands,)
        kernel = torch.cos(f[:, None] * torch.arange(8, dtype=torch.float64)[None]).mean(0)  # (8,)
        return float(kernel[1:].max())

    assert worst_neighbour(AxialRope3d(32)) > 0.85  # the usual bands barely turn over 8 positions
    assert worst_neighbour(AxialRope3d(32, theta=16.0, max_freq=2.5)) < 0.45
    # the CPU size (8x8 planner and 8x8 generator token grids, 9 frames) uses such bands in both networks
    from mardini.models.registry import generator_config, planner_config

    for cfg in (planner_config("tiny"), generator_config("tiny")):
        assert worst_neighbour(AxialRope3d(cfg.head_dim, cfg.rope_theta, cfg.rope_max_freq)) < 0.45


def test_rope_rejects_bad_max_freq():
    with pytest.raises(ValueError, match="max_freq=3.5 must be in"):
        AxialRope3d(32, max_freq=3.5)
    with pytest.raises(ValueError, match="theta=1.0 must be > 1"):
        AxialRope3d(32, theta=1.0)
    from mardini.models.registry import planner_config

    with pytest.raises(ValueError, match=r"PlannerConfig.rope_max_freq=0.0 must be in"):
        planner_config("tiny", rope_max_freq=0.0)


@pytest.mark.parametrize("head_dim", [48, 32])  # 32: 30 rotated channels + 2 plain
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batched_tables", [False, True])
def test_heads_last_rope_is_timms_rotation_bit_for_bit(head_dim, dtype, batched_tables):
    """RoPE in the projection layout (B, L, H, d) equals timm's x * cos + rot(x) * sin on (B, H, L, d), grads
    included."""
    from timm.layers import apply_rot_embed

    from mardini.models.rope import apply_rope_heads_last

    sin, cos = AxialRope3d(head_dim, theta=16, max_freq=2.5)((3, 4, 4), torch.device("cpu"))  # (48, d) float32
    if batched_tables:  # (B, 1, L, d): per-clip tables, as cross-attention may pass
        sin, cos = sin[None, None].expand(2, 1, -1, -1), cos[None, None].expand(2, 1, -1, -1)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 48, 3 * 4 * head_dim, generator=g).to(dtype)  # (B, L, 3 H d): q is a strided view
    x = qkv.unflatten(-1, (3, 4, head_dim)).unbind(2)[0].requires_grad_()  # (B, L, H, d), non-contiguous
    x_ref = x.detach().transpose(1, 2).requires_grad_()  # (B, H, L, d)
    out = apply_rope_heads_last(x, sin, cos)  # (B, L, H, d)
    ref = apply_rot_embed(x_ref, sin, cos).to(dtype)  # (B, H, L, d)
    assert out.dtype == dtype
    assert torch.equal(out, ref.transpose(1, 2))
    w = torch.randn(out.shape, generator=g).to(dtype)  # (B, L, H, d)
    (out * w).sum().backward()
    (ref * w.transpose(1, 2)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad.transpose(1, 2), rtol=1e-6 if dtype != torch.bfloat16 else 1e-2,
                               atol=1e-6 if dtype != torch.bfloat16 else 1e-2)


def test_the_table_cache_tells_scaled_and_plain_grids_apart():
    """One AxialRope3d serves plain grids and scaled plan grids (cross-attention); a grid cached without scaling
    must not be returned for the same grid scaled onto another one (e.g. sampling at a second resolution)."""
    rope = AxialRope3d(24, theta=16.0, max_freq=2.5)
    cpu = torch.device("cpu")
    plain = rope((1, 2, 2), cpu)
    scaled = rope((1, 2, 2), cpu, scale_to=(1, 4, 4))
    fresh = AxialRope3d(24, theta=16.0, max_freq=2.5)((1, 2, 2), cpu, scale_to=(1, 4, 4))
    assert not torch.equal(plain[0], scaled[0])
    torch.testing.assert_close(scaled[0], fresh[0])
    torch.testing.assert_close(scaled[1], fresh[1])

"""Axial 3-D rotary position embedding (time, height, width) shared by the planner and the generator.

The head dimension is split into three equal axial parts, one per axis (t, h, w); each part holds
``head_dim // 6`` frequency bands. When ``head_dim`` is not a multiple of 6 the last
``head_dim % 6`` channels are left unrotated (cos = 1, sin = 0), which keeps any even head size usable
(128 -> 3 x 42 rotated + 2 plain). The sin/cos tables come from ``timm.layers.build_rotary_pos_embed``
(interleaved layout) and are applied with ``timm.layers.apply_rot_embed``; this file only adds the 3-D
axis split, the padding and a small cache.

Positions are integer indices (cross-attention places a low-resolution grid's cells onto a finer grid, see
``AxialRope3d.forward``), so for any two tokens ``<rope(q, p1), rope(k, p2)>`` depends only on
``p1 - p2``. Temporal-only attention therefore sees only the time offset (h, w cancel), and per-frame
spatial attention only the (h, w) offset.
"""

from __future__ import annotations

import math

import torch
from timm.layers import apply_rot_embed, build_rotary_pos_embed
from torch import nn


def check_rope_bands(theta: float, max_freq: float, prefix: str = "RoPE ") -> None:
    """Raise a ValueError unless the bands can fall from ``max_freq`` in (0, pi) to ``max_freq / theta``, theta > 1."""
    if not 0 < max_freq < math.pi or not theta > 1:
        raise ValueError(
            f"{prefix}max_freq={max_freq} must be in (0, pi) radians per position and {prefix}theta={theta} "
            "must be > 1 (the bands fall geometrically from max_freq to max_freq / theta)"
        )


class AxialRope3d(nn.Module):
    """Builds ``(sin, cos)`` tables of shape ``(T*h*w, head_dim)`` for a ``(T, h, w)`` token grid.

    Tokens are ordered time-major then row-major: index ``(t * h + y) * w + x``, the order of
    ``rearrange(x, "b t c h w -> b (t h w) c")``.

    Args:
        head_dim: attention head size, even and >= 6 (one band per axis).
        theta: RoPE base: the bands fall geometrically from ``max_freq`` to ``max_freq / theta`` (exclusive).
        max_freq: angle (radians) per position of the fastest band; 1 is the usual RoPE. Small token grids
            need faster and more closely spaced bands to tell neighbours apart: with the usual 1 and 10000 a
            head of 32 has two bands that turn at all over 8 positions, and the summed cosine of offset 1 is
            still 0.9 of offset 0; ``max_freq=2.5, theta=16`` brings it to 0.4 (``tiny`` sizes use these).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, max_freq: float = 1.0) -> None:
        super().__init__()
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"3-D RoPE needs an even head_dim >= 6 (one frequency band per axis), got {head_dim}")
        self.head_dim = head_dim
        self.bands = head_dim // 6
        check_rope_bands(theta, max_freq)
        self.theta = float(theta)
        self.max_freq = float(max_freq)
        exponent = torch.arange(self.bands, dtype=torch.float32) / self.bands  # (bands,)
        self.freqs = self.max_freq / self.theta**exponent  # (bands,) radians per position, fastest first
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(
        self, grid: tuple[int, int, int], device: torch.device, scale_to: tuple[int, int, int] | None = None,
        align: str = "centre",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``sin, cos``, each ``(T*h*w, head_dim)`` float32 on ``device``.

        ``scale_to``: place the grid's cells on another grid of the same extent; cross-attention uses it to put
        low-resolution plan tokens on the generator's grid. Cell ``i`` of an axis of ``n`` cells covers cells
        ``[i m / n, (i + 1) m / n)`` of an axis of ``m``; ``align="centre"`` puts it at their centre,
        ``(i + 0.5) m / n - 0.5``, so every covered cell is nearer to it than to any other; ``"corner"`` (timm's
        ``ref_feat_shape``, checkpoints written before 2026-12-06) at their first cell, ``i m / n``, which leaves
        the last cells of a block as near to (ratio 2) or nearer to (ratio 4) the next one.
        """
        if align not in ("centre", "corner"):
            raise ValueError(f"align must be 'centre' or 'corner', got {align!r}")
        scale_to = None if scale_to is None or tuple(scale_to) == tuple(grid) else tuple(int(g) for g in scale_to)
        key = (tuple(int(g) for g in grid), scale_to, None if scale_to is None else align, str(device))
        if key not in self._cache:
            if len(self._cache) > 16:  # grids change rarely (curriculum); keep the cache small
                self._cache.clear()
            self._cache[key] = self._build(key[0], device, scale_to, align)
        return self._cache[key]

    def _build(self, grid: tuple[int, int, int], device: torch.device, scale_to=None,
               align: str = "centre") -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "meta":
            n = grid[0] * grid[1] * grid[2]
            return (torch.empty(n, self.head_dim, device=device),) * 2
        if scale_to is None or align == "corner":
            sin, cos = build_rotary_pos_embed(
                list(grid), bands=self.freqs.to(device), dim=4 * self.bands, in_pixels=False, device=device,
                ref_feat_shape=None if scale_to is None else list(scale_to),
            )  # (L, 6 * bands) each, axis-major, interleaved pairs
        else:  # cell centres on the finer grid, laid out as timm's tables
            axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) * (m / n) - 0.5
                    for n, m in zip(grid, scale_to)]  # 3 x (n,)
            pos = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (L, 3), t-major
            angles = (pos[:, :, None] * self.freqs.to(device)).flatten(1)  # (L, 3 * bands), axis-major
            sin = angles.sin().repeat_interleave(2, -1)  # (L, 6 * bands), interleaved pairs
            cos = angles.cos().repeat_interleave(2, -1)  # (L, 6 * bands)
        pad = self.head_dim - sin.shape[-1]
        if pad:
            sin = torch.cat([sin, sin.new_zeros(sin.shape[0], pad)], dim=-1)  # (L, head_dim)
            cos = torch.cat([cos, cos.new_ones(cos.shape[0], pad)], dim=-1)  # (L, head_dim)
        return sin, cos


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, H, L, head_dim)`` by tables ``(L, head_dim)``; returns x's dtype."""
    return apply_rot_embed(x, sin.to(x.device), cos.to(x.device))  # (B, H, L, head_dim)


def apply_rope_heads_last(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` for the projection layout ``x (B, L, H, head_dim)``; same result, fewer copies.

    Tables are ``(L, d)`` or broadcastable to ``(B, H, L, d)`` with H = 1 (e.g. ``(B, 1, L, d)``). Computes
    ``x * cos + swap(x) * sin_signed`` where ``swap`` exchanges the two members of every pair and
    ``sin_signed = sin * (-1, +1, ...)``: elementwise the same products as timm's ``x * cos + rot(x) * sin``
    (a negated factor gives the negated product exactly), with one copy of ``x`` instead of three.
    """
    sin, cos = (t[:, None] if t.dim() == 2 else t.transpose(-3, -2) for t in (sin, cos))  # (.., L, 1, d)
    sign = torch.tensor([-1.0, 1.0], device=sin.device, dtype=sin.dtype).repeat(sin.shape[-1] // 2)  # (d,)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (B, L, H, d): [x1, x0, x3, x2, ...]
    out = x * cos.to(x.device) + swapped * (sin * sign).to(x.device)  # promoted like timm: fp32 tables keep fp32
    return out.to(x.dtype)  # (B, L, H, d)

"""Building blocks shared by the planner and the generator: patching, attention projections, embedders.

Norms and MLPs come from ``timm.layers`` (RmsNormFp32, LayerNormFp32, SwiGLU, Mlp; the Fp32 norms compute in
float32 and return the input dtype, so q, k, v share one dtype under bf16 autocast). This file holds only the
pieces timm does not provide in the form the two models need.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from timm.layers import LayerNormFp32
from torch import nn

from mardini.models.rope import apply_rope_heads_last

# --------------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------------


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, T, C, h, w)`` -> ``(B, T, (h/p)*(w/p), p*p*C)`` (row-major patches)."""
    if z.shape[-2] % p or z.shape[-1] % p:
        raise ValueError(
            f"latent size {tuple(z.shape[-2:])} is not divisible by patch_size={p}; "
            f"use latents whose sides are multiples of {p} or a smaller patch_size"
        )
    return rearrange(z, "b t c (h p1) (w p2) -> b t (h w) (p1 p2 c)", p1=p, p2=p)  # (B, T, N, p*p*C)


def unpatchify(x: torch.Tensor, p: int, size: tuple[int, int]) -> torch.Tensor:
    """``(B, T, N, p*p*C)`` -> ``(B, T, C, h, w)`` with ``(h, w) = size`` in latent pixels."""
    h, w = size
    if h % p or w % p or x.shape[2] != (h // p) * (w // p):
        raise ValueError(f"cannot unpatchify {x.shape[2]} tokens of patch {p} into a {h}x{w} latent")
    return rearrange(x, "b t (h w) (p1 p2 c) -> b t c (h p1) (w p2)", h=h // p, p1=p, p2=p)  # (B, T, C, h, w)


def position_features(grid: tuple[int, int, int], dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed sin-cos features of every token's (frame, row, column), added to the patch embeddings (``abs_pos``).

    RoPE tells attention how far apart two tokens are, but what a token reads (its values) says nothing about
    where the read tokens are; with these features it does, so a generated frame's token that averages the
    values of one object's tokens in the given frames gets the object's mean position (e.g. the midpoint, for
    interpolation). Rows and columns are cell centres as a fraction of the frame, ``(i + 0.5) / h``, so grids of
    different sizes over the same frame (the planner's and the generator's) get matching codes; time is the frame
    index within the window. ``dim // 6`` bands per axis (sin and cos), zeros in the remaining dims; spatial bands
    from pi to 16 pi radians per frame side, time bands from 1 to 1/16 radian per frame, geometric.

    Args:
        grid: ``(T, h, w)`` token grid. dim: model width (>= 6).
    Returns:
        ``(T * h * w, dim)`` in ``dtype``, frames then rows then columns (the token order of both models).
    """
    t, h, w = grid
    n = dim // 6
    if n < 1:
        raise ValueError(f"position features need dim >= 6 (a sin-cos pair per axis), got {dim}")
    ramp = torch.arange(n, device=device, dtype=torch.float64) / max(n - 1, 1)  # (n,) in [0, 1]
    space_bands = math.pi * 16.0 ** ramp  # (n,) radians per frame side
    time_bands = 16.0 ** -ramp  # (n,) radians per frame
    ft = torch.arange(t, device=device, dtype=torch.float64)  # (T,)
    fy = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) / h  # (h,)
    fx = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) / w  # (w,)
    gt, gy, gx = torch.meshgrid(ft, fy, fx, indexing="ij")  # (T, h, w) each
    angles = torch.cat([gt.reshape(-1, 1) * time_bands, gy.reshape(-1, 1) * space_bands,
                        gx.reshape(-1, 1) * space_bands], dim=1)  # (L, 3n)
    feats = torch.cat([angles.sin(), angles.cos()], dim=1)  # (L, 6n)
    return nn.functional.pad(feats, (0, dim - 6 * n)).to(dtype)  # (L, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift``; x ``(B, T, N, D)``, shift/scale ``(B, T, 1, D)``."""
    return x * (1 + scale) + shift  # (B, T, N, D)


# --------------------------------------------------------------------------------------------------
# Attention projections (kernels live in attention.py)
# --------------------------------------------------------------------------------------------------


class SelfAttentionProj(nn.Module):
    """Q/K/V projection with QK-norm and RoPE, and the output projection, around any attention kernel.

    Kept apart from the kernel so a caller can compute (and cache) K/V of some tokens once and attend
    with its own rule: ``q, k, v = m.qkv(x, rope)``; ``o = kernel(q, k, v)``; ``y = m.out(o)``.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.q_norm = LayerNormFp32(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = LayerNormFp32(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=bias)

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """``x (B, L, D)`` -> q, k, v ``(B, H, L, d)`` with QK-norm and RoPE applied to q and k.

        Norm and RoPE run in the projection's ``(B, L, H, d)`` layout and the results are returned as
        transposed views: no layout copy; SDPA takes the strides as they are and writes ``(B, L, H, d)``,
        so :meth:`out` is a view too. ``rope``: tables ``(L, d)`` or ``(B, 1, L, d)``.
        """
        q, k, v = self.qkv_proj(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)  # (B, L, H, d) x3
        q, k = self.q_norm(q), self.k_norm(k)  # (B, L, H, d)
        if rope is not None:
            q, k = apply_rope_heads_last(q, *rope), apply_rope_heads_last(k, *rope)  # (B, L, H, d)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, d) views

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """``o (B, H, L, d)`` -> ``(B, L, D)``."""
        return self.proj(rearrange(o, "b h l d -> b l (h d)"))  # (B, L, D)


class CrossAttentionProj(nn.Module):
    """Queries from the generator's tokens (width D), keys/values from planning tokens (width plan_dim)."""

    def __init__(self, dim: int, context_dim: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(context_dim, 2 * dim)
        self.q_norm = LayerNormFp32(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = LayerNormFp32(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def q(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x (B, L, D)`` -> ``(B, H, L, d)``; ``rope``: tables ``(L, d)`` or ``(B, 1, L, d)``."""
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.heads, self.head_dim)))  # (B, L, H, d)
        if rope is not None:
            q = apply_rope_heads_last(q, *rope)  # (B, L, H, d)
        return q.transpose(1, 2)  # (B, H, L, d)

    def kv(
        self, context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``context (B, M, plan_dim)`` -> k, v ``(B, H, M, d)``; ``rope``: key tables ``(M, d)``."""
        k, v = self.kv_proj(context).unflatten(-1, (2, self.heads, self.head_dim)).unbind(2)  # (B, M, H, d) x2
        k = self.k_norm(k)  # (B, M, H, d)
        if rope is not None:
            k = apply_rope_heads_last(k, *rope)  # (B, M, H, d)
        return k.transpose(1, 2), v.transpose(1, 2)  # (B, H, M, d) x2

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """``o (B, H, L, d)`` -> ``(B, L, D)``."""
        return self.proj(rearrange(o, "b h l d -> b l (h d)"))  # (B, L, D)


# --------------------------------------------------------------------------------------------------
# Conditioning embedders
# --------------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Continuous time ``t`` in [0, 1] -> ``(…, D)``: sinusoid of ``scale * t`` then a 2-layer SiLU MLP.

    Written here because timm has no timestep embedder and diffusers is only an optional extra.
    """

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {freq_dim}")
        self.freq_dim, self.scale, self.max_period = freq_dim, scale, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """``t (...)`` -> ``(..., freq_dim)`` float32 ``[cos, sin]`` features."""
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )  # (half,)
        args = self.scale * t.float()[..., None] * freqs  # (..., half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (..., freq_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t (...)`` in [0, 1] -> ``(..., D)``."""
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))  # (..., D)


class AdaLNModulation(nn.Module):
    """``c (..., D)`` -> ``chunks`` tensors ``(..., D)`` (shift/scale/gate); zero-initialised (adaLN-Zero)."""

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.act = nn.SiLU()
        self.linear = nn.Linear(dim, chunks * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(self.act(c)).chunk(self.chunks, dim=-1)  # chunks x (..., D)

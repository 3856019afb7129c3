"""Planning model (MAR, PAPER.md §2.3): a Llama-style transformer over the low-resolution clip.

Masked frames are replaced entirely by a learned [MASK] token, all frames attend spatio-temporally with
identity attention for the reference frames, and the final hidden states are the planning signal of
every frame. The projection ``head`` maps the plan back to latents for the warm-up regression only.

Deviation from the paper: axial 3-D RoPE over (t, h, w) instead of the paper's 2-D RoPE with a row-end
[NEXT] token (ARCHITECTURE.md decisions table).
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import RmsNormFp32, SwiGLU
from torch import nn
from torch.utils.checkpoint import checkpoint

from mardini.models.attention import IdentityLayout, identity_attention, identity_layout
from mardini.models.layers import SelfAttentionProj, patchify, position_features, unpatchify
from mardini.models.registry import PlannerConfig
from mardini.models.rope import AxialRope3d

# --------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------


class PlannerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``."""

    def __init__(self, cfg: PlannerConfig) -> None:
        super().__init__()
        self.scope = cfg.identity_scope
        self.norm1 = RmsNormFp32(cfg.dim)
        self.attn = SelfAttentionProj(cfg.dim, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm2 = RmsNormFp32(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden, bias=False)

    def forward(self, x: torch.Tensor, ref: torch.Tensor, rope, tokens_per_frame: int,
                layout: IdentityLayout | None = None) -> torch.Tensor:
        """``x (B, L, D)``, ``ref (B, L)`` bool (True = reference token) -> ``(B, L, D)``. ``layout``:
        ``identity_layout(ref)``, computed once per forward by :class:`Planner` (None: computed here)."""
        q, k, v = self.attn.qkv(self.norm1(x), rope)  # (B, H, L, d) x3
        o = identity_attention(q, k, v, ref, self.scope, tokens_per_frame, check_frames=False,
                               layout=layout)  # (B, H, L, d)
        x = x + self.attn.out(o)  # (B, L, D)
        return x + self.mlp(self.norm2(x))  # (B, L, D)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class Planner(nn.Module):
    """MAR planning model.

    ``forward(z_low, mask)``:
        z_low: ``(B, T, C, h, w)`` low-resolution latents (any finite or non-finite values in masked frames
            are ignored). mask: ``(B, T)`` bool, True = frame to generate (replaced by [MASK]).
        returns the plan ``(B, T, N_low, D)``, ``N_low = (h/p) * (w/p)``.
    """

    def __init__(self, cfg: PlannerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.dim
        self.embed = nn.Linear(p * p * c, d)  # a p x p patch embedding (equal to a stride-p Conv2d)
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.rope = AxialRope3d(cfg.head_dim, cfg.rope_theta, cfg.rope_max_freq)
        self.blocks = nn.ModuleList(PlannerBlock(cfg) for _ in range(cfg.depth))
        self.norm = RmsNormFp32(d)
        self.head: nn.Linear | None = nn.Linear(d, p * p * c)  # warm-up projection f, removed for the joint stage
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias, [MASK] ~ N(0, 0.02^2)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- public API --------------------------------------------------------------------------------
    def forward(self, z_low: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check_inputs(z_low, mask)
        b, t, _, h, w = z_low.shape
        p = self.cfg.patch_size
        z = z_low.masked_fill(mask[:, :, None, None, None], 0.0)  # (B, T, C, h, w); masked content never enters
        x = self.embed(patchify(z, p))  # (B, T, N, D)
        n = x.shape[2]
        x = torch.where(mask[:, :, None, None], self.mask_token.to(x.dtype), x)  # (B, T, N, D)
        x = rearrange(x, "b t n d -> b (t n) d")  # (B, L, D)
        if self.cfg.abs_pos:  # [MASK] tokens too: each knows where it is
            x = x + position_features((t, h // p, w // p), x.shape[-1], x.device, x.dtype)  # (B, L, D)
        ref = (~mask).repeat_interleave(n, dim=1)  # (B, L)
        layout = identity_layout(~mask, tokens_per_frame=n)  # ref's, read from the device once for all blocks
        rope = self.rope((t, h // p, w // p), x.device)  # (L, d) x2
        for block in self.blocks:
            if self.cfg.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, ref, rope, n, layout, use_reentrant=False)  # (B, L, D)
            else:
                x = block(x, ref, rope, n, layout)  # (B, L, D)
        x = self.norm(x)  # (B, L, D)
        return rearrange(x, "b (t n) d -> b t n d", t=t)  # (B, T, N, D)

    def project(self, plan: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Warm-up projection f: plan ``(B, T, N, D)`` -> latents ``(B, T, C, h, w)`` with ``(h, w) = size``."""
        if self.head is None:
            raise RuntimeError("the projection head was dropped (drop_head()); project() is for the warm-up only")
        return unpatchify(self.head(plan), self.cfg.patch_size, size)  # (B, T, C, h, w)

    def drop_head(self) -> None:
        """Remove the warm-up projection head (joint stage: PAPER.md 'remove projection layer')."""
        self.head = None

    # -- checks ------------------------------------------------------------------------------------
    def _check_inputs(self, z_low: torch.Tensor, mask: torch.Tensor) -> None:
        c = self.cfg.in_channels
        if z_low.dim() != 5 or z_low.shape[2] != c:
            raise ValueError(
                f"planner expects latents (B, T, {c}, h, w), got {tuple(z_low.shape)}; "
                f"set in_channels to the autoencoder's latent channels"
            )
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(z_low.shape[:2]):
            raise ValueError(
                f"mask must be a (B, T) = {tuple(z_low.shape[:2])} bool tensor (True = generate), "
                f"got dtype={mask.dtype} shape={tuple(mask.shape)}"
            )

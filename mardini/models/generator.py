"""Generation model (DM, PAPER.md §2.4): a DiT over the high-resolution latents, conditioned on the plan.

Block (one per depth), per frame f with timestep embedding ``c_t[f]`` and pooled-plan embedding ``c_p[f]``:

    x = x + gate_s * SpatialAttn(modulate(norm(x), shift_s, scale_s))   # within each frame, c_t
    x = x + TemporalAttn(norm(x))                                        # /T or /ST, identity attention
    x = x + CrossAttn(norm(x), plan)                                     # frame's own plan tokens (or all)
    x = x + gate_m * MLP(modulate(norm(x), shift_m, scale_m))            # c_t + c_p

Reference frames carry t = 0, and identity attention lets a reference token see only itself, so their
activations depend on nothing generated: :class:`ReferenceCache` keeps their temporal K/V (and the plan's
cross-attention K/V) from the first denoising step of a window, and later steps run the generated frames
only (``SelfAttentionProj.qkv`` / ``.out`` are separate from the kernel for that reason).

Choices beyond the paper: adaLN-Zero also zero-inits the output projections of the ungated temporal and
cross attentions, so every block starts as the identity. Cross-attention carries RoPE too (Fig. 2 puts
"PosEmb" on every attention): the low-resolution plan tokens are placed at the generator-grid coordinates of
the area they cover (``Generator.cross_rope``), so a token can read the plan of its own area. Without it
(``cross_rope: false``) queries and plan tokens carry no position at all and the plan is a bag of tokens.
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from timm.layers import Mlp, RmsNormFp32
from torch import nn
from torch.utils.checkpoint import checkpoint

from mardini.models.attention import IdentityLayout, attention, identity_attention, identity_layout
from mardini.models.layers import (
    AdaLNModulation,
    CrossAttentionProj,
    SelfAttentionProj,
    TimestepEmbedder,
    modulate,
    patchify,
    position_features,
    unpatchify,
)
from mardini.models.registry import GeneratorConfig
from mardini.models.rope import AxialRope3d

# --------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------


def plan_grid(tokens: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The ``(hp, wp)`` grid of ``tokens`` plan tokens of one frame, with the aspect ratio of ``grid (h, w)``."""
    h, w = grid
    if tokens == 1:  # the null plan's one token per frame: any aspect ratio
        return 1, 1
    hp = max(1, round((tokens * h / w) ** 0.5))
    wp = tokens // hp
    if hp * wp != tokens or (tokens > 1 and hp * w != wp * h):
        raise ValueError(
            f"{tokens} plan tokens per frame do not form a grid with the aspect ratio of the generator's "
            f"{h}x{w} token grid; planner and generator must see frames of the same aspect ratio"
        )
    return hp, wp


def temporal_layout(mask: torch.Tensor, tokens_per_frame: int, mode: str) -> IdentityLayout:
    """The identity-attention layout of the temporal layers (:meth:`GeneratorBlock.temporal_attn`) for ``mask (B, T)``
    (True = generated): ``/ST`` rows are ``(B, T*N)``, ``/T`` rows ``(B*N, T)``. One device -> host copy of ``mask``."""
    if mode == "st":
        return identity_layout(~mask, tokens_per_frame=tokens_per_frame)
    return identity_layout(~mask, row_repeat=tokens_per_frame)


class GeneratorBlock(nn.Module):
    """One DiT block; all tensors are ``(B, T, N, D)`` with per-frame conditioning ``(B, T, 1, D)``."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.cross_mode = cfg.cross_attention
        self.identity = cfg.identity_attention  # False: the Fig. 6c ablation (references read every token)
        self.norm_s = RmsNormFp32(d, affine=False)
        self.spatial = SelfAttentionProj(d, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm_t = RmsNormFp32(d)
        self.temporal = SelfAttentionProj(d, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm_c = RmsNormFp32(d)
        self.cross = CrossAttentionProj(d, cfg.plan_dim, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm_m = RmsNormFp32(d, affine=False)
        self.mlp = Mlp(d, cfg.mlp_hidden, act_layer=partial(nn.GELU, approximate="tanh"))
        self.mod_s = AdaLNModulation(d, 3)  # from c_t: shift, scale, gate of the spatial attention
        self.mod_m = AdaLNModulation(d, 3)  # from c_t + c_p: shift, scale, gate of the MLP

    def spatial_attn(self, x: torch.Tensor, c_t: torch.Tensor, rope) -> torch.Tensor:
        """Per-frame attention (no identity mask), adaLN from the timestep. ``(B, T, N, D)``."""
        t = x.shape[1]
        shift, scale, gate = self.mod_s(c_t)  # (B, T, 1, D) x3
        h = rearrange(modulate(self.norm_s(x), shift, scale), "b t n d -> b (t n) d")  # (B, L, D)
        q, k, v = (rearrange(a, "b h (t n) d -> (b t) h n d", t=t) for a in self.spatial.qkv(h, rope))  # (BT,H,N,d)
        o = rearrange(attention(q, k, v), "(b t) h n d -> b h (t n) d", t=t)  # (B, H, L, d)
        return x + gate * rearrange(self.spatial.out(o), "b (t n) d -> b t n d", t=t)  # (B, T, N, D)

    def temporal_attn(self, x: torch.Tensor, mask: torch.Tensor, rope, mode: str, record: dict | None = None,
                      layout: IdentityLayout | None = None):
        """``/ST``: all tokens of all frames; ``/T``: tokens at one spatial position across frames.

        Identity attention in both: a reference token sees only itself (plain full attention when
        ``cfg.identity_attention`` is False). ``mask (B, T)`` True = generated; ``layout``: its
        :func:`temporal_layout`, which ``Generator.forward`` computes once for every block (None: computed here).
        ``record`` (a dict) receives the keys/values of every token for a :class:`ReferenceCache`.
        """
        b, t, n, _ = x.shape
        if self.identity and layout is None:
            layout = temporal_layout(mask, n, mode)
        q, k, v = self.temporal.qkv(rearrange(self.norm_t(x), "b t n d -> b (t n) d"), rope)  # (B, H, L, d) x3
        if record is not None:
            record["temporal"] = (k.contiguous(), v.contiguous())  # (B, H, L, d) x2
        if mode == "st":
            ref = (~mask).repeat_interleave(n, dim=1)  # (B, L)
            o = identity_attention(q, k, v, ref, "token", layout=layout) if self.identity else attention(q, k, v)
        else:
            q, k, v = (rearrange(a, "b h (t n) d -> (b n) h t d", t=t) for a in (q, k, v))  # (B*N, H, T, d)
            ref = (~mask).repeat_interleave(n, dim=0)  # (B*N, T), row b*N + j = position j of clip b
            o = (identity_attention(q, k, v, ref, "token", layout=layout) if self.identity
                 else attention(q, k, v))  # (B*N, H, T, d)
            o = rearrange(o, "(b n) h t d -> b h (t n) d", b=b)  # (B, H, L, d)
        return x + rearrange(self.temporal.out(o), "b (t n) d -> b t n d", t=t)  # (B, T, N, D)

    def cross_attn(self, x: torch.Tensor, plan: torch.Tensor | None, kv=None, record: dict | None = None,
                   rope=None):
        """Queries: the frame's tokens; keys/values: its plan tokens (``frame``) or all plan tokens (``all``).

        ``kv``: precomputed plan keys/values (a :class:`ReferenceCache`), then ``plan`` is unused;
        ``record`` receives the keys/values computed here. ``rope``: ``(query tables, key tables)`` that place
        queries and plan tokens on one spatial grid (see ``Generator.cross_rope``), or None.
        """
        t = x.shape[1]
        h = self.norm_c(x)  # (B, T, N, D)
        rope_q, rope_k = rope if rope is not None else (None, None)
        if self.cross_mode == "frame":
            q = self.cross.q(rearrange(h, "b t n d -> (b t) n d"), rope_q)  # (BT, H, N, d)
            k, v = kv if kv is not None else self.cross.kv(rearrange(plan, "b t m c -> (b t) m c"), rope_k)  # (BT,H,M,d)
            o = rearrange(attention(q, k, v), "(b t) h n d -> b h (t n) d", t=t)  # (B, H, L, d)
        else:
            q = self.cross.q(rearrange(h, "b t n d -> b (t n) d"), rope_q)  # (B, H, L, d)
            k, v = kv if kv is not None else self.cross.kv(rearrange(plan, "b t m c -> b (t m) c"), rope_k)  # (B,H,TM,d)
            o = attention(q, k, v)  # (B, H, L, d)
        if record is not None:
            record["cross"] = (k, v)
        return x + rearrange(self.cross.out(o), "b (t n) d -> b t n d", t=t)  # (B, T, N, D)

    def mlp_block(self, x: torch.Tensor, c_m: torch.Tensor) -> torch.Tensor:
        """GELU MLP with adaLN from timestep + pooled plan. ``(B, T, N, D)``."""
        shift, scale, gate = self.mod_m(c_m)  # (B, T, 1, D) x3
        return x + gate * self.mlp(modulate(self.norm_m(x), shift, scale))  # (B, T, N, D)

    def forward(self, x, c_t, c_m, plan, mask, rope, cross_rope, mode: str, record: dict | None = None,
                cached: tuple[dict, torch.Tensor] | None = None, layout: IdentityLayout | None = None):
        """One block over every frame; with ``cached`` (a :class:`ReferenceCache` layer and the generated tokens'
        positions) the cached step :meth:`forward_generated` instead, where ``rope`` and ``cross_rope`` are the
        generated tokens' tables and ``plan``, ``mask`` unused. Both go through ``forward`` so that a wrapper of the
        block (an FSDP unit gathering its parameters, hooks) sees every call. ``layout``: ``mask``'s
        :func:`temporal_layout` (None: the block computes it)."""
        if cached is not None:
            return self.forward_generated(x, c_t, c_m, rope, cross_rope, *cached, mode)
        x = self.spatial_attn(x, c_t, rope)  # (B, T, N, D)
        x = self.temporal_attn(x, mask, rope, mode, record, layout)  # (B, T, N, D)
        x = self.cross_attn(x, plan, record=record, rope=cross_rope)  # (B, T, N, D)
        return self.mlp_block(x, c_m)  # (B, T, N, D)

    def forward_generated(self, x, c_t, c_m, rope, cross_rope_q, layer: dict, tokens: torch.Tensor, mode: str):
        """A cached step: ``x (B, Tg, N, D)`` holds the generated frames only, the references come from ``layer``.

        ``layer``: one block's entry of a :class:`ReferenceCache`; ``tokens (B, Tg*N)`` the generated tokens'
        sequence positions; ``rope``: their tables ``(B, 1, Tg*N, d)``; ``cross_rope_q``: their cross-attention
        query tables (None without cross-attention RoPE); ``c_t, c_m (B, Tg, 1, D)``.
        """
        x = self.spatial_attn(x, c_t, rope)  # (B, Tg, N, D); per frame, as in forward
        b, tg, n, _ = x.shape
        q, k, v = self.temporal.qkv(rearrange(self.norm_t(x), "b t n d -> b (t n) d"), rope)  # (B, H, Lg, d) x3
        k_all, v_all = layer["temporal"]  # (B, H, L, d): reference keys/values from the first step
        idx = tokens[:, None, :, None].expand_as(k)  # (B, H, Lg, d)
        k_all.scatter_(2, idx, k.to(k_all.dtype))  # generated positions rewritten, references untouched
        v_all.scatter_(2, idx, v.to(v_all.dtype))
        if mode == "st":
            o = attention(q, k_all, v_all)  # (B, H, Lg, d): a generated query reads every key
        else:
            q = rearrange(q, "b h (t n) d -> (b n) h t d", t=tg)  # (B*N, H, Tg, d)
            k_t, v_t = (rearrange(a, "b h (t n) d -> (b n) h t d", n=n) for a in (k_all, v_all))  # (B*N, H, T, d)
            o = rearrange(attention(q, k_t, v_t), "(b n) h t d -> b h (t n) d", b=b)  # (B, H, Lg, d)
        x = x + rearrange(self.temporal.out(o), "b (t n) d -> b t n d", t=tg)  # (B, Tg, N, D)
        x = self.cross_attn(x, None, kv=layer["cross"], rope=(cross_rope_q, None))  # (B, Tg, N, D)
        return self.mlp_block(x, c_m)  # (B, Tg, N, D)


# --------------------------------------------------------------------------------------------------
# Reference-frame cache (sampling)
# --------------------------------------------------------------------------------------------------


class ReferenceCache:
    """What the generated frames of one window need from its reference frames, kept across denoising steps.

    Exact because reference frames carry t = 0 and identity attention lets them see only themselves: their
    temporal keys/values and their outputs never change, and neither do the plan's cross-attention keys/values
    and pooled-plan embedding. The first ``Generator.forward(..., cache=c)`` of a window runs every frame and
    fills ``c``; later calls run the generated frames only. Valid for one window: the same mask, plan,
    reference latents and batch at every call (a cond + null guidance batch counts as one batch), and the
    same number of generated frames in every row. Sampling only: call under ``torch.no_grad()``.
    """

    def __init__(self) -> None:
        self.ready = False
        self.calls = 0  # forwards served from the cache (for tests and benchmarks)

    def start(self, z: torch.Tensor, mask: torch.Tensor) -> None:
        """Checks before the filling call: no autograd, equal generated-frame counts per row."""
        if torch.is_grad_enabled():
            raise RuntimeError("ReferenceCache is for sampling: call the generator under torch.no_grad()")
        counts = mask.sum(dim=1)  # (B,)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"a ReferenceCache needs the same number of generated frames in every row, got {counts.tolist()}; "
                "sample rows with different counts separately (MarDiniPipeline.generate does)"
            )
        self.mask = mask.clone()  # (B, T)
        self.shape = tuple(z.shape)
        b, t = mask.shape
        tg = int(counts[0])
        self.frames = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :tg]  # (B, Tg) ascending
        self.rows = torch.arange(b, device=mask.device)[:, None]  # (B, 1)

    def fill(self, v, c_p, rope, cross_rope, records, mode: str, cross_mode: str) -> None:
        """Keep the first call's output ``v (B, T, C, h, w)`` and per-block keys/values (see Generator.forward)."""
        rows, gen = self.rows, self.frames
        b, tg = gen.shape
        n = records[0]["temporal"][0].shape[2] // self.shape[1] if records else 0  # tokens per frame
        self.tokens = (gen[:, :, None] * n + torch.arange(n, device=gen.device)).flatten(1)  # (B, Tg*N)
        self.rope = tuple(r[self.tokens][:, None] for r in rope)  # (B, 1, Tg*N, d) x2
        # cross-attention queries: per-frame tables (N, d) are the same for every frame; "all" uses the grid's
        self.cross_rope_q = None if cross_rope is None else cross_rope[0] if cross_mode == "frame" else self.rope
        self.c_p = c_p[rows, gen]  # (B, Tg, 1, D)
        self.v = v  # (B, T, C, h, w)
        self.mode = mode
        self.layers = []
        for rec in records:
            k, v_ = rec["cross"]
            if cross_mode == "frame":  # (B*T, H, M, d) -> the generated frames' (B*Tg, H, M, d)
                k, v_ = (rearrange(a.unflatten(0, (b, -1))[rows, gen], "b t h m d -> (b t) h m d") for a in (k, v_))
            self.layers.append({"temporal": rec["temporal"], "cross": (k, v_)})
        self.ready = True

    def check(self, z: torch.Tensor, mask: torch.Tensor, mode: str) -> None:
        """Raise if a call does not belong to the window this cache was filled for."""
        if tuple(z.shape) != self.shape or not torch.equal(mask, self.mask) or mode != self.mode:
            raise ValueError(
                f"this ReferenceCache was filled for latents {self.shape}, attention '{self.mode}' and another mask; "
                f"got {tuple(z.shape)}, '{mode}'. Use a new ReferenceCache for every window"
            )
        self.calls += 1


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """DiT generation model predicting v for every frame.

    ``forward(z, t, plan, mask, cache=None)``:
        z: ``(B, T, C, h, w)`` latents, references clean, generated frames noised.
        t: ``(B,)`` or ``(B, T)`` continuous diffusion time in [0, 1] (0 = clean); reference frames get 0.
        plan: ``(B, T, N_low, plan_dim)`` planning signal, or None for the learned null plan.
        mask: ``(B, T)`` bool, True = generated frame.
        cache: optional :class:`ReferenceCache` of the window (sampling only): an empty one is filled by this
            call; a filled one makes the call run the generated frames only (same result, less work).
        self_cond: ``cfg.self_cond`` only: ``(B, T, C, h, w)`` the previous step's estimate of the clean latents
            of the generated frames, or None (zeros: the first step). Read beside ``z`` (channels concatenated);
            reference frames read their own latents there, so their activations never change.
        returns v ``(B, T, C, h, w)`` (float, the model's compute dtype).
    """

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.dim
        self.attention_mode = cfg.attention
        inputs = 2 * c if cfg.self_cond else c  # latents, and the x0 estimate when self-conditioned
        self.embed = nn.Linear(p * p * inputs, d)  # a p x p patch embedding (equal to a stride-p Conv2d)
        self.t_embed = TimestepEmbedder(d, cfg.freq_dim, cfg.time_scale)
        self.plan_embed = Mlp(cfg.plan_dim, d, d, act_layer=nn.SiLU)  # pooled plan of a frame -> MLP modulation
        self.null_plan_token = nn.Parameter(torch.zeros(cfg.plan_dim))
        self.rope = AxialRope3d(cfg.head_dim, cfg.rope_theta, cfg.rope_max_freq)
        self.blocks = nn.ModuleList(GeneratorBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = RmsNormFp32(d, affine=False)
        self.mod_out = AdaLNModulation(d, 2)  # shift, scale of the final layer
        self.out = nn.Linear(d, p * p * c)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears; adaLN-Zero (modulations, ungated attention outputs, final layer) start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for emb_linear in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(emb_linear.weight, std=0.02)
        nn.init.normal_(self.null_plan_token, std=0.02)
        zero = [self.mod_out.linear, self.out]
        for blk in self.blocks:
            zero += [blk.mod_s.linear, blk.mod_m.linear, blk.temporal.proj, blk.cross.proj]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    # -- public API --------------------------------------------------------------------------------
    def set_attention(self, mode: str) -> None:
        """Switch the temporal layers between ``"st"`` and ``"t"`` (same weights, PAPER.md §3.3)."""
        if mode not in ("st", "t"):
            raise ValueError(f"attention mode must be 'st' or 't', got {mode!r}")
        self.attention_mode = mode
        self.cfg.attention = mode

    def null_plan(self, batch: int, frames: int, tokens: int) -> torch.Tensor:
        """The learned unconditional plan broadcast to ``(B, T, N, plan_dim)``."""
        return self.null_plan_token.expand(batch, frames, tokens, -1)  # (B, T, N, plan_dim)

    def normalize_plan(self, plan: torch.Tensor) -> torch.Tensor:
        """``plan_norm='center'``: subtract the clip's mean plan token, scale the rest to unit RMS. ``(B, T, M, P)``

        A planner's output tokens share one large component (about 95 % of their norm in the tiny chain) that
        carries nothing about the clip; through the cross-attention keys it makes every plan token look alike, and
        the generator learns to ignore the plan. Centring keeps only what differs between positions and frames.
        A constant plan (the null plan) becomes zeros. Per clip, so results do not depend on the batch.
        """
        if self.cfg.plan_norm == "none":
            return plan
        p = plan.float() if plan.dtype in (torch.float16, torch.bfloat16) else plan  # statistics in fp32 or better
        dev = p - p.mean(dim=(1, 2), keepdim=True)  # (B, T, M, P)
        rms = dev.square().mean(dim=(1, 2, 3), keepdim=True).add(1e-6).sqrt()  # (B, 1, 1, 1)
        return (dev / rms).to(plan.dtype)  # (B, T, M, P)

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        plan: torch.Tensor | None,
        mask: torch.Tensor,
        cache: ReferenceCache | None = None,
        self_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.cfg.identity_attention:  # references read generated tokens: their activations change per step
            cache = None  # so the reference cache would be wrong; every step runs the full forward
        if cache is not None:
            if cache.ready:
                return self._forward_generated(z, t, mask, cache, self_cond)
            cache.start(z, mask)
        b, frames, _, h, w = z.shape
        t_frame = self._frame_times(z, t, mask)  # (B, T)
        if plan is None:
            plan = self.null_plan(b, frames, 1)  # (B, T, 1, plan_dim); identical tokens: one is enough
        self._check_plan(plan, b, frames)
        p = self.cfg.patch_size
        x = self.embed(patchify(self._inputs(z, mask, self_cond), p))  # (B, T, N, D)
        if self.cfg.abs_pos:
            x = x + self.position_features((frames, h // p, w // p), x)  # (B, T, N, D)
        c_t = self.t_embed(t_frame)[:, :, None]  # (B, T, 1, D)
        plan = self.normalize_plan(plan).to(x.dtype)  # (B, T, M, plan_dim)
        c_p = self.plan_embed(plan.mean(dim=2))[:, :, None]  # (B, T, 1, D)
        c_m = c_t + c_p  # (B, T, 1, D)
        rope = self.rope((frames, h // p, w // p), z.device)  # (L, d) x2
        cross_rope = self.cross_rope(frames, (h // p, w // p), plan.shape[2], z.device)
        records = [{} if cache is not None else None for _ in self.blocks]
        # read the mask back from the device once for all blocks, not in every one
        layout = temporal_layout(mask, x.shape[2], self.attention_mode) if self.cfg.identity_attention else None
        for block, record in zip(self.blocks, records):
            args = (x, c_t, c_m, plan, mask, rope, cross_rope, self.attention_mode)
            if self.cfg.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, layout=layout, use_reentrant=False)  # (B, T, N, D)
            else:
                x = block(*args, record, layout=layout)  # (B, T, N, D)
        shift, scale = self.mod_out(c_t)  # (B, T, 1, D) x2
        x = self.out(modulate(self.norm_out(x), shift, scale))  # (B, T, N, p*p*C)
        v = unpatchify(x, p, (h, w))  # (B, T, C, h, w)
        if cache is not None:
            cache.fill(v, c_p, rope, cross_rope, records, self.attention_mode, self.cfg.cross_attention)
        return v

    def _forward_generated(self, z: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, cache: ReferenceCache,
                           self_cond: torch.Tensor | None = None):
        """A step after the first one of a window: the generated frames through every block, references cached."""
        cache.check(z, mask, self.attention_mode)
        t_frame = self._frame_times(z, t, mask)  # (B, T)
        rows, gen = cache.rows, cache.frames  # (B, 1), (B, Tg)
        p, (h, w) = self.cfg.patch_size, z.shape[-2:]
        x = self.embed(patchify(self._inputs(z, mask, self_cond)[rows, gen], p))  # (B, Tg, N, D)
        if self.cfg.abs_pos:
            x = x + self.position_features((z.shape[1], h // p, w // p), x)[gen]  # (B, Tg, N, D)
        c_t = self.t_embed(t_frame.gather(1, gen))[:, :, None]  # (B, Tg, 1, D)
        c_m = c_t + cache.c_p  # (B, Tg, 1, D)
        for block, layer in zip(self.blocks, cache.layers):
            x = block(x, c_t, c_m, None, None, cache.rope, cache.cross_rope_q, self.attention_mode,
                      cached=(layer, cache.tokens))  # (B, Tg, N, D)
        shift, scale = self.mod_out(c_t)  # (B, Tg, 1, D) x2
        x = self.out(modulate(self.norm_out(x), shift, scale))  # (B, Tg, N, p*p*C)
        v = cache.v.clone()  # (B, T, C, h, w): reference frames' output of the first step
        v[rows, gen] = unpatchify(x, p, (h, w)).to(v.dtype)  # (B, Tg, C, h, w) written in
        return v

    def position_features(self, grid: tuple[int, int, int], x: torch.Tensor) -> torch.Tensor:
        """``abs_pos`` features of a ``(T, h, w)`` token grid as ``(T, N, D)`` in x's dtype and device."""
        feats = position_features(grid, self.cfg.dim, x.device, x.dtype)  # (T*N, D)
        return feats.view(grid[0], grid[1] * grid[2], -1)  # (T, N, D)

    def cross_rope(self, frames: int, grid: tuple[int, int], plan_tokens: int, device: torch.device):
        """``(query tables, key tables)`` of the cross-attention, or None when ``cfg.cross_rope`` is off.

        Plan tokens of a frame form an ``(hp, wp)`` grid of the same aspect ratio as the generator's ``(h, w)``
        token grid; each is placed on it at the centre of the generator tokens it covers (``(i + 0.5) h / hp -
        0.5``, ``cfg.cross_rope_grid``), so every generator token is nearer to its own plan token than to any other
        and attention can pick it.
        ``frame`` mode: one frame's tables (time 0 for both sides); ``all``: every frame's, time included.
        """
        if not self.cfg.cross_rope:
            return None
        hp, wp = plan_grid(plan_tokens, grid)
        t = 1 if self.cfg.cross_attention == "frame" else frames
        keys = self.rope((t, hp, wp), device, scale_to=(t, *grid), align=self.cfg.cross_rope_grid)
        return self.rope((t, *grid), device), keys

    def _inputs(self, z: torch.Tensor, mask: torch.Tensor, self_cond: torch.Tensor | None) -> torch.Tensor:
        """What the patch embedding reads: ``z``, or ``[z, x0 estimate]`` on channels when self-conditioned."""
        if not self.cfg.self_cond:
            if self_cond is not None:
                raise ValueError("self_cond given to a generator built without self-conditioning (cfg.self_cond)")
            return z
        if self_cond is None:
            self_cond = torch.zeros_like(z)  # (B, T, C, h, w): no estimate yet
        elif self_cond.shape != z.shape:
            raise ValueError(f"self_cond must have the latents' shape {tuple(z.shape)}, got {tuple(self_cond.shape)}")
        estimate = torch.where(mask[:, :, None, None, None], self_cond.to(z.dtype), z)  # references: themselves
        return torch.cat([z, estimate], dim=2)  # (B, T, 2C, h, w)

    # -- checks ------------------------------------------------------------------------------------
    def _frame_times(self, z: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.cfg.in_channels
        if z.dim() != 5 or z.shape[2] != c:
            raise ValueError(
                f"generator expects latents (B, T, {c}, h, w), got {tuple(z.shape)}; "
                "set in_channels to the autoencoder's latent channels"
            )
        bt = tuple(z.shape[:2])
        if mask.dtype != torch.bool or tuple(mask.shape) != bt:
            raise ValueError(
                f"mask must be a (B, T) = {bt} bool tensor (True = generate), "
                f"got dtype={mask.dtype} shape={tuple(mask.shape)}"
            )
        t = torch.as_tensor(t, device=z.device)
        if t.dim() == 1 and t.shape[0] == bt[0]:
            t = t[:, None].expand(bt)  # (B, T)
        elif tuple(t.shape) != bt:
            raise ValueError(f"t must have shape (B,) = ({bt[0]},) or (B, T) = {bt}, got {tuple(t.shape)}")
        return torch.where(mask, t.float(), torch.zeros((), device=z.device))  # (B, T); references at t = 0

    def _check_plan(self, plan: torch.Tensor, b: int, frames: int) -> None:
        if plan.dim() != 4 or tuple(plan.shape[:2]) != (b, frames) or plan.shape[-1] != self.cfg.plan_dim:
            raise ValueError(
                f"plan must be (B, T, N_low, plan_dim) = ({b}, {frames}, N, {self.cfg.plan_dim}) or None, "
                f"got {tuple(plan.shape)}; plan_dim must equal the planner's dim"
            )

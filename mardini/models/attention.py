"""Attention kernels used by both networks: backend choice, mask-free identity attention, its dense oracle.

All functions take and return the torch SDPA layout ``(B, heads, L, head_dim)``.

Identity attention (PAPER.md §2.5, ARCHITECTURE.md decisions):

* a query of a **generated** frame (mask True) attends to **all** keys of the sequence;
* a query of a **reference** frame attends only within its scope:
  ``"frame"`` = the keys of its own frame, ``"token"`` = itself only (softmax over one element,
  so its output is exactly its own value).

Because reference queries never read generated keys, reference activations do not depend on the
generated frames, which is what allows a reference-frame K/V cache at sampling time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

SCOPES = ("token", "frame")
BACKENDS = ("auto", "flash", "sdpa")

# --------------------------------------------------------------------------------------------------
# Backend choice: flash-attn when importable and the inputs are CUDA fp16/bf16 on an Ampere or newer NVIDIA GPU,
# torch SDPA otherwise
# --------------------------------------------------------------------------------------------------


def _import_flash_attn():
    """flash-attn's ``flash_attn_func`` on an NVIDIA CUDA build of torch where it imports, else None. Not tried on
    ROCm builds (``torch.version.hip``; torch calls AMD GPUs ``cuda``): a CUDA-built flash-attn fails to load there,
    a ROCm-built one runs only on the GPUs it was built for, and torch's SDPA has its own flash kernels on ROCm."""
    if torch.version.cuda is None or torch.version.hip:
        return None
    try:  # optional, GPU machines only, installed by hand after torch (README, "Installing into your own environment")
        from flash_attn import flash_attn_func
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return flash_attn_func


_flash_attn_func = _import_flash_attn()

FLASH_MAX_HEAD_DIM = 256  # flash-attn 2 kernels exist for head dims up to 256
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 kernels exist for Ampere (sm80) and newer NVIDIA GPUs
CUDA_MAX_BATCH = 65535  # CUDA grids are at most 65535 blocks along y and z, where the kernels put the batch


def flash_attn_available() -> bool:
    """True when the flash-attn package could be imported."""
    return _flash_attn_func is not None


def select_backend(q: torch.Tensor, has_mask: bool = False, backend: str = "auto") -> str:
    """Name of the kernel :func:`attention` will run: ``"flash"`` or ``"sdpa"``.

    ``auto`` picks flash-attn only if it is importable (NVIDIA CUDA builds only: :func:`_import_flash_attn`), ``q`` is
    a CUDA fp16/bf16 tensor with a head dim flash-attn 2 takes (at most 256) on a GPU it has kernels for (Ampere and
    newer) and no attention mask is given (flash-attn takes none); ``flash`` forces it and raises if impossible.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS}")
    usable = (flash_attn_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not has_mask
              and q.shape[-1] <= FLASH_MAX_HEAD_DIM and _flash_runs_on(q.device))
    if backend == "flash" and not usable:
        raise RuntimeError(
            "backend='flash' needs the flash-attn package (with torch installed: pip install flash-attn "
            "--no-build-isolation; it builds against that torch, compiling where no prebuilt wheel matches), CUDA "
            "fp16/bf16 inputs on an NVIDIA GPU of compute capability 8.0 (Ampere) or newer (not a ROCm build of "
            f"torch), no attention mask and a head dim of at most {FLASH_MAX_HEAD_DIM}; got "
            f"flash_attn={flash_attn_available()}, device={q.device}, dtype={q.dtype}, mask={has_mask}, head dim "
            f"{q.shape[-1]}. Use backend='auto' to fall back to torch SDPA"
        )
    if backend == "sdpa":
        return "sdpa"
    return "flash" if usable else "sdpa"


def _flash_runs_on(device: torch.device) -> bool:
    """Whether flash-attn 2 has kernels for this CUDA GPU: compute capability 8.0 (Ampere) or newer. On a Volta or
    Turing GPU (V100, T4) it imports, then raises "FlashAttention only supports Ampere GPUs or newer" at the first
    call; torch SDPA runs there."""
    props = torch.cuda.get_device_properties(device)  # constant-folded under torch.compile
    return (props.major, props.minor) >= FLASH_MIN_CAPABILITY


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention. ``q (B, H, Lq, d)``, ``k, v (B, H, Lk, d)`` -> ``(B, H, Lq, d)``.

    Args:
        attn_mask: optional bool ``(B or 1, H or 1, Lq, Lk)``, True = may attend (SDPA only).
        backend: ``auto`` | ``flash`` | ``sdpa``, see :func:`select_backend`.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention expects q (B, H, Lq, d) and k, v (B, H, Lk, d); got q={tuple(q.shape)}, "
            f"k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    limit = _batch_limit(q)
    if limit is not None and q.shape[0] > limit:  # T attention: B x (positions of a frame) rows, x2 with guidance
        per_row = attn_mask is not None and attn_mask.shape[0] > 1
        return torch.cat([attention(q[i : i + limit], k[i : i + limit], v[i : i + limit],
                                    attn_mask[i : i + limit] if per_row else attn_mask, backend)
                          for i in range(0, q.shape[0], limit)])  # (B, H, Lq, d)
    if select_backend(q, attn_mask is not None, backend) == "flash":
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, Lq, H, d)
        return out.transpose(1, 2)  # (B, H, Lq, d)
    if _cpu_fp32_is_faster(q):
        with torch.autocast("cpu", enabled=False):  # autocast would cast q, k, v back to bf16 inside SDPA
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        return out if torch.is_autocast_enabled("cpu") else out.to(q.dtype)  # (B, H, Lq, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Lq, d)


def _batch_limit(q: torch.Tensor) -> int | None:
    """Rows one CUDA attention call may take (None: no limit): the kernels launch a grid with the batch on an axis
    of at most 65535 blocks (flash-attn 2; SDPA's flash and memory-efficient kernels in some torch versions)."""
    return CUDA_MAX_BATCH if q.is_cuda else None


# Below this head dim torch's CPU flash-attention kernel runs faster in fp32 than in bf16, casts included
# (`python -m bench.attention_dtype`); at 64 and above bf16 wins.
CPU_FP32_BELOW_HEAD_DIM = 64


def _cpu_fp32_is_faster(q: torch.Tensor) -> bool:
    """True for CPU attention that would run in bf16/fp16 (half inputs or CPU autocast) with a small head dim."""
    if q.device.type != "cpu" or q.shape[-1] >= CPU_FP32_BELOW_HEAD_DIM:
        return False
    return q.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")


# --------------------------------------------------------------------------------------------------
# Identity attention without an L x L mask
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityLayout:
    """Where the reference tokens of a ``ref (B, L)`` lie, held on the host: what the control flow of
    :func:`identity_attention` needs (branches, loop bounds, slices). A model computes it once per forward with
    :func:`identity_layout` and passes it to every layer, so the layers read nothing back from the device (each
    read is a host sync that stalls the GPU's launch queue).

    shape: ``(B, L)``. n_max, n_min: the most and fewest generated tokens of a row. shared: every row holds the
    same mask. gen_runs, ref_runs: ``[start, stop)`` of the runs of generated and of reference tokens of row 0.
    """

    shape: tuple[int, int]
    n_max: int
    n_min: int
    shared: bool
    gen_runs: tuple[tuple[int, int], ...]
    ref_runs: tuple[tuple[int, int], ...]


def identity_layout(ref: torch.Tensor, tokens_per_frame: int = 1, row_repeat: int = 1) -> IdentityLayout:
    """The :class:`IdentityLayout` of ``ref.repeat_interleave(tokens_per_frame, 1).repeat_interleave(row_repeat, 0)``
    for a ``(B, F)`` bool ``ref`` (True = reference), read from the device in one copy: the models pass their
    ``~mask (B, T)`` with the tokens of a frame (``/ST`` layout, the planner) or the rows of a clip (``/T``)."""
    if ref.dtype != torch.bool or ref.dim() != 2 or ref.shape[0] == 0:
        raise ValueError(f"ref must be a non-empty (B, F) bool tensor, got dtype={ref.dtype} shape={tuple(ref.shape)}")
    rows = ref.tolist()  # B lists of F bools: the one device -> host copy
    first = rows[0]
    n_gen = [row.count(False) * tokens_per_frame for row in rows]
    runs = {True: [], False: []}
    pos = 0
    for value, group in itertools.groupby(first):  # runs of row 0, in tokens
        size = sum(1 for _ in group)
        runs[value].append((pos * tokens_per_frame, (pos + size) * tokens_per_frame))
        pos += size
    return IdentityLayout((len(rows) * row_repeat, len(first) * tokens_per_frame), max(n_gen), min(n_gen),
                          all(row == first for row in rows), tuple(runs[False]), tuple(runs[True]))


def _check_identity_inputs(q, k, v, ref, scope, tokens_per_frame) -> int:
    if scope not in SCOPES:
        raise ValueError(f"identity attention scope must be one of {SCOPES}, got {scope!r}")
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"identity attention is self-attention: q, k, v must share one (B, H, L, d) shape; got "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    b, _, length, _ = q.shape
    if ref.dtype != torch.bool or tuple(ref.shape) != (b, length):
        raise ValueError(
            f"ref must be a (B, L) = ({b}, {length}) bool tensor, True = token of a reference frame; "
            f"got dtype={ref.dtype} shape={tuple(ref.shape)}"
        )
    if scope == "token":
        return 1
    if tokens_per_frame is None or tokens_per_frame < 1 or length % tokens_per_frame:
        raise ValueError(
            f"scope='frame' needs tokens_per_frame dividing the sequence length {length} "
            f"(frames laid out contiguously), got {tokens_per_frame}"
        )
    return tokens_per_frame


def identity_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref: torch.Tensor,
    scope: str = "token",
    tokens_per_frame: int | None = None,
    backend: str = "auto",
    check_frames: bool = True,
    layout: IdentityLayout | None = None,
) -> torch.Tensor:
    """Identity attention computed without any ``L x L`` mask. Returns ``(B, H, L, d)``.

    Args:
        q, k, v: ``(B, H, L, d)`` self-attention inputs (RoPE already applied).
        ref: ``(B, L)`` bool, True = the token belongs to a reference (given) frame; rows may differ.
        scope: ``"token"`` (a reference query sees only itself) or ``"frame"`` (its own frame).
        tokens_per_frame: N, tokens of one frame (frames contiguous, ``L = T * N``); needed for ``"frame"``.
        backend: kernel for the dense parts, see :func:`attention`.
        check_frames: for ``"frame"``, verify that ``ref`` is constant within each frame.
        layout: ``identity_layout(ref)``'s host-side summary of ``ref``, computed once per forward by a model whose
            layers share one mask; None computes it here (one device -> host copy of ``ref``).

    How: reference queries with scope ``"token"`` return their own value; with scope ``"frame"`` only
    reference frames are gathered into a ``(frames, H, N, d)`` batch of per-frame attentions. Generated
    queries attend to all keys. When every row shares one mask (sampling, evaluation), the generated
    queries are contiguous slices (views, no copy) sent through the kernel in chunks of at most
    ``max(QUERY_CHUNK_MIN, L * QUERY_CHUNK_FRACTION)`` tokens and written into one preallocated output:
    the peak beyond the output is one chunk. When rows differ (training batches), generated queries are
    gathered per row (padded to the row maximum), attend in one kernel call and are scattered into the
    reference result. No mask is ever built.
    """
    n = _check_identity_inputs(q, k, v, ref, scope, tokens_per_frame)
    b, h, length, d = q.shape
    if layout is None:
        layout = identity_layout(ref)
    elif layout.shape != (b, length):
        raise ValueError(f"layout describes a ref of shape {layout.shape}, got {(b, length)}; "
                         "pass identity_layout(ref) of this ref")
    n_max = layout.n_max
    if layout.n_min == length:  # no reference token anywhere: plain attention
        return attention(q, k, v, backend=backend)  # (B, H, L, d)

    shared = layout.shared  # one mask for every row: sampling, evaluation, benchmarks
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if shared else None  # (B, H, L, d), filled in place

    # -- reference queries -------------------------------------------------------------------------
    if scope == "token":
        out_ref = v if out is None else out.copy_(v)  # (B, H, L, d): softmax over a single key is exactly 1
    else:
        ref_frames = rearrange(ref, "b (f n) -> b f n", n=n)  # (B, F, N)
        if check_frames and bool((ref_frames.any(-1) != ref_frames.all(-1)).any()):
            raise ValueError("ref must be constant within each frame for scope='frame' (masks are per frame)")
        ref_frames = ref_frames[..., 0]  # (B, F)
    if scope == "frame" and shared:  # each reference frame attends within itself: slices, no gathered copies
        for start, stop in _chunks(layout.ref_runs, n):  # runs start on frame boundaries: one chunk = one frame
            sl = slice(start, stop)
            out[:, :, sl] = attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], backend=backend)  # (B, H, N, d)
        out_ref = out
    elif scope == "frame":
        qf, kf, vf = (rearrange(x, "b h (f n) d -> b f h n d", n=n)[ref_frames] for x in (q, k, v))  # (R, H, N, d)
        of = attention(qf, kf, vf, backend=backend)  # (R, H, N, d)
        out_ref = q.new_zeros(b, h, length // n, n, d)  # (B, H, F, N, d); generated frames stay 0 here
        out_ref.transpose(1, 2)[ref_frames] = of.to(q.dtype)  # write through a (B, F, H, N, d) view
        out_ref = out_ref.view(b, h, length, d)  # (B, H, L, d), no copy
    if n_max == 0:  # every query is a reference one
        return out_ref

    # -- generated queries: all keys ---------------------------------------------------------------
    if shared:  # query slices are views: no gathered copy, no scattered result; peak = one chunk's output
        for start, stop in _chunks(layout.gen_runs, _query_chunk(length)):
            out[:, :, start:stop] = attention(q[:, :, start:stop], k, v, backend=backend)  # (B, H, chunk, d)
        return out
    idx = torch.argsort(ref.to(torch.uint8), dim=1, stable=True)[:, :n_max]  # (B, n_max) generated first
    idx = idx[:, None, :, None].expand(b, h, n_max, d)  # (B, H, n_max, d)
    og = attention(q.gather(2, idx), k, v, backend=backend).to(out_ref.dtype)  # (B, H, n_max, d)
    if layout.n_min < n_max:  # padding slots point at reference tokens: write their own result back
        n_gen = (~ref).sum(dim=1)  # (B,) generated tokens per row
        valid = torch.arange(n_max, device=q.device)[None, :] < n_gen[:, None]  # (B, n_max); False = padding
        og = torch.where(valid[:, None, :, None], og, out_ref.gather(2, idx))  # (B, H, n_max, d)
    return out_ref.scatter(2, idx, og)  # (B, H, L, d)


# Generated queries of a shared mask go through the kernel in chunks of at most this fraction of the sequence
# (and at least QUERY_CHUNK_MIN tokens): the only temporary is one chunk's output.
QUERY_CHUNK_FRACTION = 1 / 8
QUERY_CHUNK_MIN = 512


def _query_chunk(length: int) -> int:
    return max(QUERY_CHUNK_MIN, int(length * QUERY_CHUNK_FRACTION))


def _chunks(runs: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The runs cut into pieces of at most ``size`` tokens."""
    return [(s, min(s + size, stop)) for start, stop in runs for s in range(start, stop, size)]


# --------------------------------------------------------------------------------------------------
# Dense-mask version: a TEST ORACLE and benchmark baseline only, never used by the models
# --------------------------------------------------------------------------------------------------


def identity_mask_dense(ref: torch.Tensor, scope: str = "token", tokens_per_frame: int | None = None) -> torch.Tensor:
    """The ``(B, 1, L, L)`` bool mask of identity attention (True = may attend). Oracle only."""
    _, length = ref.shape
    pos = torch.arange(length, device=ref.device)  # (L,)
    group = pos if scope == "token" else pos // tokens_per_frame  # (L,)
    same = group[:, None] == group[None, :]  # (L, L)
    allow = (~ref)[:, :, None] | same[None]  # (B, L, L)
    return allow[:, None]  # (B, 1, L, L)


def dense_identity_attention_oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref: torch.Tensor,
    scope: str = "token",
    tokens_per_frame: int | None = None,
) -> torch.Tensor:
    """Identity attention through an explicit ``L x L`` mask and SDPA. Test oracle / benchmark baseline."""
    _check_identity_inputs(q, k, v, ref, scope, tokens_per_frame)
    mask = identity_mask_dense(ref, scope, tokens_per_frame)  # (B, 1, L, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, d)

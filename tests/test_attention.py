"""Identity attention (mask-free) against the dense-mask oracle, and the attention backend choice."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mardini.models import attention as A


def _qkv(b, h, length, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3)]


def _frame_ref(frame_ref: list[list[bool]], n: int) -> torch.Tensor:
    """Per-frame reference flags ``(B, T)`` -> token flags ``(B, T*n)``."""
    return torch.tensor(frame_ref).repeat_interleave(n, dim=1)  # (B, L)


# Mixed rows: a few references, one reference, no reference at all, references only.
MIXED = [[True, False, False, True], [False, True, False, False], [False, False, False, False], [True] * 4]


# --------------------------------------------------------------------------------------------------
# Mask-free identity attention == dense-mask oracle
# --------------------------------------------------------------------------------------------------


# A shared mask with three runs of generated frames, cut into chunks of 3 tokens (runs of 5 and 10 tokens).
SHARED_RUNS = [[False, True, False, False, True, False, True]] * 2


@pytest.mark.parametrize("scope", ["token", "frame"])
@pytest.mark.parametrize(
    "rows, chunk", [(MIXED, None), ([MIXED[0]] * 3, None), (SHARED_RUNS, 3)],
    ids=["mixed_rows", "shared_mask", "shared_mask_chunked"],
)
def test_identity_attention_matches_dense_oracle_values_and_grads(scope, rows, chunk, monkeypatch):
    n = 5
    if chunk is not None:  # the shared-mask path: query slices in chunks written into one output
        monkeypatch.setattr(A, "QUERY_CHUNK_MIN", chunk)
        monkeypatch.setattr(A, "QUERY_CHUNK_FRACTION", 0.0)
        assert A._chunks(A.identity_layout(_frame_ref(rows, n)).gen_runs, A._query_chunk(len(rows[0]) * n)) == [
            (0, 3), (3, 5), (10, 13), (13, 16), (16, 19), (19, 20), (25, 28), (28, 30)]
    ref = _frame_ref(rows, n)  # (B, L)
    q, k, v = _qkv(len(rows), 2, ref.shape[1], 8, seed=0)
    out = A.identity_attention(q, k, v, ref, scope, tokens_per_frame=n)  # (B, H, L, d)
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    oracle = A.dense_identity_attention_oracle(q2, k2, v2, ref, scope, tokens_per_frame=n)
    torch.testing.assert_close(out, oracle, rtol=1e-10, atol=1e-10)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * w).sum().backward()
    (oracle * w).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


def test_identity_rule_token_scope_returns_own_value_and_generated_see_all():
    ref = _frame_ref([[True, False, True]], 4)  # (1, 12)
    q, k, v = _qkv(1, 3, 12, 6, seed=2)
    out = A.identity_attention(q, k, v, ref, "token")
    torch.testing.assert_close(out[:, :, ref[0]], v[:, :, ref[0]])  # reference rows: exactly their value
    plain = F.scaled_dot_product_attention(q, k, v)  # generated rows: unmasked attention over all keys
    torch.testing.assert_close(out[:, :, ~ref[0]], plain[:, :, ~ref[0]])


def test_reference_outputs_ignore_generated_tokens():
    n = 3
    ref = _frame_ref([[True, False, True, False]], n)  # (1, 12)
    q, k, v = (x.detach() for x in _qkv(1, 2, 12, 4, seed=3))
    base = A.identity_attention(q, k, v, ref, "frame", n)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, ~ref[0]] += 5.0
    v2[:, :, ~ref[0]] -= 3.0
    moved = A.identity_attention(q, k2, v2, ref, "frame", n)
    torch.testing.assert_close(moved[:, :, ref[0]], base[:, :, ref[0]])
    assert not torch.allclose(moved[:, :, ~ref[0]], base[:, :, ~ref[0]])


def test_identity_attention_never_builds_a_mask(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    ref = _frame_ref(MIXED, 2)
    q, k, v = _qkv(4, 1, ref.shape[1], 4, seed=4)
    for scope in ("token", "frame"):
        A.identity_attention(q, k, v, ref, scope, tokens_per_frame=2)
    assert seen and all(m is None for m in seen)


def test_identity_attention_bf16_close_to_fp32_oracle():
    ref = _frame_ref(MIXED, 4)
    q, k, v = (x.detach().float() for x in _qkv(4, 2, ref.shape[1], 16, seed=5))
    out = A.identity_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), ref, "frame", 4)
    assert out.dtype == torch.bfloat16
    oracle = A.dense_identity_attention_oracle(q, k, v, ref, "frame", 4)
    torch.testing.assert_close(out.float(), oracle, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scope": "row"}, "scope must be one of"),
        ({"scope": "frame", "tokens_per_frame": 7}, "tokens_per_frame dividing"),
        ({"scope": "frame", "tokens_per_frame": None}, "tokens_per_frame dividing"),
        ({"ref": torch.zeros(2, 12, dtype=torch.long)}, "bool tensor"),
        ({"ref": torch.zeros(2, 11, dtype=torch.bool)}, "bool tensor"),
        (
            {"ref": torch.tensor([[True] + [False] * 11] * 2), "scope": "frame", "tokens_per_frame": 4},
            "constant within",
        ),
    ],
)
def test_identity_attention_bad_inputs(kwargs, message):
    q, k, v = _qkv(2, 1, 12, 4, seed=6)
    args = {"ref": torch.zeros(2, 12, dtype=torch.bool), "scope": "token", "tokens_per_frame": None} | kwargs
    with pytest.raises(ValueError, match=message):
        A.identity_attention(q, k, v, **args)
    with pytest.raises(ValueError, match="share one"):
        A.identity_attention(q, k[:, :, :6], v, torch.zeros(2, 12, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# Backend choice: flash-attn only for CUDA half precision, SDPA otherwise
# --------------------------------------------------------------------------------------------------


class _FakeCudaHalf:
    """Stands in for a CUDA bf16 tensor in ``select_backend`` (no GPU here)."""

    is_cuda = True
    dtype = torch.bfloat16
    device = "cuda:0"
    shape = (1, 1, 1, 128)  # (B, H, L, head_dim)


def test_forcing_flash_without_it_says_how_to_install_it(monkeypatch):
    """The message said ``pip install '.[gpu]'``, which fails: flash-attn's build imports torch, absent in pip's
    isolated build environment."""
    monkeypatch.setattr(A, "_flash_attn_func", None)
    with pytest.raises(RuntimeError, match=r"with torch installed: pip install flash-attn --no-build-isolation;"):
        A.select_backend(_FakeCudaHalf(), backend="flash")


def _fake_gpu(monkeypatch, major: int, minor: int = 0) -> None:
    """torch.cuda.get_device_properties as it answers for a GPU of compute capability ``major.minor``."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(major=major, minor=minor))


def test_select_backend_rules(monkeypatch):
    cpu = torch.zeros(1, 1, 1, 8)
    _fake_gpu(monkeypatch, 9)  # an H100
    monkeypatch.setattr(A, "_flash_attn_func", None)
    assert A.select_backend(_FakeCudaHalf()) == "sdpa"  # not importable -> fallback
    with pytest.raises(RuntimeError, match="flash-attn package"):
        A.select_backend(cpu, backend="flash")
    monkeypatch.setattr(A, "_flash_attn_func", lambda q, k, v: q)
    assert A.flash_attn_available()
    assert A.select_backend(_FakeCudaHalf()) == "flash"
    assert A.select_backend(_FakeCudaHalf(), has_mask=True) == "sdpa"  # flash-attn takes no mask
    assert A.select_backend(_FakeCudaHalf(), backend="sdpa") == "sdpa"
    assert A.select_backend(cpu) == "sdpa"  # CPU fp32
    assert A.select_backend(cpu.bfloat16()) == "sdpa"  # CPU half
    wide = _FakeCudaHalf()
    wide.shape = (1, 1, 1, 512)
    assert A.select_backend(wide) == "sdpa"  # flash-attn 2 has no kernel for head dims above 256
    with pytest.raises(RuntimeError, match="head dim of at most 256.*head dim 512"):
        A.select_backend(wide, backend="flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.select_backend(cpu, backend="xformers")


@pytest.mark.parametrize("major, minor, picked", [(7, 0, "sdpa"), (7, 5, "sdpa"), (8, 0, "flash"), (8, 6, "flash"),
                                                  (9, 0, "flash")], ids=["V100", "T4", "A100", "RTX3090", "H100"])
def test_flash_attn_is_picked_only_on_gpus_it_has_kernels_for(monkeypatch, major, minor, picked):
    """flash-attn 2 imports on a Volta or Turing GPU, then raised "FlashAttention only supports Ampere GPUs or newer"
    at the first bf16/fp16 attention call, which ``auto`` sent it; SDPA runs there now, and ``flash`` says why."""
    _fake_gpu(monkeypatch, major, minor)
    monkeypatch.setattr(A, "_flash_attn_func", lambda q, k, v: q)
    assert A.select_backend(_FakeCudaHalf()) == picked
    if picked == "sdpa":
        with pytest.raises(RuntimeError, match=r"compute capability 8\.0 \(Ampere\) or newer"):
            A.select_backend(_FakeCudaHalf(), backend="flash")


@pytest.mark.parametrize("hip, cuda, imported", [(None, "12.4", True), ("6.2.41133", None, False), (None, None, False)],
                         ids=["cuda-build", "rocm-build", "cpu-build"])
def test_flash_attn_is_imported_on_nvidia_cuda_builds_only(monkeypatch, hip, cuda, imported):
    """Torch calls AMD GPUs ``cuda``, so on a ROCm build with a flash-attn installed ``auto`` sent bf16 attention to
    it, built for other GPUs (a ROCm build runs only on the MI200/MI300 it was compiled for). It is not imported on
    ROCm (nor CPU) builds now; SDPA, with its own flash kernels there, runs."""
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_func = lambda q, k, v: q
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    assert (A._import_flash_attn() is fake.flash_attn_func) == imported


def test_cpu_attention_never_calls_flash_even_when_importable(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("flash-attn must not run on CPU tensors")

    monkeypatch.setattr(A, "_flash_attn_func", boom)
    q, k, v = (x.detach() for x in _qkv(2, 2, 6, 4, seed=7, dtype=torch.bfloat16))
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)  # small heads: fp32
    torch.testing.assert_close(A.attention(q, k, v), expected)


def test_flash_path_layout(monkeypatch):
    """The flash branch hands flash-attn (B, L, H, d) tensors and returns (B, H, L, d)."""

    def fake_flash(q, k, v):  # flash-attn layout in and out
        assert q.shape[1] == 7 and q.shape[2] == 3  # (B, L, H, d)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2)

    monkeypatch.setattr(A, "_flash_attn_func", fake_flash)
    monkeypatch.setattr(A, "select_backend", lambda q, has_mask=False, backend="auto": "flash")
    q, k, v = (x.detach() for x in _qkv(2, 3, 7, 4, seed=8))
    torch.testing.assert_close(A.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("head_dim, fp32", [(24, True), (A.CPU_FP32_BELOW_HEAD_DIM, False)])
def test_cpu_autocast_runs_small_heads_in_fp32(monkeypatch, head_dim, fp32):
    """Under CPU bf16 autocast, heads below the threshold reach the kernel as fp32 with autocast off."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(2, 2, 16, head_dim, seed=0, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = A.attention(q, k, v)
    assert seen == [(torch.float32, False)] if fp32 else seen == [(torch.float32, True)]
    assert out.dtype == (torch.float32 if fp32 else torch.bfloat16)
    expected = real(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=1e-6 if fp32 else 2e-2)


@pytest.mark.parametrize("rows", [[[True, True, False, True, True, True, False]] * 2, [[True, True, True, False]]],
                         ids=["shared_adjacent_refs", "single_row_prefix"])
def test_frame_scope_keeps_adjacent_reference_frames_apart(rows):
    """Shared-mask fast path with neighbouring reference frames (an expansion prefix): each reference frame still
    attends within itself only, as the oracle (and the per-row training path) do."""
    n = 4
    ref = _frame_ref(rows, n)  # (B, L)
    q, k, v = (x.detach() for x in _qkv(len(rows), 2, ref.shape[1], 8, seed=5))
    out = A.identity_attention(q, k, v, ref, "frame", tokens_per_frame=n)
    oracle = A.dense_identity_attention_oracle(q, k, v, ref, "frame", tokens_per_frame=n)
    torch.testing.assert_close(out, oracle, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask_rows", [0, 1, 7])
def test_a_batch_over_the_cuda_grid_limit_runs_in_chunks_with_the_same_result(monkeypatch, mask_rows):
    """Temporal attention runs B x (positions of a frame) rows, over CUDA's 65535 grid blocks at 1024 px: chunks."""
    q, k, v = (x.detach() for x in _qkv(7, 2, 5, 8, seed=11))  # (7, 2, 5, 8)
    mask = None if not mask_rows else torch.rand(mask_rows, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    if mask is not None:
        mask[..., 0] = True  # every query sees one key at least
    whole = A.attention(q, k, v, attn_mask=mask)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(A, "_batch_limit", lambda q: 3)
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda q, *a, **kw: calls.append(q.shape[0]) or sdpa(q, *a, **kw))
    torch.testing.assert_close(A.attention(q, k, v, attn_mask=mask), whole)
    assert calls == [3, 3, 1]

"""Host syncs on the hot path: a forward reads its mask back from the device once at most, not in every layer, and
time checks read nothing back from a device tensor. Counted as the aten ops that read a tensor's values on the host
(on a GPU each stalls the launch queue until the device catches up); the count is the same on CPU."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mardini.diffusion.checks import check_t
from mardini.diffusion.ddim import DDIMSampler
from mardini.diffusion.guidance import guided_denoise_fn
from mardini.diffusion.schedule import CosineSchedule
from mardini.models import attention as A
from mardini.models import build_generator, build_planner

SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "_unique2"}
ROWS = torch.tensor([[False, True, True, False], [True, False, True, True]])  # (B, T): rows differ (training)
SHARED = torch.tensor([[False, True, True, True]] * 2)  # (B, T): one mask for every row (sampling)


class SyncCounter(TorchDispatchMode):
    """Counts the ops of ``SYNC_OPS`` run inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.ops.values())


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return build_generator("tiny", depth=4)  # more layers than the default, so a sync per layer would show


@pytest.mark.parametrize("mode", ["st", "t"])
@pytest.mark.parametrize("mask", [ROWS, SHARED], ids=["rows_differ", "shared"])
def test_a_generator_training_forward_reads_the_mask_back_once_at_most(generator, mode, mask):
    generator.set_attention(mode)
    z, plan = torch.randn(2, 4, 12, 4, 4), torch.randn(2, 4, 4, 128)  # (B, T, C, h, w), (B, T, M, P)
    with SyncCounter() as counter:
        generator(z, torch.rand(2), plan, mask)  # with autograd on, as in training
    assert counter.count <= 1, counter.ops  # before: 3 or 4 per layer (n_max, shared, padding, runs)


def test_a_planner_forward_reads_the_mask_back_once_at_most():
    torch.manual_seed(0)
    planner = build_planner("tiny", in_channels=12, depth=4)
    with SyncCounter() as counter:
        planner(torch.randn(2, 4, 12, 4, 4), ROWS)
    assert counter.count <= 1, counter.ops


def test_a_guided_ddim_step_syncs_at_most_twice(generator):
    """One network call (its mask read back once) and the guidance's check of a CPU ``t``, which on a GPU is
    ``torch._assert_async`` (no sync); the sampler checks its Python float times on the host."""
    generator.set_attention("st")
    z, plan = torch.randn(2, 4, 12, 4, 4), torch.randn(2, 4, 4, 128)  # (B, T, C, h, w), (B, T, M, P)
    fn = guided_denoise_fn(generator, plan, SHARED, scale=2.5)
    with torch.no_grad(), SyncCounter() as counter:
        DDIMSampler(CosineSchedule(), steps=4).step(fn, z, 1.0, 0.75, SHARED, z)
    assert counter.count <= 2, counter.ops  # before: 4 time checks + 4 per layer


def test_time_checks_of_a_device_tensor_read_nothing_back():
    """A meta tensor stands in for a GPU one: its range goes to ``torch._assert_async``, not to the host."""
    schedule = CosineSchedule()
    z = torch.empty(2, 4, 12, 8, 8, device="meta")  # (B, T, C, h, w)
    t = torch.empty(2, device="meta")  # (B,)
    with SyncCounter() as counter:
        check_t(t, 2)
        schedule.q_sample(z, z, t, torch.ones(2, 4, dtype=torch.bool, device="meta"))
        schedule.v_target(z, z, t)
        schedule.predict_x0_eps(z, z, t)
    assert counter.count == 0, counter.ops


def test_time_checks_still_refuse_times_outside_0_1():
    with pytest.raises(ValueError, match=r"^t must lie in \[0, 1\] \(0 = clean, 1 = pure noise\), got min"):
        check_t(torch.tensor([0.5, 1.5]))
    z, mask = torch.zeros(1, 2, 3, 4, 4), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^t must lie in \[0, 1\]"):
        DDIMSampler(steps=2).step(lambda z_t, t: z_t, z, 1.5, 0.5, mask, z)
    with pytest.raises(ValueError, match=r"^s must lie in \[0, 1\]"):
        DDIMSampler(steps=2).step(lambda z_t, t: z_t, z, 0.5, -0.25, mask, z)


@pytest.mark.parametrize("scope", ["token", "frame"])
@pytest.mark.parametrize("frames", [ROWS, SHARED, torch.zeros(2, 4, dtype=torch.bool)], ids=["rows", "shared", "all"])
def test_a_layout_from_the_frame_mask_gives_the_result_of_the_token_mask(scope, frames):
    n = 3
    ref = (~frames).repeat_interleave(n, dim=1)  # (B, L)
    q, k, v = (torch.randn(2, 2, ref.shape[1], 8, dtype=torch.float64) for _ in range(3))  # (B, H, L, d)
    layout = A.identity_layout(~frames, tokens_per_frame=n)
    assert layout == A.identity_layout(ref)
    assert torch.equal(A.identity_attention(q, k, v, ref, scope, n, layout=layout),
                       A.identity_attention(q, k, v, ref, scope, n))
    with pytest.raises(ValueError, match=r"layout describes a ref of shape \(2, 4\), got \(2, 12\); pass identity_lay"):
        A.identity_attention(q, k, v, ref, scope, n, layout=A.identity_layout(~frames))


def test_the_t_layout_repeats_rows():
    ref = (~ROWS).repeat_interleave(5, dim=0)  # (B*N, T): the /T rows
    assert A.identity_layout(~ROWS, row_repeat=5) == A.identity_layout(ref)

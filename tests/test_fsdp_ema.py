"""The EMA under FSDP (full shard, gloo on CPU): equal to the unsharded EMA, swapped in and out, saved and restored.

The tiny joint module is wrapped as Lightning's FSDPStrategy wraps it (``fsdp_helpers``). The forward goes through
the wrapper as Lightning routes ``training_step`` (``_ForwardRedirection``).
"""

from __future__ import annotations

import pytest
import torch
from fsdp_helpers import dist_world, full_state_dict_context, spawn_or_fail, tiny_module, wrap

STEPS = 3
# Plain SGD, not AdamW: FSDP's flat-parameter views need not round as the unsharded tensors do in the last bit (MKL
# is not bit-reproducible across data alignment), and AdamW's first steps (~lr * sign(g)) blow such a difference in
# a near-zero gradient up past any tolerance (1e-7 relative noise in the weights left 7 of 105 tensors off by up to
# 9e-6 after three AdamW steps; after SGD, none). SGD at lr 1 moves every tensor; the EMA arithmetic is the same.
LR = 1.0


def _batch(step: int) -> tuple[dict, torch.Generator]:
    g = torch.Generator().manual_seed(100 + step)
    video = torch.rand(2, 4, 3, 32, 32, generator=g) * 2 - 1  # (B, T, 3, H, W)
    return {"video": video}, torch.Generator().manual_seed(step)


def _train(module, wrapper, steps: int = STEPS) -> None:
    """SGD steps on fixed batches (the same on every rank, so FSDP's averaged gradient is the unsharded one),
    each followed by the EMA update as ``optimizer_step`` runs it."""
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    opt = torch.optim.SGD(module.networks.parameters(), lr=LR)
    for step in range(steps):
        batch, gen = _batch(step)
        loss = _ForwardRedirection()(wrapper, module, "compute_loss", batch, gen, True).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.step = step + 1
        module.update_ema()


def _eval_loss(module, wrapper) -> torch.Tensor:
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    batch, gen = _batch(99)
    with torch.no_grad():
        return _ForwardRedirection()(wrapper, module, "compute_loss", batch, gen, False)  # (B,)


def _worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    from mardini.lit.fsdp import root_unsharded

    # a file rendezvous, not a TCP port: no race with other processes picking a free port at the same time
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        module = tiny_module()
        wrapper = wrap(module, world)
        groups = [len(g) for g in module.weight_decay_groups()]  # (decayed, not decayed) as the optimiser sees them
        _train(module, wrapper)
        got = {"trained": _full(wrapper), "groups": groups}
        with module.ema_weights():
            got["inside"] = _full(wrapper)
            got["ema_loss"] = _eval_loss(module, wrapper)  # (B,) through the root's forward, as validation runs
            with root_unsharded(wrapper, writeback=False):  # outside the root's forward, as SampleGrids samples
                got["ema_loss_outside"] = _eval_loss(module, module)  # (B,)
            ckpt = {"state_dict": _full(wrapper)}  # a checkpoint saved meanwhile stores the raw weights
            module.on_save_checkpoint(ckpt)
            got["saved_inside"] = ckpt["state_dict"]
        got["after"] = _full(wrapper)
        fresh = tiny_module()  # restore: a new wrapped module loads the full state dict on every rank (Lightning's way)
        fresh_wrapper = wrap(fresh, world)
        with full_state_dict_context(fresh_wrapper):
            fresh_wrapper.load_state_dict(got["trained"])
        got["restored"] = _full(fresh_wrapper)
        with fresh.ema_weights():
            got["restored_ema_loss"] = _eval_loss(fresh, fresh_wrapper)  # (B,)
        got["stops"] = _nonfinite_on_one_rank(module, wrapper, rank)
        torch.save(got, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _full(wrapper) -> dict[str, torch.Tensor]:
    """The gathered state dict, as a "full" checkpoint holds it (a collective: every rank calls it)."""
    with full_state_dict_context(wrapper):
        return {k: v.clone() for k, v in wrapper.state_dict().items()}


def _nonfinite_on_one_rank(module, wrapper, rank: int) -> bool:
    """A gradient that is infinite in the last rank's shard only: does this rank stop (nonfinite=stop)?"""
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    batch, gen = _batch(0)
    _ForwardRedirection()(wrapper, module, "compute_loss", batch, gen, True).mean().backward()
    if rank == dist_world() - 1:
        grads = [p.grad for p in module.networks.parameters() if p.grad is not None and p.grad.numel()]
        grads[-1].fill_(float("inf"))
    module.log = lambda *args, **kwargs: None  # no Trainer to log to
    try:
        module.on_before_optimizer_step(None)
    except FloatingPointError:
        return True
    return False


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    bad = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6)}
    worst = sorted(bad.items(), key=lambda kv: -kv[1])[:3]
    assert not bad, f"{what}: {len(bad)} of {len(a)} tensors differ, the most (max abs difference): {worst}"


@pytest.mark.parametrize("world", [2, 1])
def test_fsdp_ema_matches_unsharded_and_swaps_and_restores(tmp_path, world):
    out = tmp_path / "rank"
    spawn_or_fail(_worker, (world, str(tmp_path / "rendezvous"), str(out)), world, timeout=600)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
    got = ranks[0]

    ref = tiny_module()  # the same steps unsharded, in this process (timm's own EMA update)
    _train(ref, ref)
    ema = _split(ref.state_dict(), "ema.module.")
    assert not all(torch.equal(ema[k], v) for k, v in _split(ref.state_dict(), "networks.").items())  # a real EMA
    _assert_close(_split(got["trained"], "networks."), _split(ref.state_dict(), "networks."), "live weights")
    _assert_close(_split(got["trained"], "ema.module."), ema, "EMA weights")
    # swapped in: the networks hold the EMA weights, the EMA is untouched; swapped out: the live weights are back
    _assert_close(_split(got["inside"], "networks."), ema, "networks inside ema_weights()")
    _assert_close(_split(got["inside"], "ema.module."), ema, "EMA inside ema_weights()")
    for k, v in got["trained"].items():
        assert torch.equal(got["after"][k], v), f"{k} changed by the swap in and out"
        assert torch.equal(got["saved_inside"][k], v), f"{k}: a checkpoint saved inside ema_weights() is not raw"
    with ref.ema_weights():
        ref_loss = _eval_loss(ref, ref)
    assert torch.allclose(got["ema_loss"], ref_loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got["ema_loss_outside"], ref_loss, rtol=1e-5, atol=1e-6)
    # a full state dict round-trips: loaded into a freshly wrapped module, its EMA is the saved one and swaps in
    for k, v in got["trained"].items():
        assert torch.equal(got["restored"][k], v), f"{k} did not round-trip"
    assert torch.allclose(got["restored_ema_loss"], ref_loss, rtol=1e-5, atol=1e-6)
    # weight decay goes to the same parameters as unsharded (the matrices), though FSDP shows them as 1-D views
    decay, no_decay = ref.weight_decay_groups()
    assert decay and all(p.ndim >= 2 for p in decay) and all(p.ndim < 2 for p in no_decay)
    assert [r["groups"] for r in ranks] == [[len(decay), len(no_decay)]] * world
    # a gradient infinite in one rank's shard stops every rank (the norm is all-reduced), not that rank alone
    assert [r["stops"] for r in ranks] == [True] * world

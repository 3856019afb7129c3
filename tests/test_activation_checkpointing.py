"""Activation checkpointing of both networks changes no training result: a joint module's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from mardini.lit import MarDiniModule


def _loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One fp32 training loss of a tiny joint module (plan dropout, the warm-up head's loss on) and its gradients."""
    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", planner_resolution=8, plan_dropout=0.5, plan_recon_weight=1.0,
                           planner={"depth": 2, "checkpointing": checkpointing},
                           generator={"depth": 2, "checkpointing": checkpointing})
    with torch.no_grad():  # off adaLN-Zero's identity start, whose zero gates leave most block gradients 0
        for p in module.networks.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    video = torch.rand(4, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, T, 3, H, W)
    loss = module.compute_loss({"video": video}, module.step_generator(0), True).mean()  # (B,) -> ()
    loss.backward()
    return loss.detach(), [p.grad for p in module.networks.parameters() if p.requires_grad]


def test_checkpointing_both_networks_gives_the_same_loss_and_gradients_bit_for_bit():
    plain_loss, plain_grads = _loss_and_grads(False)
    ckpt_loss, ckpt_grads = _loss_and_grads(True)
    assert torch.equal(plain_loss, ckpt_loss)
    assert len(plain_grads) == len(ckpt_grads) and all(g is not None for g in plain_grads)
    assert sum(bool(g.any()) for g in plain_grads) > 0.9 * len(plain_grads)  # nearly every parameter is reached
    for a, b in zip(plain_grads, ckpt_grads):
        assert torch.equal(a, b)


def _fsdp_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    """Each rank: the tiny joint module wrapped as configs/paper/fsdp.yaml wraps it (gloo, fp32), one training loss
    and backward with checkpointing off, then on; this rank's loss and local gradient shards of each."""
    import torch.distributed as dist
    from fsdp_helpers import Stepped, wrap
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        got = {}
        for checkpointing in (False, True):
            torch.manual_seed(0)
            module = Stepped(size="tiny", planner_resolution=8, ema_decay=0.9, ema_warmup=False,
                             planner={"depth": 2, "checkpointing": checkpointing},
                             generator={"depth": 2, "checkpointing": checkpointing})
            with torch.no_grad():  # off adaLN-Zero's identity start
                for p in module.networks.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            wrapper = wrap(module, world)
            video = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(rank)) * 2 - 1
            loss = _ForwardRedirection()(wrapper, module, "compute_loss", {"video": video},
                                         torch.Generator().manual_seed(0), True).mean()
            loss.backward()
            got[checkpointing] = (loss.detach(), [None if p.grad is None else p.grad.clone()
                                                  for p in module.networks.parameters()])
        torch.save(got, f"{out}.{rank}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes, about 20 s: `make test-slow`
def test_checkpointing_under_fsdp_gives_the_same_loss_and_gradient_shards(tmp_path):
    """The networks checkpoint their blocks from outside the FSDP units fsdp.yaml makes of them (every paper stage
    runs so): the recomputation gathers the unit again, and each rank's loss and gradient shards stay bit-identical."""
    from fsdp_helpers import spawn_or_fail

    spawn_or_fail(_fsdp_worker, (2, str(tmp_path / "rdv"), str(tmp_path / "out")), nprocs=2, timeout=300)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        (plain_loss, plain), (ckpt_loss, ckpt) = got[False], got[True]
        assert torch.equal(plain_loss, ckpt_loss)
        assert [g is None for g in plain] == [g is None for g in ckpt]
        assert sum(g is not None and bool(g.any()) for g in plain) > 0
        for a, b in zip(plain, ckpt):
            assert a is None or torch.equal(a, b)

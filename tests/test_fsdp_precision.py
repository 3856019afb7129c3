"""FSDP's mixed precision under ``bf16-mixed`` (full shard, gloo on CPU), with ``configs/paper/fsdp.yaml``'s strategy:
parameters compute in bf16, gradients are reduced and buffers kept in fp32 (as DDP all-reduces them), and the frozen
autoencoder encodes the fp32 batch with its fp32 weights (not cast by FSDP, nor sharded).

The forward runs under CPU autocast, standing in for the plugin's CUDA autocast.
"""

from __future__ import annotations

import pytest
import torch
from fsdp_helpers import Stepped, spawn_or_fail, wrap

UNITS = [("torch.bfloat16", "torch.float32", "torch.float32")]  # every unit's (param, reduce, buffer) dtype


def _save_tiny_vae(folder) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=16).save_pretrained(folder)


def _worker(rank: int, world: int, rendezvous: str, vae: str, out: str) -> None:
    import torch.distributed as dist
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullyShardedDataParallel

    from mardini.autoencoders import DiffusersAutoencoder

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        module = Stepped(size="tiny", ema_decay=0.9, ema_warmup=False, autoencoder=DiffusersAutoencoder(vae))
        wrapper = wrap(module, world, precision="bf16-mixed")
        units = sorted({(str(u.mixed_precision.param_dtype), str(u.mixed_precision.reduce_dtype),
                         str(u.mixed_precision.buffer_dtype)) for u in FullyShardedDataParallel.fsdp_modules(wrapper)})
        assert units == UNITS, f"FSDP units' (param, reduce, buffer) dtypes: {units}"  # before the forward needs them
        got = {"encoded": set()}

        def seen(mod, args):  # the VAE encoder's weights and input as the training forward meets them
            got["encoded"].add((str(next(mod.parameters()).dtype), str(args[0].dtype)))

        module.autoencoder.vae.encoder.register_forward_pre_hook(seen)
        g = torch.Generator().manual_seed(100 + rank)
        batch = {"video": torch.rand(2, 4, 3, 32, 32, generator=g) * 2 - 1}  # (B, T, 3, H, W)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _ForwardRedirection()(wrapper, module, "compute_loss", batch, torch.Generator().manual_seed(0),
                                         True).mean()
        loss.backward()
        got["finite"] = bool(torch.isfinite(loss).item())
        got["autoencoder"] = {(str(p.dtype), tuple(p.shape)) == (str(torch.float32), tuple(q.shape))
                              for p, q in zip(module.autoencoder.parameters(), DiffusersAutoencoder(vae).parameters())}
        torch.save(got, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_fsdp_bf16_mixed_reduces_in_fp32_and_keeps_the_autoencoder_fp32(tmp_path):
    pytest.importorskip("diffusers")
    _save_tiny_vae(tmp_path / "vae")
    spawn_or_fail(_worker, (2, str(tmp_path / "rdv"), str(tmp_path / "vae"), str(tmp_path / "out")), nprocs=2,
                  timeout=300)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        assert got["encoded"] == {("torch.float32", "torch.float32")}  # (weights, input), both encodes
        assert got["autoencoder"] == {True}  # every weight fp32 and full (not a shard)
        assert got["finite"]


def test_the_strategy_s_setup_ignores_the_autoencoder_beside_what_the_user_ignores(monkeypatch):
    """``setup`` (what a fit runs, not only the test helper) adds the autoencoder to ``ignored_modules`` without
    dropping the user's, and to ``ignored_states`` where those are given (FSDP refuses both at once)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch import nn

    from mardini.lit.fsdp import MarDiniFSDPStrategy

    monkeypatch.setattr(FSDPStrategy, "setup", lambda self, trainer: None)  # the wrap itself needs a GPU trainer
    module = nn.Module()
    module.autoencoder, module.extra = nn.Linear(2, 2), nn.Linear(2, 2)
    for kwargs, key, expected in (({}, "ignored_modules", [module.autoencoder]),
                                  ({"ignored_modules": [module.extra]}, "ignored_modules",
                                   [module.extra, module.autoencoder]),
                                  ({"ignored_states": [module.extra]}, "ignored_states",
                                   [module.extra, module.autoencoder]),
                                  ({"ignored_states": [module.extra.weight]}, "ignored_states",
                                   [module.extra.weight, *module.autoencoder.parameters()])):
        st = MarDiniFSDPStrategy(parallel_devices=[torch.device("cpu")], **kwargs)
        st.connect(module)
        st.setup(trainer=None)
        st.setup(trainer=None)  # twice (a second fit): nothing added twice
        got = st.kwargs[key]
        assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected)), key
        assert ("ignored_modules" in st.kwargs) != ("ignored_states" in st.kwargs)

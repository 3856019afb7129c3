"""FSDP on the CPU for tests (gloo): the tiny joint module wrapped as Lightning's ``FSDPStrategy._setup_model`` wraps it.

Lightning's Trainer refuses FSDP without a GPU, so the wrap is done here with the strategy built from
``configs/paper/fsdp.yaml``'s class and init_args (its wrap policy, ``use_orig_params=True``; the autoencoder ignored
as its ``setup`` does) -- except ``device_id=cpu`` (the strategy passes none on CPU, which FSDP refuses). The module
then sees the strategy (and through it the root) as under a Trainer.
"""

from __future__ import annotations

import importlib
import time
import types
from pathlib import Path

import torch
import yaml

from mardini.lit import MarDiniModule

REPO = Path(__file__).resolve().parents[1]


class Stepped(MarDiniModule):
    """The module with a settable global step (no Trainer here): the EMA decay depends on it."""

    step = 0

    @property
    def global_step(self) -> int:
        return self.step


def tiny_module() -> Stepped:
    torch.manual_seed(0)
    return Stepped(size="tiny", ema_decay=0.9, ema_warmup=False)


def _imported(path: str):
    mod, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(mod), name)


def fsdp_strategy(world: int, precision: str = "32-true"):
    """The YAML's strategy class with its init_args (its wrap policy's class paths imported)."""
    from lightning.pytorch.plugins.precision import FSDPPrecision

    strategy = yaml.safe_load((REPO / "configs" / "paper" / "fsdp.yaml").read_text())["trainer"]["strategy"]
    args = dict(strategy["init_args"])
    policy = {_imported(path) for path in args.pop("auto_wrap_policy")}
    return _imported(strategy["class_path"])(auto_wrap_policy=policy, parallel_devices=[torch.device("cpu")] * world,
                                              precision_plugin=FSDPPrecision(precision), **args)


def wrap(module, world: int, precision: str = "32-true"):
    """``FSDPStrategy._setup_model``'s wrap with the strategy's own arguments (after its ``setup`` ignored the
    autoencoder), on the CPU; the module then sees the strategy (and through it the root) as under a Trainer."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    st = fsdp_strategy(world, precision)
    if hasattr(st, "ignore_autoencoder"):  # Lightning's own FSDPStrategy has no such step
        st.ignore_autoencoder(module)
    st.model = FullyShardedDataParallel(module, cpu_offload=st.cpu_offload, mixed_precision=st.mixed_precision_config,
                                        sharding_strategy=st.sharding_strategy, device_id=torch.device("cpu"),
                                        **st.kwargs)
    module._trainer = types.SimpleNamespace(strategy=st)
    return st.model


def full_state_dict_context(wrapper):
    from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

    return _get_full_state_dict_context(wrapper, world_size=dist_world(), rank0_only=False)


def dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def spawn_or_fail(fn, args: tuple, nprocs: int, timeout: float) -> None:
    """``torch.multiprocessing.spawn`` that fails the test (and kills the workers) when they hang past ``timeout``."""
    torch.multiprocessing.set_sharing_strategy("file_system")  # fd passing fails on small /dev/shm
    ctx = torch.multiprocessing.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"the {nprocs}-process run hung (no end after {timeout:.0f} s)")

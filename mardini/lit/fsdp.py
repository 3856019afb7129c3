"""The EMA under FSDP: parameter-wise updates and swaps on local shards.

Under FSDP (``use_orig_params=True``, Lightning's default) a ``state_dict()`` of a wrapped module gathers full clones
(writes to them are lost), so the EMA cannot go through it. With ``configs/paper/fsdp.yaml``'s policy (one unit per
``PlannerBlock``/``GeneratorBlock``) a live block and its EMA copy are units of identical flat-parameter layout, so
their original parameters -- views into the local shard, 1-D and possibly empty -- pair one to one on every rank.
Everything else (embeddings, heads, null plan) lives in the root unit, whose flat parameter mixes live and EMA
tensors at different offsets: it is unsharded (``summon_full_params(recurse=False)``, a small all-gather) while the
EMA works, so those pairs are full tensors on every rank.

:class:`MarDiniFSDPStrategy` (the YAML's strategy) sets FSDP's mixed precision as DDP trains and keeps the frozen
autoencoder out of FSDP, and restores the checkpoint ``train.py validate`` read as it started (Lightning's FSDP
strategy reads the file again: :func:`warn_unpinned_restore`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from mardini.lit.checkpoint_io import AtomicCheckpointIO

# what wrappers add to the names of the parameters inside them: an FSDP unit, activation checkpointing applied by
# a strategy (FSDPStrategy's activation_checkpointing_policy), torch.compile
WRAPPED_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as in the unwrapped module (:data:`WRAPPED_PREFIXES` removed)."""
    for prefix in WRAPPED_PREFIXES:
        name = name.replace(prefix, "")
    return name
WRAP_FIX = (
    "under FSDP the EMA pairs each network's tensors with its EMA copy's on the local shards, which needs the live "
    "and EMA networks wrapped alike: use an auto_wrap_policy by module class (configs/paper/fsdp.yaml's "
    "[PlannerBlock, GeneratorBlock]) with use_orig_params=True, or train with DDP (configs/paper/cluster.yaml)"
)


class MarDiniFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy``, training as DDP does under a mixed ``trainer.precision``; autoencoder in fp32.

    Lightning's FSDP plugin maps ``bf16-mixed`` to bf16 parameters, gradient reduction, buffers and root inputs, so
    gradients would be summed over the ranks in bf16 (DDP all-reduces them in fp32), the batch would reach the
    autoencoder cast to bf16, and the autoencoder's weights (in the root unit) would be cast to bf16 in the forward.
    Here, unless ``mixed_precision`` is given: parameters compute in the half dtype, gradients are reduced and
    buffers kept in fp32, inputs are left as they come (autocast casts, as under DDP); 32-true and the true half
    precisions are Lightning's. The LightningModule's ``autoencoder`` goes to FSDP's ``ignored_modules``: neither
    flattened, sharded nor cast (a full fp32 copy on every rank, usable outside a forward too), moved to the root
    device here since FSDP moves only what it manages. (MixedPrecision's ``_module_classes_to_ignore`` would make it
    a unit of its own, sharded outside its ``forward``, which encode/decode do not go through.)
    """

    @property
    def mixed_precision_config(self):
        from torch.distributed.fsdp import MixedPrecision

        half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision_plugin.precision)
        if self.mixed_precision or half is None:
            return super().mixed_precision_config
        return MixedPrecision(param_dtype=half, reduce_dtype=torch.float32, buffer_dtype=torch.float32,
                              cast_root_forward_inputs=False)

    def ignore_autoencoder(self, module: nn.Module) -> None:
        """Adds ``module.autoencoder`` (if any) to FSDP's ``ignored_modules`` (beside any given), or to
        ``ignored_states`` where those are given (FSDP takes one of the two), and puts it on the root device."""
        autoencoder = getattr(module, "autoencoder", None)
        if not isinstance(autoencoder, nn.Module):
            return
        autoencoder.to(self.root_device)
        if self.kwargs.get("ignored_states") is not None:
            states = list(self.kwargs["ignored_states"])  # modules or parameters, not both (FSDP's rule)
            if all(isinstance(s, nn.Module) for s in states):
                extra = [autoencoder]
            else:
                extra = list(autoencoder.parameters())
            self.kwargs["ignored_states"] = states + [x for x in extra if not any(x is s for s in states)]
            return
        ignored = list(self.kwargs.get("ignored_modules") or [])
        self.kwargs["ignored_modules"] = ignored + ([] if any(m is autoencoder for m in ignored) else [autoencoder])

    def setup(self, trainer) -> None:
        self.ignore_autoencoder(self.lightning_module)
        super().setup(trainer)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Lightning's, but for a checkpoint ``train.py validate`` read as it started and pinned for this path
        (``AtomicCheckpointIO.pin``, the same on every rank: ``mardini.lit.scored_checkpoint``): its state dict goes
        into the model as Lightning's full-checkpoint restore does, and the rest is returned. Lightning's reads
        ``checkpoint_path`` itself, bypassing the CheckpointIO, after the model's and the data's setup: a fit of the
        folder had deleted it by then (``FileNotFoundError``) or replaced it (``last.ckpt``: another step scored than
        ``validate.yaml`` names)."""
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state

        io = self.checkpoint_io
        if not isinstance(io, AtomicCheckpointIO) or io.pinned_read()[0] != str(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only)
        self.broadcast(checkpoint_path)  # Lightning's load broadcasts the path: the same collectives on every rank
        checkpoint = dict(io.load_checkpoint(checkpoint_path))  # the pinned read, handed out (a copy to pop from)
        _load_raw_module_state(checkpoint.pop("state_dict"), module=self.model, world_size=self.world_size,
                               strict=self.lightning_module.strict_loading)
        return checkpoint


def restores_pinned_read(strategy) -> bool:
    """Whether ``strategy`` restores a checkpoint through its CheckpointIO (Lightning's base ``Strategy``: DDP, one
    device), which hands out the read ``train.py validate`` pinned, or as :class:`MarDiniFSDPStrategy` does; Lightning's
    FSDP, DeepSpeed and ModelParallel strategies read the file themselves."""
    restore = type(strategy).load_checkpoint
    return restore is Strategy.load_checkpoint or restore is MarDiniFSDPStrategy.load_checkpoint


def warn_unpinned_restore(strategy, path) -> None:
    """Warn, before anything is set up, that ``strategy`` will restore the checkpoint file ``path`` by reading it
    again (not :func:`restores_pinned_read`), naming what a fit of its folder does to it then and the fix."""
    if restores_pinned_read(strategy):
        return
    fix = ("--trainer.strategy mardini.lit.fsdp.MarDiniFSDPStrategy (configs/paper/fsdp.yaml's), which restores the "
           "read, or " if isinstance(strategy, FSDPStrategy) else "")
    rank_zero_warn(
        f"validate read {path} as it started, but {type(strategy).__name__} restores it by reading the file again "
        "after the model's and the data's setup: a fit of its folder that deletes it meanwhile fails this validate "
        "(FileNotFoundError), and one that replaces it (last.ckpt) has it score another step than validate.yaml's "
        f"'# scored:' header names. To score what was read, pass {fix}score a copy made first (--ckpt_path COPY)")


def attached_trainer(module: nn.Module) -> L.Trainer | None:
    """The trainer ``module`` is attached to (``LightningModule.trainer``), None for a detached or plain module."""
    if not isinstance(module, L.LightningModule):
        return None
    try:
        return module.trainer
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None


def fsdp_root(module: nn.Module) -> nn.Module | None:
    """The FSDP root wrapping ``module`` (a LightningModule under Lightning's FSDPStrategy), else None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    strategy = getattr(attached_trainer(module), "strategy", None)
    root = strategy.model if isinstance(strategy, FSDPStrategy) else None
    if not isinstance(root, FullyShardedDataParallel):
        return None  # not FSDP, or not wrapped yet
    if not root._use_orig_params:
        raise ValueError(f"FSDP with use_orig_params=False: {WRAP_FIX}")
    return root


@contextlib.contextmanager
def root_unsharded(root: nn.Module | None, writeback: bool) -> Iterator[None]:
    """The root unit's own parameters full on every rank (nested units stay sharded); a no-op without FSDP."""
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=writeback):
        yield


def local_tensors(net: nn.Module) -> list[torch.Tensor]:
    """Parameters (local views: full in the unsharded root, 1-D shards in block units) then buffers, detached."""
    return [t.detach() for t in (*net.parameters(), *net.buffers())]


def paired(ema_net: nn.Module, net: nn.Module, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The EMA's and the network's local tensors; raises when their layouts differ (then they cannot pair)."""
    ema_t, live_t = local_tensors(ema_net), local_tensors(net)
    if [t.shape for t in ema_t] != [t.shape for t in live_t]:
        raise ValueError(f"network '{name}' and its EMA copy are sharded differently: {WRAP_FIX}")
    return ema_t, live_t


@torch.no_grad()
def lerp_local_(ema_net: nn.Module, net: nn.Module, weight: float, name: str = "") -> None:
    """``ema += weight * (live - ema)`` on this rank's views; non-float buffers copied. Same arithmetic as timm's
    ``ModelEmaV3`` (``torch._foreach_lerp_``), so a sharded EMA equals the unsharded one element for element."""
    ema_t, live_t = paired(ema_net, net, name)
    floats = [(e, v) for e, v in zip(ema_t, live_t) if e.is_floating_point()]
    for e, v in zip(ema_t, live_t):
        if not e.is_floating_point():
            e.copy_(v)
    if floats:
        torch._foreach_lerp_([e for e, _ in floats], [v.to(e.dtype) for e, v in floats], weight=weight)


__all__ = ["MarDiniFSDPStrategy", "WRAP_FIX", "fsdp_root", "root_unsharded", "local_tensors", "paired", "lerp_local_"]

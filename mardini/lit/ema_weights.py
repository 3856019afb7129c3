"""The EMA of a stage's networks: updated after each optimiser step, swapped in for validation and sampling."""

from __future__ import annotations

import contextlib

import torch

from mardini.lit.fsdp import fsdp_root, lerp_local_, local_tensors, paired, root_unsharded


class EmaWeights:
    """:class:`~mardini.lit.base.MarDiniBase`'s EMA (timm ``ModelEmaV3`` in ``self.ema``), on FSDP shards too."""

    def update_ema(self) -> None:
        """One EMA update: at the full decay when it continues a loaded EMA (``ema_keep_loaded``), otherwise by
        step (timm: the first update copies the raw weights; with ``ema_warmup`` the decay then ramps up).
        Under FSDP the same update runs on each rank's local shards (:mod:`mardini.lit.fsdp`)."""
        keep_loaded = self.hparams.get("ema_keep_loaded", False) and self._ema_loaded
        root = fsdp_root(self)
        if root is not None:
            with root_unsharded(root, writeback=True):
                for name, net in self.networks.items():
                    step = None if keep_loaded and name in self._ema_loaded else self.global_step
                    lerp_local_(self.ema.module[name], net, 1.0 - self.ema.get_decay(step), name)
            return
        if not keep_loaded:
            self.ema.update(self.networks, step=self.global_step)
            return
        for name, net in self.networks.items():  # loaded EMAs continue at the full decay, the others by step
            decay = self.ema.get_decay(None if name in self._ema_loaded else self.global_step)
            with torch.no_grad():
                for ema_v, v in zip(self.ema.module[name].state_dict().values(), net.state_dict().values()):
                    if ema_v.is_floating_point():
                        ema_v.lerp_(v.to(ema_v.dtype), 1.0 - decay)  # ema = decay * ema + (1 - decay) * v
                    else:
                        ema_v.copy_(v)

    def ema_decays(self) -> dict[str, float]:
        """The decay of each network's EMA update after the current optimiser step (:meth:`update_ema`): timm's by
        step (0 at the first update, which copies the weights; with ``ema_warmup`` ramping up to ``ema_decay``), or
        ``ema_decay`` itself for a network whose loaded EMA continues (``ema_keep_loaded``)."""
        keep_loaded = self.hparams.get("ema_keep_loaded", False) and self._ema_loaded
        return {name: float(self.ema.get_decay(None if keep_loaded and name in self._ema_loaded else self.global_step))
                for name in self.networks}

    @contextlib.contextmanager
    def ema_weights(self):
        """Context manager: the networks hold the EMA weights inside, their own weights again after."""
        self._swap_in_ema()
        try:
            yield self
        finally:
            self._swap_out_ema()

    def _swap_in_ema(self) -> None:
        if self._ema_backup is not None:
            return
        root = fsdp_root(self)
        if root is not None:  # local views, parameter-wise (a sharded state_dict() gathers copies)
            with root_unsharded(root, writeback=True):
                ema, live = paired(self.ema.module, self.networks, "networks")
                self._ema_backup = [t.clone() for t in live]
                torch._foreach_copy_(live, ema)
            return
        live = list(self.networks.state_dict().values())
        self._ema_backup = [t.detach().clone() for t in live]
        torch._foreach_copy_(live, list(self.ema.module.state_dict().values()))

    def _swap_out_ema(self) -> None:
        if self._ema_backup is None:
            return
        root = fsdp_root(self)
        if root is not None:
            with root_unsharded(root, writeback=True):
                torch._foreach_copy_(local_tensors(self.networks), self._ema_backup)
        else:
            torch._foreach_copy_(list(self.networks.state_dict().values()), self._ema_backup)
        self._ema_backup = None

    def on_fit_start(self) -> None:
        root = fsdp_root(self)
        if root is not None:  # a wrap the EMA cannot pair fails before the first step, naming the fix
            with root_unsharded(root, writeback=False):
                paired(self.ema.module, self.networks, "networks")

"""The frozen autoencoder's share of a stage's per-GPU memory, for ``python -m mardini.sizing``.

Parameters: exact, from the stage's autoencoder built on the meta device (a DiffusersAutoencoder from its VAE's
``config.json``, or, where the stage's ``path`` holds none, :data:`REFERENCE_VAE`), a full copy per GPU in its weight
dtype (FSDP leaves it unsharded: ``configs/paper/fsdp.yaml``). Encoding (only where frames are encoded on the fly:
no latent cache): the peak bytes of the tensors one encoder call creates and holds at once (:func:`peak_live_bytes`;
no autograd: the VAE is frozen), measured on the CPU on one frame at resolution ``/ sqrt(m)`` and extrapolated
linearly in pixels (``m``) and frames (the frames of one call: ``chunk_size``, at most those of the GPU's clips), in
the weight dtype; as for the networks, the VAE's mid-block attention is taken as flash-style (no ``tokens^2`` term).
The encode runs before the networks' forward and its temporaries are freed when it returns: they add to the peak
only where they exceed the activations the forward then saves.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# diffusers' AutoencoderKL, 16 latent channels, 8x down: the layout of SD3's and FLUX's VAEs (83.8M parameters),
# sized where the stage's VAE folder (the paper configs' weights/vae-16ch) is not there to read
REFERENCE_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16,
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
DEFAULT_CHUNK = 16  # FrameAutoencoder's chunk_size: frames per encoder call


@dataclass
class AutoencoderSize:
    """What the frozen autoencoder holds per GPU."""

    name: str  # what was sized, for the report
    params: int
    param_bytes: int
    encode_bytes: float  # peak temporaries of one encoder call at the stage's resolution
    frames_per_call: int


class _LiveStorages(TorchDispatchMode):
    """Tracks the bytes of the storages the ops it sees create, from the op to their release, and their peak."""

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore, self.live, self.now, self.peak = ignore, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self.live or storage.data_ptr() in self.ignore:
            return
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)


def peak_live_bytes(fn: Callable[[], object], keep: list[torch.Tensor]) -> int:
    """Peak bytes of the tensors ``fn()`` creates and holds at once (each storage from the op that makes it to its
    release), the storages of ``keep`` (weights, the input) left out: what a forward without autograd needs."""
    with torch.no_grad(), _LiveStorages({t.untyped_storage().data_ptr() for t in keep}) as mode:
        fn()
    return mode.peak


def vae_config(init_args: dict) -> tuple[dict, str]:
    """``(AutoencoderKL config, where it came from)``: the stage's VAE's ``config.json``, else :data:`REFERENCE_VAE`."""
    folder = Path(str(init_args.get("path", "")))
    folder = folder / init_args["subfolder"] if init_args.get("subfolder") else folder
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return {k: v for k, v in config.items() if not k.startswith("_")}, f"AutoencoderKL of {folder}/config.json"
    except (OSError, ValueError):
        return dict(REFERENCE_VAE), (f"no config.json at {folder}: the reference 16-channel 8x AutoencoderKL "
                                     "(SD3's and FLUX's layout)")


def build_encoder(spec: dict, device: str) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], str]:
    """``(module holding every weight, encode of (N, 3, H, W) frames, name)`` of the stage's autoencoder ``spec``;
    a DiffusersAutoencoder's VAE built from its config (:func:`vae_config`), its encoder alone materialised on a
    device other than meta (random weights: the bytes do not depend on them)."""
    from mardini.autoencoders import build_autoencoder
    from mardini.autoencoders.diffusers_kl import _import_autoencoder_kl

    if not str(spec.get("class_path", "")).endswith("DiffusersAutoencoder"):
        ae = build_autoencoder(spec).to(device)
        return ae, ae.encode_frames, type(ae).__name__
    config, name = vae_config(spec.get("init_args") or {})
    with torch.device("meta"):
        vae = _import_autoencoder_kl()(**config)
    if device != "meta":
        for part in (vae.encoder, vae.quant_conv):
            if part is not None:
                part.to_empty(device=device)
                for p in part.parameters():
                    nn.init.normal_(p, std=0.02)
    return vae, lambda x: vae.encode(x).latent_dist.mean, name  # (N, C, h, w), as encode_frames


def autoencoder_size(spec: dict | None, resolution: int, frames: int, m: int) -> AutoencoderSize | None:
    """The frozen autoencoder of ``spec`` per GPU: parameters and the temporaries of one encoder call on
    ``frames`` frames (those of the GPU's clips; at most ``chunk_size`` per call) at ``resolution``, measured at
    ``resolution / sqrt(m)`` (module docstring). None without an autoencoder."""
    if not spec:
        return None
    args = spec.get("init_args") or {}
    itemsize = torch.empty(0, dtype=getattr(torch, str(args.get("dtype", "float32")).removeprefix("torch."))).itemsize
    module, _, name = build_encoder(spec, "meta")
    params = sum(p.numel() for p in module.parameters())
    side = resolution // int(round(math.sqrt(m)))
    module, encode, _ = build_encoder(spec, "cpu")
    x = torch.rand(1, 3, side, side) * 2 - 1  # (1, 3, H/sqrt(m), W/sqrt(m)) one frame
    one = peak_live_bytes(lambda: encode(x), [*module.parameters(), *module.buffers(), x])
    per_call = min(int(args.get("chunk_size", DEFAULT_CHUNK)), frames)
    return AutoencoderSize(name=name, params=params, param_bytes=params * itemsize, frames_per_call=per_call,
                           encode_bytes=float(one) * m * per_call * itemsize / 4)  # measured in fp32

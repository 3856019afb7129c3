"""Exact pixel space-to-depth autoencoder: the embedded default (no weights, lossless)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mardini.autoencoders.base import FrameAutoencoder


class SpaceToDepthAutoencoder(FrameAutoencoder):
    """Folds each ``f x f`` pixel block into channels: ``(3, H, W) -> (3 f^2, H/f, W/f)``. Exact inverse.

    With ``f = 2`` a frame gives 12 latent channels. ``z = (pixels - shift) * scale``: the defaults keep pixels as
    they are; a data set's pixel mean as ``shift`` and ``1 / std`` as ``scale`` give zero-mean, unit-variance latents,
    the scale the noise schedule assumes (``python -m mardini.autoencoders.pixel_stats`` measures them).

    Args:
        downsample: the block side f (frames' sides must divide by it).
        scale: the latents' ``scale``, 1 / the pixels' std for unit variance.
        chunk_size: frames per encode/decode call (bounds memory; the result does not depend on it).
        shift: the latents' ``shift``, the pixels' mean for zero mean.
    """

    def __init__(self, downsample: int = 2, scale: float = 1.0, chunk_size: int = 64, shift: float = 0.0) -> None:
        super().__init__(chunk_size=chunk_size)
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        self.downsample = downsample
        self.latent_channels = 3 * downsample * downsample
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (latents = (pixels - shift) * scale), got {scale!r}")
        self.scale = float(scale)
        self.shift = float(shift)

    def spec(self) -> dict:
        return {"class_path": "mardini.autoencoders.pixel.SpaceToDepthAutoencoder",
                "init_args": {"downsample": self.downsample, "scale": self.scale, "chunk_size": self.chunk_size,
                              "shift": self.shift}}

    def encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.downsample)  # (N, 3 f^2, H/f, W/f)

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z, self.downsample)  # (N, 3, H, W)

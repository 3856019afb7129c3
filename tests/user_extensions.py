"""A user's own extensions, defined outside the ``mardini`` package as a project of one's own would: the tests train
with them and load them back by their class paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mardini.autoencoders import FrameAutoencoder
from mardini.lit.curriculum import Curriculum


class AvgPoolAutoencoder(FrameAutoencoder):
    """2x2 average pooling per frame; decoding repeats each latent pixel (lossy, no weights)."""

    latent_channels = 3
    downsample = 2

    def spec(self) -> dict:
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {"chunk_size": self.chunk_size}}

    def encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2)  # (N, 3, H/2, W/2)

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z, scale_factor=2, mode="nearest")  # (N, 3, H, W)


class WindowSchedule(Curriculum):
    """A curriculum of one's own: Lightning keys its state ``WindowSchedule``, and its name does not end in
    ``Curriculum``."""

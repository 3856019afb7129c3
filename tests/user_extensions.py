"""A user's own extensions, defined outside the ``mardini`` package as a project of one's own would: the tests train
with them and load them back by their class paths."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mardini.autoencoders import FrameAutoencoder
from mardini.data.datamodule import VideoDataModule
from mardini.lit.curriculum import Curriculum
from mardini.masking import TEMPLATES, MaskSampler


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


class EveryOtherSampler(MaskSampler):
    """A training template of one's own: ``every_other`` gives frames 0, 2, 4 ... and generates the others."""

    templates: ClassVar[tuple[str, ...]] = (*TEMPLATES, "every_other")

    def given_frames(self, batch: int, frames: int, n_ref: torch.Tensor,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        given = super().given_frames(batch, frames, n_ref, generator)  # the built-in templates' (B, T) each
        given["every_other"] = (torch.arange(frames) % 2 == 0).expand(batch, -1)  # (B, T)
        return given


class RandomClips(Dataset):
    """``clips`` random clips, each ``{"video": (T, 3, H, W) in [-1, 1], "fps": ()}`` drawn from its index."""

    def __init__(self, clips: int, frames: int, resolution: int) -> None:
        self.clips, self.frames, self.resolution = clips, frames, resolution

    def __len__(self) -> int:
        return self.clips

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        video = torch.rand(self.frames, 3, self.resolution, self.resolution, generator=g) * 2 - 1  # (T, 3, H, W)
        return {"video": video, "fps": torch.tensor(8.0)}


class RandomClipsDataModule(VideoDataModule):
    """A datamodule of one's own (train.py's ``--data`` takes VideoDataModule subclasses) that reads no shards: plain
    DataLoaders, without a ``worker_init_fn``, over :class:`RandomClips`."""

    def __init__(self, frames: int = 9, resolution: int = 32, batch_size: int = 4, num_workers: int = 2,
                 clips: int = 4096) -> None:
        super().__init__(train_shards="", val_shards=None, frames=frames, resolution=resolution,
                         batch_size=batch_size, num_workers=num_workers)
        self.clips = clips

    def setup(self, stage: str | None = None) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomClips(self.clips, self.frames, self.resolution), batch_size=self.batch_size,
                          shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomClips(2 * self.batch_size, self.frames, self.resolution), batch_size=self.batch_size,
                          num_workers=self.num_workers)

"""FID over video frames: ``torchmetrics``' ``FrechetInceptionDistance`` fed by the InceptionV3 TorchScript.

Protocol ``fid{N}_{T}f``: the frames of N generated videos of T frames (all frames, or those a mask selects) against
real frames; each frame quantised to 8 bits, resized (bilinear) and centre-cropped to 299, mapped to (x - 128) / 128;
2048-d pool3 features; float64 running sums (torchmetrics' states, summed across processes).
"""

from __future__ import annotations

import os

import torch
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from mardini.metrics.inception import build_inception
from mardini.metrics.preprocess import ResizeMode
from mardini.metrics.stats import FrechetStatsMixin, hide_module, on_device


class FrameFID(FrechetStatsMixin, FrechetInceptionDistance):
    """FID of video frames (or images) with the TF-Inception features, DDP-safe.

    Args:
        num_videos: N of the protocol name (``fid{N}_{T}f``).
        num_frames: T of the protocol name; ``update`` checks T on videos.
        weights: the TorchScript file or a cache dir; None looks in the weights cache (``make weights``).
        network: a ready feature module ``(N, 3, H, W) in [-1, 1] -> (N, D)`` with ``num_features``; overrides
            ``weights`` (tests, or one network shared by several metrics).
        resize: "crop" (aspect kept, centre crop) or "stretch" (the reference FID code), as
            :class:`~mardini.metrics.inception.InceptionV3Features`.
        quantize: round frames to 8-bit levels first, as a saved frame would be.
        chunk_size: frames per network forward.
        real_side: False keeps no real-side states: the real statistics come from a metric that holds them
            (:meth:`set_real_stats` before ``compute``; one real side shared by several methods' metrics).
        kwargs: passed to torchmetrics' ``FrechetInceptionDistance``.
    """

    feature_name = "inception-2015-12-05-pool3"

    def __init__(
        self,
        num_videos: int,
        num_frames: int,
        weights: str | os.PathLike | None = None,
        network: nn.Module | None = None,
        resize: ResizeMode = "crop",
        quantize: bool = True,
        chunk_size: int = 64,
        real_side: bool = True,
        **kwargs,
    ) -> None:
        net = network if network is not None else build_inception(weights, resize=resize, quantize=quantize)
        if not isinstance(getattr(net, "num_features", None), int):
            raise ValueError("the FID feature network must set an int `num_features` (InceptionV3Features does)")
        super().__init__(feature=net, normalize=False, **kwargs)  # float frames pass through as they are
        hide_module(self, "inception", self.inception)  # not a submodule: out of state_dict, DDP and .to()
        self.num_features = net.num_features
        self.num_videos, self.num_frames, self.chunk_size = num_videos, num_frames, chunk_size
        self.resize, self.quantize = resize, quantize
        self.protocol = f"fid{num_videos}_{num_frames}f"
        self.add_state("fake_num_videos", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if not real_side:
            if not self.reset_real_features:
                raise ValueError("FrameFID(real_side=False) holds no real features to keep across resets: leave "
                                 "reset_real_features at True")
            self._drop_real_states()  # torchmetrics' __init__ added them

    def preprocessing(self) -> dict:
        return {"resize": self.resize, "quantize": self.quantize}

    def update(self, videos: torch.Tensor, real: bool, mask: torch.Tensor | None = None) -> None:
        """Add frames to the real or generated statistics.

        Args:
            videos: ``(B, T, 3, H, W)`` in [-1, 1] (T must equal the protocol's), or images ``(N, 3, H, W)``.
            real: which side to update.
            mask: optional ``(B, T)`` bool, True = generated frame: only those frames count (videos only).
        """
        self._check_real_update(real)
        if videos.dim() == 5:
            if not real:
                self.fake_num_videos += videos.shape[0]
            if videos.shape[1] != self.num_frames:
                raise ValueError(f"{self.protocol} takes clips of {self.num_frames} frames, got {videos.shape[1]}")
            if mask is not None:
                if mask.shape != videos.shape[:2] or mask.dtype != torch.bool:
                    raise ValueError(f"mask must be (B, T) bool like the videos, got {tuple(mask.shape)} {mask.dtype}")
                frames = videos[mask]  # (M, 3, H, W), generated frames only
                for row in mask.unique(dim=0).tolist():
                    self._saw_frames(real, tuple(row))
            else:
                frames = rearrange(videos, "b t c h w -> (b t) c h w")  # (B*T, 3, H, W)
                self._saw_frames(real, "all")
        elif mask is not None:
            raise ValueError("a mask only applies to videos (B, T, 3, H, W)")
        else:
            frames = videos  # (N, 3, H, W)
            self._saw_frames(real, "images")
        on_device(self.inception, frames.device)
        for chunk in frames.split(self.chunk_size):
            super().update(chunk, real)  # torchmetrics: features (n, 2048) -> float64 sums

    def compute(self) -> torch.Tensor:
        """FID (float64 scalar) of all frames seen on all processes (or against cached real statistics)."""
        n_fake = int(self.fake_num_videos)
        if n_fake and n_fake != self.num_videos:
            rank_zero_warn(f"{self.protocol}: computed on {n_fake} generated videos, the protocol names "
                           f"{self.num_videos}")
        self.check_frames()
        return self._frechet()

"""Fréchet Video Distance on I3D (Kinetics-400) logits, as a DDP-safe ``torchmetrics.Metric``.

Protocol ``fvd{N}_{T}f``: N generated videos of T frames against real videos of the same length, each clip quantised
to 8 bits, resized (bilinear) and centre-cropped to 224x224, in [-1, 1] (:func:`~mardini.metrics.i3d.i3d_preprocess`);
features are the 400 pre-softmax logits; statistics are float64 running sums.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from mardini.metrics.i3d import MIN_FRAMES, build_i3d, i3d_preprocess
from mardini.metrics.preprocess import ResizeMode
from mardini.metrics.stats import FrechetStatsMixin, hide_module, on_device


class FrechetVideoDistance(FrechetStatsMixin, Metric):
    """FVD between real and generated videos.

    Args:
        num_videos: N of the protocol, the number of generated videos it is defined on (a warning is raised at
            ``compute`` when a different number was seen).
        num_frames: T of the protocol; every ``update`` must bring clips of exactly T frames (T >= 9, or any T with
            ``pad_short``).
        weights: the I3D pickle or a cache dir; None looks in the weights cache (``make weights``).
        network: a ready feature network ``(B, 3, T, 224, 224) -> (B, D)`` (tests, or one I3D shared by several
            metrics); overrides ``weights``.
        resize: "crop" (default; aspect kept, centre crop) or "stretch" (the reference FVD code); same on square video.
        quantize: round frames to 8-bit levels before the network (as saved videos are).
        pad_short: allow T < 9 by repeating the last frame (protocol name gets a ``_pad`` suffix).
        chunk_size: clips per network forward, to bound memory.
        real_side: False builds no real-side states: the real statistics come from a metric that holds them
            (:meth:`set_real_stats` before ``compute``; one real side shared by several methods' metrics).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    feature_name = "i3d-kinetics400-logits"

    def __init__(
        self,
        num_videos: int,
        num_frames: int = 16,
        weights: str | os.PathLike | None = None,
        network: nn.Module | None = None,
        resize: ResizeMode = "crop",
        quantize: bool = True,
        pad_short: bool = False,
        chunk_size: int = 16,
        real_side: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_videos < 2:
            raise ValueError(f"num_videos must be >= 2 for a covariance, got {num_videos}")
        if num_frames < MIN_FRAMES and not pad_short:
            raise ValueError(f"FVD with I3D needs num_frames >= {MIN_FRAMES}, got {num_frames}; or pass pad_short=True")
        self.num_videos, self.num_frames, self.chunk_size = num_videos, num_frames, chunk_size
        self.resize, self.quantize, self.pad_short = resize, quantize, pad_short
        self.protocol = f"fvd{num_videos}_{num_frames}f" + ("_pad" if pad_short and num_frames < MIN_FRAMES else "")
        net = network if network is not None else build_i3d(weights)
        self.num_features = int(getattr(net, "num_features", 400))
        hide_module(self, "network", net)  # not a submodule: out of state_dict, DDP and .to()
        self._add_frechet_states(self.num_features, real=real_side)

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """Videos ``(B, T, 3, H, W)`` in [-1, 1] -> I3D features ``(B, D)`` float32."""
        if videos.dim() == 5 and videos.shape[1] != self.num_frames:
            raise ValueError(
                f"{self.protocol} takes clips of {self.num_frames} frames, got {videos.shape[1]}; "
                f"make a metric with num_frames={videos.shape[1]} for another protocol"
            )
        net = on_device(self.network, videos.device)
        out = []
        for clip in videos.split(self.chunk_size):
            x = i3d_preprocess(clip, self.resize, self.quantize, self.pad_short)  # (b, 3, T, 224, 224)
            out.append(net(x).float())  # (b, D)
        return torch.cat(out)  # (B, D)

    def preprocessing(self) -> dict:
        return {"resize": self.resize, "quantize": self.quantize, "pad_short": self.pad_short}

    def update(self, videos: torch.Tensor, real: bool) -> None:
        """Add a batch of videos ``(B, T, 3, H, W)`` in [-1, 1] to the real or the generated statistics."""
        self._check_real_update(real)
        self._accumulate(self.features(videos), real)

    def compute(self) -> torch.Tensor:
        """FVD (float64 scalar) of everything seen on all processes."""
        n_fake = int(self.fake_features_num_samples)
        if n_fake != self.num_videos:
            rank_zero_warn(
                f"{self.protocol}: computed on {n_fake} generated videos, the protocol names {self.num_videos}"
            )
        return self._frechet()

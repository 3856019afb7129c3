"""Stand-in feature networks for FVD / FID in tests: the pretrained I3D and InceptionV3 need weights files
(``make weights``), these need none. Each pools its input to 12 features, so the metrics' code runs end to end on
tiny clips; their values mean nothing."""

from __future__ import annotations

from torch import nn


class VideoPool(nn.Module):
    """FVD's stand-in: (B, 3, T, 224, 224) -> (B, 12)."""

    num_features = 12

    def forward(self, x):
        return nn.functional.adaptive_avg_pool3d(x, (1, 2, 2)).flatten(1)  # (B, 12)


class FramePool(nn.Module):
    """FID's stand-in: (N, 3, H, W) -> (N, 12)."""

    num_features = 12

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x, (2, 2)).flatten(1)  # (N, 12)


def stand_ins() -> dict[str, nn.Module]:
    """``{"fvd": VideoPool(), "fid": FramePool()}``, as the evaluation's ``networks`` argument takes them."""
    return {"fvd": VideoPool(), "fid": FramePool()}

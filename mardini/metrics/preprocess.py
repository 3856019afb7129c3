"""Input checks and pixel preprocessing shared by the metric networks (I3D, InceptionV3).

Every metric takes video in the project convention, ``(B, T, 3, H, W)`` float in [-1, 1]. The metric networks were
defined on 8-bit frames, so by default frames are first quantised to the 256 levels a saved video would have
(the way reference FID/FVD code sees generated samples), then resized.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ResizeMode = Literal["crop", "stretch"]
RANGE_TOL = 1e-3  # slack on the [-1, 1] check for float round-off


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def check_video(video: torch.Tensor, what: str = "video") -> None:
    """Raise a clear error unless ``video`` is a float ``(B, T, 3, H, W)`` tensor of finite values in [-1, 1]."""
    if not torch.is_tensor(video) or video.dim() != 5 or video.shape[2] != 3:
        shape = tuple(video.shape) if torch.is_tensor(video) else type(video).__name__
        raise ValueError(f"{what}: expected a (B, T, 3, H, W) tensor, got {shape}")
    if not video.is_floating_point():
        raise ValueError(f"{what}: expected float values in [-1, 1], got dtype {video.dtype}; map uint8 with x/127.5-1")
    bad = int((~torch.isfinite(video)).sum())  # NaN compares false: the range check below would let it through
    if bad:
        raise ValueError(f"{what}: {bad} of {video.numel()} values are not finite (NaN or inf); metrics need finite "
                         "pixels: find what produced them (a diverged model, an overflow in half precision)")
    lo, hi = video.min().item(), video.max().item()
    if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
        raise ValueError(
            f"{what}: values must lie in [-1, 1], got [{lo:.3f}, {hi:.3f}]; map [0, 1] with 2x-1, "
            f"uint8 with x/127.5-1, or clamp model outputs"
        )


def check_images(images: torch.Tensor, what: str = "images") -> None:
    """Raise a clear error unless ``images`` is a float ``(N, 3, H, W)`` tensor in [-1, 1]."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{what}: expected a (N, 3, H, W) tensor, got {shape}")
    check_video(images.unsqueeze(1), what)


# ------------------------------------------------------------------------------------------------
# Pixel transforms
# ------------------------------------------------------------------------------------------------
def to_uint8_levels(x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """[-1, 1] -> float in [0, 255]; rounded to integers when ``quantize`` (what a saved 8-bit frame holds)."""
    x = (x.float().clamp(-1, 1) + 1) * 127.5  # (..., H, W) in [0, 255]
    return x.round() if quantize else x


def resize_frames(frames: torch.Tensor, size: int, mode: ResizeMode = "crop") -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` frames to ``(N, C, size, size)``.

    ``crop``: shorter side to ``size`` (aspect kept), then centre crop. ``stretch``: both sides to ``size`` (what the
    reference FVD and FID code do; identical to ``crop`` on square frames). Bilinear with half-pixel centres and no
    antialiasing, as PyTorch ports of the metrics resize (StyleGAN-V's FVD); TF1's ``resize_bilinear`` in the original
    graphs uses corner-aligned source positions (``src = dst * in / out``), which shifts the image by a fraction of a
    source pixel (about 0.07 px from 256 to 224 or 299, 0.45 px from 32): a small offset from TF-reference figures.
    """
    if mode not in ("crop", "stretch"):
        raise ValueError(f"resize mode must be 'crop' or 'stretch', got {mode!r}")
    h, w = frames.shape[-2:]
    if (h, w) == (size, size):
        return frames
    if mode == "stretch":
        return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)  # (N, C, S, S)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False)  # (N, C, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return frames[..., top : top + size, left : left + size]  # (N, C, S, S)

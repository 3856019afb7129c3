"""Middle-frame ("MidF", VIDIM-Bench) reconstruction metrics: PSNR, SSIM, and LPIPS when its weights are supplied.

Frames in [-1, 1] are mapped to [0, 1] and scored with ``data_range=1`` (the same PSNR as [-1, 1] with range 2).
PSNR and SSIM are computed per image and averaged (not one PSNR of the pooled error). Each image's PSNR is capped at
``PSNR_CAP_DB`` = 100 dB, i.e. its MSE on [0, 1] is floored at 1e-10 (4e-10 on [-1, 1]): a frame reproduced exactly
scores 100 dB instead of making the mean infinite. The middle frame of T is index ``T // 2`` (index 4, the 5th of a 9-frame
window) unless ``frame_index`` says otherwise.

LPIPS needs torchvision ImageNet backbone weights, which torchvision would download at run time; here they must be
supplied as a file (e.g. ``alexnet-owt-7be5be79.pth``), checked against the sha256 prefix in its torchvision name
and served to torchvision from a temporary hub directory.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image import StructuralSimilarityIndexMeasure

from mardini.metrics.preprocess import check_video
from mardini.metrics.stats import hide_module, on_device
from mardini.weights import sha256_file

PSNR_CAP_DB = 100.0  # per-image PSNR cap: MSE floored at 1e-10 of the squared data range (1 on [0, 1])
LPIPS_BACKBONES = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights"),
                   "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights")}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# LPIPS from user-supplied weights (never downloads)
# ------------------------------------------------------------------------------------------------
def lpips_backbone_filename(net_type: str = "alex") -> str:
    """The file name torchvision expects for the LPIPS backbone (its hash prefix is checked on load)."""
    import torchvision

    if net_type not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net_type must be one of {sorted(LPIPS_BACKBONES)}, got {net_type!r}")
    weights_enum = getattr(torchvision.models, LPIPS_BACKBONES[net_type][1])
    return Path(urlparse(weights_enum.DEFAULT.url).path).name


def check_lpips_weights(backbone_weights: str | os.PathLike | None, net_type: str = "alex") -> str:
    """The sha256 of the LPIPS backbone file, checked against the prefix in torchvision's name for it.

    Raises:
        FileNotFoundError: when no file is given or it does not exist, saying which file to supply.
        ValueError: when the file is not the one torchvision expects.
    """
    expected = lpips_backbone_filename(net_type)
    if backbone_weights is None or not Path(backbone_weights).is_file():
        raise FileNotFoundError(
            f"LPIPS is off: it needs the torchvision ImageNet weights of its {net_type} backbone ({expected}), which "
            f"cannot be downloaded here. Copy that file from a machine with internet (it is torchvision's download, "
            f"e.g. ~/.cache/torch/hub/checkpoints/{expected}) and pass its path as lpips_weights "
            f"(got {backbone_weights!r})"
        )
    digest = sha256_file(backbone_weights)
    prefix = re.search(r"-([a-f0-9]+)\.", expected).group(1)  # torchvision names files by their sha256 prefix
    if not digest.startswith(prefix):
        raise ValueError(
            f"{backbone_weights} is not the {expected} torchvision expects "
            f"(sha256 {digest[:12]}..., expected {prefix}...)"
        )
    return digest


def build_lpips(backbone_weights: str | os.PathLike | None, net_type: str = "alex"):
    """torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` (inputs in [0, 1]) from a local backbone file.

    Args:
        backbone_weights: the torchvision ImageNet state dict of the backbone, e.g. ``alexnet-owt-7be5be79.pth``
            for ``net_type="alex"`` (the LPIPS linear layers ship inside torchmetrics).
    Raises:
        FileNotFoundError: when no file is given or it does not exist, saying which file to supply.
    """
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    check_lpips_weights(backbone_weights, net_type)
    expected = lpips_backbone_filename(net_type)
    old_hub = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="mardini-lpips-") as hub:
        (Path(hub) / "checkpoints").mkdir()
        (Path(hub) / "checkpoints" / expected).symlink_to(Path(backbone_weights).resolve())
        torch.hub.set_dir(hub)
        try:
            metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, normalize=True)
        finally:
            torch.hub.set_dir(old_hub)
    hide_module(metric, "net", metric.net)  # not a submodule: out of state_dict, DDP and .to()
    return metric


# ------------------------------------------------------------------------------------------------
# Middle-frame metrics
# ------------------------------------------------------------------------------------------------
def middle_frame(video: torch.Tensor, frame_index: int | None = None) -> torch.Tensor:
    """``(B, T, 3, H, W)`` -> frame ``T // 2`` (or ``frame_index``) ``(B, 3, H, W)``."""
    t = video.shape[1]
    i = t // 2 if frame_index is None else frame_index
    if not -t <= i < t:
        raise ValueError(f"frame_index {i} out of range for {t} frames")
    return video[:, i]  # (B, 3, H, W)


class CappedPSNR(Metric):
    """Per-image PSNR on [0, 1] (each image of ``(B, 3, H, W)`` over its pixels), each capped at ``cap`` dB (its
    MSE floored at ``10 ** (-cap / 10)``), averaged: one exact image cannot make the mean ``inf``.

    Keeps two running sums (float64), not one value per image as torchmetrics' ``PeakSignalNoiseRatio(dim=...,
    reduction="none")`` does (three tensors per batch, on the clips' device, for the whole evaluation)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, cap: float = PSNR_CAP_DB, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cap = cap
        self.add_state("psnr_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add images ``(B, 3, H, W)`` in [0, 1]."""
        psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, dim=(1, 2, 3), reduction="none")  # (B,)
        self.psnr_sum += psnr.clamp(max=self.cap).double().sum()
        self.images += psnr.numel()

    def compute(self) -> torch.Tensor:
        return self.psnr_sum / self.images  # mean over the images


class MidFrameMetrics(MetricCollection):
    """``midf_psnr`` (per image, capped at 100 dB), ``midf_ssim`` (and ``midf_lpips`` with ``lpips_weights``) on the
    middle frame; DDP-safe.

    ``update(preds, target)`` takes videos ``(B, T, 3, H, W)`` in [-1, 1]; ``compute()`` returns a dict.
    """

    def __init__(
        self, frame_index: int | None = None, lpips_weights: str | os.PathLike | None = None, lpips_net: str = "alex"
    ) -> None:
        metrics = {
            "psnr": CappedPSNR(),  # per image, capped at 100 dB, then mean
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),  # 11x11 Gaussian, sigma 1.5
        }
        if lpips_weights is not None:
            metrics["lpips"] = build_lpips(lpips_weights, lpips_net)
        super().__init__(metrics, prefix="midf_", compute_groups=False)
        self.frame_index = frame_index

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        check_video(preds, "MidF preds")
        check_video(target, "MidF target")
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape")
        p = (middle_frame(preds, self.frame_index).float().clamp(-1, 1) + 1) / 2  # (B, 3, H, W) in [0, 1]
        t = (middle_frame(target, self.frame_index).float().clamp(-1, 1) + 1) / 2  # (B, 3, H, W) in [0, 1]
        if "lpips" in self:
            on_device(self["lpips"].net, p.device)
        super().update(p, t)

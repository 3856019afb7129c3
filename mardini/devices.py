"""One check of a device string for every entry point (sampling, latent caching): torch knows it, the GPU is
there, and the code runs on it (not on Apple's MPS: :func:`check_supported`)."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None = CUDA when available, else CPU. A ValueError naming the fix for a string torch does not know,
    CUDA without a GPU, or a GPU index past the visible ones."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be cpu, cuda, cuda:N (a GPU's index) or auto, got {device!r}") from e
    check_supported(device, "--device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but torch finds no CUDA GPU here (torch {torch.__version__}, "
                         "CUDA build: " + str(torch.version.cuda) + "); use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                         f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


# float64 on the device: the diffusion schedule's alpha and sigma, DDIM's time grid, the fixed position features
UNSUPPORTED = {"mps": "Apple's MPS has no float64, in which the diffusion schedule, DDIM's time grid and the position "
                      "features are computed"}


def check_supported(device: torch.device, fix: str) -> None:
    """A ValueError naming why and ``fix`` (e.g. ``--device cpu``) for a device type the code cannot run on
    (:data:`UNSUPPORTED`); before, MPS failed at the first float64 tensor with torch's "Cannot convert a MPS Tensor to
    float64 dtype", naming neither the setting nor the fix."""
    why = UNSUPPORTED.get(device.type)
    if why is not None:
        raise ValueError(f"device {device} is not supported: {why}; use {fix}")

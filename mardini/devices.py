"""One check of a device string for every entry point (sampling, latent caching): torch knows it, and the GPU is
there."""

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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but torch finds no CUDA GPU here (torch {torch.__version__}, "
                         "CUDA build: " + str(torch.version.cuda) + "); use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                         f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device

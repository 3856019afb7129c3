"""Input checks shared by the diffusion modules, with messages that name the problem and the fix."""

from __future__ import annotations

import numbers

import torch


ETA_RANGE = "DDIM's eta is in [0, 1]: 0 deterministic, 1 ancestral"


def check_eta(eta, name: str = "eta") -> None:
    """Raise unless the DDIM ``eta`` is a real number in [0, 1] (a Python or NumPy number or a 0-d real tensor, not a
    bool), naming it ``name`` (e.g. a command's flag). Above 1 the step's noise scale ``c`` exceeds ``sigma_s``
    (:func:`mardini.diffusion.ddim.ddim_update`): more noise than the schedule allows, the estimate's share clamped
    away; inf gave an all-NaN video."""
    if torch.is_tensor(eta) and eta.dim() == 0 and not eta.is_complex() and eta.dtype != torch.bool:
        eta = eta.item()
    if isinstance(eta, bool) or not (isinstance(eta, numbers.Real) and 0 <= eta <= 1):
        raise ValueError(f"{name}={eta!r} is impossible: {ETA_RANGE}")


def check_latents(z: torch.Tensor, name: str = "latents") -> None:
    """Raise unless ``z`` is a floating ``(B, T, C, h, w)`` tensor."""
    if not torch.is_tensor(z) or z.dim() != 5 or not z.is_floating_point():
        shape = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
        raise ValueError(f"{name} must be a float tensor of shape (B, T, C, h, w), got {shape}")


def check_mask(mask: torch.Tensor, z: torch.Tensor) -> None:
    """Raise unless ``mask`` is a ``(B, T)`` bool frame mask (True = generate) matching latents ``z``."""
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a (B, T) bool tensor (True = generate), got "
            f"{mask.dtype if torch.is_tensor(mask) else type(mask).__name__}; build it with mardini.masking"
        )
    if tuple(mask.shape) != tuple(z.shape[:2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the latents' (B, T) = {tuple(z.shape[:2])}")


T_RANGE = "t must lie in [0, 1] (0 = clean, 1 = pure noise)"


def check_t(t: torch.Tensor, batch: int | None = None) -> None:
    """Raise unless ``t`` is a ``(B,)`` float tensor of times in [0, 1] (B = ``batch`` when given).

    The range of a CPU tensor is checked here; that of a GPU tensor by ``torch._assert_async``, without the host
    sync that reading it back would cost at every call: a time out of range there fails as a device-side assert
    carrying this message, at the next sync.
    """
    ok = torch.is_tensor(t) and t.dim() == 1 and t.is_floating_point()
    if not ok or (batch is not None and t.shape[0] != batch):
        shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        want = "(B,)" if batch is None else f"(B,) = ({batch},)"
        raise ValueError(f"t must be a float tensor of shape {want}, one time per clip; got {shape}")
    outside = ((t < 0) | (t > 1)).any()  # () bool
    if t.device.type != "cpu":
        torch._assert_async(~outside, T_RANGE)
    elif bool(outside):
        raise ValueError(f"{T_RANGE}, got min {t.min():.4g} max {t.max():.4g}")


def check_time(value: float, name: str = "t") -> None:
    """Raise unless the Python number ``value`` (a time of a sampling grid) lies in [0, 1]; checked on the host, so
    the tensors made from it need no device check."""
    if not 0 <= value <= 1:
        raise ValueError(f"{T_RANGE.replace('t must', f'{name} must', 1)}, got {value!r}")


def frame_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool -> ``(B, T, 1, 1, 1)`` so it broadcasts over latents."""
    return mask[:, :, None, None, None]  # (B, T, 1, 1, 1)

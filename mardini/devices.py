"""One check of a device string for every entry point (sampling, evaluation, latent caching): torch knows it, the
device is there, and the code runs on it (not on Apple's MPS, nor an Intel GPU without float64:
:func:`check_supported`). README, "Devices other than NVIDIA's", gives the support level per device."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None = CUDA when available, else CPU. A ValueError naming the fix for a string torch does not know,
    a device type torch finds no device of here (CUDA without a GPU, ``xpu`` without an Intel GPU), an index past the
    visible devices, or a device the code cannot run on."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be cpu, cuda, cuda:N (a GPU's index), xpu, xpu:N or auto, got {device!r}") from e
    check_supported(device, "--device cpu")
    if device.type != "cpu":
        _check_present(device)
    check_float64(device, "--device cpu")
    return device


def _check_present(device: torch.device) -> None:
    """A ValueError naming the fix unless torch finds a device of ``device``'s type here, and one of its index."""
    if device.type not in ACCELERATORS:
        raise ValueError(f"device {device}: the code runs on cpu, cuda (NVIDIA, or AMD under ROCm) and xpu (Intel) "
                         f"only; use --device cpu or auto")
    backend, name = getattr(torch, device.type), ACCELERATORS[device.type]
    if not backend.is_available():
        raise ValueError(f"device {device} asked for, but torch finds no {name} here (torch {torch.__version__}, "
                         f"{_build(device.type)}); use --device cpu or auto")
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {device}: only {count} {name}(s) are visible; "
                         f"use {device.type}:0 .. {device.type}:{count - 1}")


ACCELERATORS = {"cuda": "CUDA GPU", "xpu": "Intel GPU (XPU)"}  # what --device takes beside cpu (and mps, refused)


def _build(device_type: str) -> str:
    """Which GPU build this torch is: ``CUDA build: 12.4``, ``ROCm build: 6.2`` (torch calls AMD GPUs ``cuda``),
    ``XPU build: None`` (none)."""
    if device_type == "xpu":
        return f"XPU build: {getattr(torch.version, 'xpu', None)}"
    if torch.version.hip:
        return f"ROCm build: {torch.version.hip}"
    return f"CUDA build: {torch.version.cuda}"


# float64 on the device: the diffusion schedule's alpha and sigma, DDIM's time grid, the fixed position features
FLOAT64_USES = "the diffusion schedule, DDIM's time grid and the position features are computed"
UNSUPPORTED = {"mps": f"Apple's MPS has no float64, in which {FLOAT64_USES}"}


def check_supported(device: torch.device, fix: str) -> None:
    """A ValueError naming why and ``fix`` (e.g. ``--device cpu``) for a device type the code cannot run on
    (:data:`UNSUPPORTED`); before, MPS failed at the first float64 tensor with torch's "Cannot convert a MPS Tensor to
    float64 dtype", naming neither the setting nor the fix."""
    why = UNSUPPORTED.get(device.type)
    if why is not None:
        raise ValueError(f"device {device} is not supported: {why}; use {fix}")


def check_float64(device: torch.device, fix: str) -> None:
    """A ValueError naming ``fix`` for an Intel GPU without float64 (Arc and other client GPUs; the Data Center GPU
    Max has it): the first float64 tensor would fail there, or be emulated where the driver is told to."""
    if device.type == "xpu" and not torch.xpu.get_device_properties(device).has_fp64:
        name = torch.xpu.get_device_name(device)
        raise ValueError(f"device {device} ({name}) is not supported: it has no float64, in which {FLOAT64_USES}; "
                         f"use {fix}")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA or Intel GPU; nothing to wait for on the CPU), so that a host
    clock read next times it."""
    if device.type in ACCELERATORS:
        getattr(torch, device.type).synchronize(device)


def device_name(device: torch.device) -> str | None:
    """The GPU's name for a CUDA (NVIDIA or AMD) or Intel GPU, else None."""
    return getattr(torch, device.type).get_device_name(device) if device.type in ACCELERATORS else None


def gpu_bf16_advice(device: torch.device, what: str, fix: str) -> str | None:
    """What to set where ``device`` is an NVIDIA GPU without native bf16 arithmetic (compute capability below 8.0:
    Volta, Turing), else None. torch runs bf16 there emulated, slower than fp32, and its SDPA and flash-attn kernels
    take no bf16; AMD GPUs under ROCm (MI100 and newer) and Intel GPUs have bf16. ``what`` names the bf16 setting and
    ``fix`` the other one."""
    if device.type != "cuda" or torch.version.hip:
        return None
    props = torch.cuda.get_device_properties(device)
    if props.major >= 8:
        return None
    return (f"{what} on {device} ({props.name}, compute capability {props.major}.{props.minor}): this GPU has no "
            f"native bf16 arithmetic, torch emulates it, slower than fp32; {fix}")

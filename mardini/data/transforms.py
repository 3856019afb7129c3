"""Spatial transforms: crop to the target aspect ratio (random or centre), resize, and pixel scaling.

:func:`resize_video` is THE resize of the project: the loader uses it to reach the training resolution, the
Lightning modules use it to make the planner's low-resolution copy, and the latent cache uses it too, so the
three always agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Size = int | tuple[int, int]


def as_size(size: Size) -> tuple[int, int]:
    """``int`` -> square ``(s, s)``; ``(H, W)`` as is. Sizes must be >= 1."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"resolution must be >= 1, got {size}")
    return h, w


# --------------------------------------------------------------------------------------------------
# Resize (the one everyone uses)
# --------------------------------------------------------------------------------------------------


def resize_video(video: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear, anti-aliased resize of every frame.

    Args:
        video: ``(B, T, C, H, W)`` float (any range; [-1, 1] by convention).
        size: ``int`` for a square ``(size, size)`` output, or ``(h, w)``. The aspect ratio is not kept:
            crop first (:func:`crop_box`) when it differs.
    Returns ``(B, T, C, h, w)`` of the same dtype; the input itself when it already has that size.
    """
    if video.dim() != 5:
        raise ValueError(f"resize_video expects (B, T, C, H, W), got shape {tuple(video.shape)}")
    h, w = as_size(size)
    b, t, c, hi, wi = video.shape
    if (hi, wi) == (h, w):
        return video
    dtype = video.dtype
    x = video.reshape(b * t, c, hi, wi)  # (B*T, C, H, W)
    if not x.is_floating_point():
        x = x.float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)  # (B*T, C, h, w)
    return x.reshape(b, t, c, h, w).to(dtype if dtype.is_floating_point else torch.float32)  # (B, T, C, h, w)


def planner_size(height: int, width: int, resolution: Size) -> tuple[int, int]:
    """``(h, w)`` of the planner's low-resolution copy of ``height x width`` frames: an int is the short side, the
    aspect ratio kept (``resolution x resolution`` for square frames), so plan and generator token grids share it;
    an ``(h, w)`` pair is taken as it is."""
    if not isinstance(resolution, int):
        return as_size(resolution)
    short = min(height, width)
    return max(1, round(height * resolution / short)), max(1, round(width * resolution / short))


def unsplit_input(height: int, width: int, factor: int, patches: dict[str, int], planner_resolution: Size,
                  plan_layout: bool = True) -> tuple[str, tuple[int, int], int] | None:
    """Why ``height x width`` frames cannot feed the networks of ``patches`` (``{"generator" | "planner": patch
    size}``), or None when they can: ``(name, its input size, the multiple its sides need)`` for the first network
    whose input does not split into its tokens, where the planner's input is its copy of the frames
    (:func:`planner_size`) and the multiple is the autoencoder's ``factor`` x the patch; ``("plan grid", the
    planner's input size, its multiple)`` when the planner's token grid (more than one token) has not exactly the
    aspect ratio of the generator's, which the generator needs to lay a frame's plan tokens out on its own grid
    (``plan_layout``: its cross-attention RoPE, ``models.generator.plan_grid``)."""
    sizes = {"generator": (height, width), "planner": planner_size(height, width, planner_resolution)}
    grids = {}
    for name in ("generator", "planner"):
        if name in patches:
            (h, w), step = sizes[name], factor * patches[name]
            if h % step or w % step:
                return name, (h, w), step
            grids[name] = (h // step, w // step)
    if plan_layout and len(grids) == 2:
        (gh, gw), (ph, pw) = grids["generator"], grids["planner"]
        if ph * pw > 1 and ph * gw != pw * gh:
            return "plan grid", sizes["planner"], factor * patches["planner"]
    return None


def planner_sides(height: int, width: int, factor: int, patches: dict[str, int], plan_layout: bool = True) -> list[int]:
    """The ``planner_resolution`` short sides (at most the frames' short side) with which ``height x width`` frames
    feed the networks of ``patches`` (:func:`unsplit_input` finds nothing) with a plan of more than one token,
    smallest first."""
    step = factor * patches.get("planner", 1)
    return [s for s in range(1, min(height, width) + 1)
            if unsplit_input(height, width, factor, patches, s, plan_layout) is None
            and np.prod(planner_size(height, width, s)) > step * step]  # a plan of more than one token


def nearest_fitting_size(height: int, width: int, factor: int, patches: dict[str, int], planner_resolution: Size,
                         plan_layout: bool = True, reach: int = 8) -> tuple[int, int] | None:
    """The size nearest to ``height x width`` (fewest pixels of change, then the larger) whose frames feed the
    networks of ``patches`` at ``planner_resolution`` (:func:`unsplit_input`), among multiples of the generator's
    token size within ``reach`` tokens of each side; None when none does."""
    step = factor * patches.get("generator", 1)
    around = lambda n: range(max(step, (n // step - reach) * step), (n // step + reach + 1) * step + 1, step)  # noqa: E731
    fits = [(h, w) for h in around(height) for w in around(width)
            if min(h, w) >= (planner_resolution if isinstance(planner_resolution, int) else 1)
            and unsplit_input(h, w, factor, patches, planner_resolution, plan_layout) is None]
    return min(fits, key=lambda s: (abs(s[0] - height) + abs(s[1] - width), -s[0] * s[1]), default=None)


def planner_copy(video: torch.Tensor, resolution: Size) -> torch.Tensor:
    """The planner's input: ``video (B, T, C, H, W)`` resized to :func:`planner_size` (bilinear, anti-aliased)."""
    return resize_video(video, planner_size(video.shape[-2], video.shape[-1], resolution))  # (B, T, C, h', w')


# --------------------------------------------------------------------------------------------------
# Crop window
# --------------------------------------------------------------------------------------------------


def crop_box(
    height: int,
    width: int,
    size: Size,
    mode: str = "center",
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (1.0, 1.0),
) -> tuple[int, int, int, int]:
    """The window ``(top, left, crop_h, crop_w)`` to cut before resizing to ``size``.

    The window has the aspect ratio of ``size`` and spans a fraction ``s`` of the largest such window
    (``s ~ U[scale]`` for ``random``, ``scale[1]`` for ``center``); ``random`` places it uniformly with
    ``generator``, ``center`` centres it.
    """
    if mode not in ("random", "center"):
        raise ValueError(f"crop mode must be 'random' or 'center', got {mode!r}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    th, tw = as_size(size)
    full_h = min(height, round(width * th / tw))  # largest window of the target aspect ratio
    full_w = min(width, round(height * tw / th))
    if mode == "random":
        s = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator))
    else:
        s = scale[1]
    ch, cw = max(1, round(full_h * s)), max(1, round(full_w * s))
    if mode == "random":
        top = int(torch.randint(0, height - ch + 1, (), generator=generator))
        left = int(torch.randint(0, width - cw + 1, (), generator=generator))
    else:
        top, left = (height - ch) // 2, (width - cw) // 2
    return top, left, ch, cw


def to_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (same shape)."""
    return frames.float().div_(127.5).sub_(1.0)


def crop_and_resize(
    frames: np.ndarray | torch.Tensor,
    size: Size,
    mode: str = "center",
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """uint8 ``(T, H, W, 3)`` -> float32 ``(T, 3, h, w)`` in [-1, 1], and the crop window used.

    The crop and the scaling to [-1, 1] run in numpy (single-threaded: cheap on small clips, and no torch
    thread-pool contention when the loader runs in the training process); the resize is :func:`resize_video`.
    """
    arr = frames.numpy() if isinstance(frames, torch.Tensor) else frames
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {arr.dtype} {arr.shape}")
    t, h, w, _ = arr.shape
    top, left, ch, cw = crop_box(h, w, size, mode, generator, scale)
    x = arr[:, top : top + ch, left : left + cw].transpose(0, 3, 1, 2)  # (T, 3, ch, cw) uint8 view
    x = x.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)  # (T, 3, ch, cw) in [-1, 1]
    video = resize_video(torch.from_numpy(x)[None], size)[0]  # (T, 3, h, w)
    return video, (top, left, ch, cw)

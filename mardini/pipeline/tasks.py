"""The named MarDini tasks, all built on ``MarDiniPipeline.generate`` (PAPER.md §4.1-4.3).

Each function takes the pipeline first and passes ``steps``, ``eta``, ``guidance_scale``, ``seed``, ``num_samples``,
``progress`` through ``**kw``. The one-window tasks take the window's length as ``frames``; the multi-window ones
(``generate_long``, ``long_video``, ``slow_motion``) take ``window`` (frames per window, at most the trained one).
Multi-window tasks derive one seed per (clip, sample, window) from ``seed``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from mardini.diffusion.guidance import IMAGE_TO_VIDEO_GUIDANCE
from mardini.masking import expansion_mask, image_to_video_mask, interpolation_mask, validate_mask


def _frames(pipe, frames: int | None, name: str = "frames") -> int:
    if frames is not None and not _is_count(frames):
        raise ValueError(f"{name} must be an integer (frames in a window), got {frames!r}")
    t = pipe.window if frames is None else int(frames)
    if t < 2:
        raise ValueError(f"a window needs at least 2 frames (one given, one generated), got {t}")
    return t


LENGTH_KEYWORDS = {  # a window's length: the one-window tasks' keyword, the multi-window tasks'
    "frames": "frames= (the window's length)",
    "window": "window= (frames per window, not the output's length)",
}


def _own_keyword(kw: dict, task: str, own: str) -> None:
    """A TypeError naming ``task``'s keyword for a window's length (``own``, :data:`LENGTH_KEYWORDS`) when the other
    tasks' one is passed: it would fall through ``**kw`` into ``generate``."""
    other = "window" if own == "frames" else "frames"
    if other in kw:
        raise TypeError(f"{task}() takes {LENGTH_KEYWORDS[own]}, not {other}= (got {other}={kw[other]!r})")


def _window_length(pipe, window: int | None, task: str) -> int:
    """Frames per window of a multi-window task: ``window`` (default: the trained one), at most the trained one."""
    w = _frames(pipe, window, "window")
    if w > pipe.window:
        raise ValueError(f"window must be <= {pipe.window} (the checkpoint's trained window), got {w}; {task} goes "
                         "window by window, so leave window out to use the trained one")
    return w


def _context(context, w: int) -> int:
    """Frames carried into each next window: ``context`` (default: half the window), an integer in [1, w - 1]."""
    context = max(1, w // 2) if context is None else context
    if not _is_count(context) or not 1 <= context < w:
        raise ValueError(f"context must be an integer in [1, window - 1] = [1, {w - 1}], got {context!r}")
    return int(context)


def _one_window(pipe, t: int, task: str, instead: str) -> None:
    """A ValueError naming the multi-window call ``instead`` when one-window ``task`` asks for ``t`` frames, more
    than the trained window."""
    if t > pipe.window:
        raise ValueError(f"{task} fills one window: frames={t} is more than the checkpoint's trained window of "
                         f"{pipe.window} frames; for {t} frames use {instead}, which goes window by window")


def _check_pixels(x, name: str, what: str) -> None:
    """A ValueError naming the argument ``name`` unless ``x`` is a float tensor (``what``: its shapes)."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        got, fix = type(x).__name__, " (a torch tensor: convert with torch.as_tensor)"
        if torch.is_tensor(x):
            got, fix = x.dtype, " (uint8 frames: convert with x / 127.5 - 1)" if x.dtype == torch.uint8 else ""
        raise ValueError(f"{name} must be a float {what} in [-1, 1], got {got}{fix}")


def _images(x: torch.Tensor, name: str) -> torch.Tensor:
    """``(3, H, W)`` or ``(B, 3, H, W)`` -> ``(B, 3, H, W)``."""
    _check_pixels(x, name, "image (B, 3, H, W)")
    x = x[None] if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be (3, H, W) or (B, 3, H, W), got {tuple(x.shape)}")
    return x


def _clips(x: torch.Tensor, name: str) -> torch.Tensor:
    """``(3, H, W)`` (one frame), ``(n, 3, H, W)`` (n frames of one clip) or ``(B, n, 3, H, W)`` -> the last."""
    _check_pixels(x, name, "video (B, n, 3, H, W)")
    x = x[None, None] if x.dim() == 3 else x[None] if x.dim() == 4 else x
    if x.dim() != 5 or x.shape[2] != 3:
        raise ValueError(f"{name} must be (3, H, W), (n, 3, H, W) or (B, n, 3, H, W), got {tuple(x.shape)}")
    return x


def _is_int(x) -> bool:
    """An integer of any kind: ``int``, a numpy integer, a 0-d integer tensor."""
    return isinstance(x, numbers.Integral) or (torch.is_tensor(x) and x.dim() == 0 and not x.is_floating_point())


def _is_count(x) -> bool:
    """An integer (:func:`_is_int`) that is no bool."""
    return _is_int(x) and not isinstance(x, bool) and not (torch.is_tensor(x) and x.dtype == torch.bool)


def check_count(value, name: str, least: int) -> int:
    """``value`` as an int; a ValueError naming ``name`` unless it is an integer (:func:`_is_count`) >= ``least``."""
    if not _is_count(value) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def per_clip_seeds(seed, batch: int) -> list[int]:
    """One seed per clip: an integer (:func:`_is_int`) gives clip b ``seed + b``; a list (tuple, 1-d tensor or
    array) of ``batch`` integers gives its own seeds. Seeds must be in [0, 2**63)."""
    if _is_int(seed):
        seeds = [int(seed) + b for b in range(batch)]
    elif isinstance(seed, (list, tuple, torch.Tensor, np.ndarray)) and all(_is_int(s) for s in seed):
        seeds = [int(s) for s in seed]
    else:
        raise ValueError(f"seed must be an int or a list of ints, one per clip, got {seed!r}")
    if len(seeds) != batch:
        raise ValueError(f"seed must be an int or a list of ints, one per clip ({batch}), got {len(seeds)} seeds")
    if not all(0 <= s < 2**63 for s in seeds):
        raise ValueError(f"seeds must be in [0, 2**63), got {seed!r}" + (f" (clip b uses seed + b, up to {seeds[-1]})"
                                                                         if _is_int(seed) else ""))
    return seeds


def _seeds(seed, batch: int, *salt: int) -> list[int]:
    """Per-clip seeds ``seed + b`` (or the given list), mixed with a window salt."""
    base = per_clip_seeds(seed, batch)
    return [hash((int(s), *salt)) & 0x7FFF_FFFF for s in base] if salt else base


def _window(pipe, given: torch.Tensor, mask_row: torch.Tensor, **kw) -> torch.Tensor:
    """Run ``generate`` on a window whose given frames are ``given (B, T, 3, H, W)`` where ``mask_row (T,)`` is False."""
    mask = mask_row[None].expand(given.shape[0], -1).clone()  # (B, T)
    return pipe.generate(given, mask, **kw)


def _place(batch_like: torch.Tensor, frames: int, items: dict[int, torch.Tensor]) -> torch.Tensor:
    """A ``(B, frames, 3, H, W)`` zero video with ``items[i] (B, 3, H, W)`` at frame i."""
    b, _, h, w = next(iter(items.values())).shape
    video = batch_like.new_zeros(b, frames, 3, h, w)  # (B, T, 3, H, W)
    for i, img in items.items():
        video[:, i] = img
    return video


# --------------------------------------------------------------------------------------------------
# One window
# --------------------------------------------------------------------------------------------------


def interpolate(pipe, first: torch.Tensor, last: torch.Tensor, frames: int | None = None, **kw) -> torch.Tensor:
    """First and last frames given, the middle generated: ``(B*k, frames, 3, H, W)`` (no guidance in the paper)."""
    _own_keyword(kw, "interpolate", "frames")
    first, last = _images(first, "first"), _images(last, "last")
    if first.shape != last.shape:
        raise ValueError(f"first {tuple(first.shape)} and last {tuple(last.shape)} must have the same shape")
    t = _frames(pipe, frames)
    _one_window(pipe, t, "interpolate", f"generate_long(video, interpolation_mask({t})) (sample.py: generate "
                f"--images FIRST LAST --keep 0,{t - 1})")
    return _window(pipe, _place(first, t, {0: first, t - 1: last}), interpolation_mask(t), **kw)


def image_to_video(pipe, image: torch.Tensor, frames: int | None = None, index: int = 0, **kw) -> torch.Tensor:
    """One frame given at ``index`` (negative from the end): ``(B*k, frames, 3, H, W)``. ``guidance_scale``
    defaults to the paper's 2.5 with a planner (as ``sample.py`` and the evaluation), 1 without one (a generation
    warm-up samples with the null plan, which cannot be guided)."""
    _own_keyword(kw, "image_to_video", "frames")
    kw.setdefault("guidance_scale", image_to_video_guidance(pipe))
    image, t = _images(image, "image"), _frames(pipe, frames)
    mask = image_to_video_mask(t, index)  # validates the index
    _one_window(pipe, t, "image_to_video", f"generate_long(video, image_to_video_mask({t}, {index})) (sample.py: "
                f"generate --images IMAGE --keep {index % t} --frames {t})")
    return _window(pipe, _place(image, t, {int((~mask).nonzero()[0]): image}), mask, **kw)


def image_to_video_guidance(pipe) -> float:
    """The default guidance scale of image-to-video: the paper's 2.5 with a planner, 1 (none) without one."""
    return IMAGE_TO_VIDEO_GUIDANCE if pipe.planner is not None else 1.0


def expand(pipe, prefix: torch.Tensor, frames: int | None = None, **kw) -> torch.Tensor:
    """A prefix of n frames given, continued to ``frames`` (one window): ``(B*k, frames, 3, H, W)``."""
    _own_keyword(kw, "expand", "frames")
    prefix, t = _clips(prefix, "prefix"), _frames(pipe, frames)
    n = prefix.shape[1]
    _one_window(pipe, t, "expand", f"long_video(prefix, total_frames={t}) (sample.py: long_video --total {t})")
    if n >= t:
        raise ValueError(f"a prefix of {n} frames leaves nothing to generate in a window of {t} frames; expand fills "
                         "one window: give fewer frames, or use long_video to continue it over more windows")
    mask = expansion_mask(t, n)
    video = torch.cat([prefix, prefix.new_zeros(prefix.shape[0], t - n, *prefix.shape[2:])], dim=1)  # (B, T, 3, H, W)
    return _window(pipe, video, mask, **kw)


# --------------------------------------------------------------------------------------------------
# Many windows
# --------------------------------------------------------------------------------------------------


def long_video(pipe, prefix: torch.Tensor, total_frames: int, context: int | None = None,
               window: int | None = None, seed=0, num_samples: int = 1, **kw) -> torch.Tensor:
    """Autoregressive expansion: each window gives the last ``context`` frames so far and generates the rest.

    :func:`generate_long`'s windows on the expansion mask (prefix given), every window full length, also when
    ``total_frames`` fits one: the last window's frames past ``total_frames`` are generated and dropped, so a
    longer ``total_frames`` keeps the frames of a shorter one. (Before, the last window was cut short, and the
    first gave up to ``window - 1`` prefix frames, not ``context``.)

    Args:
        prefix: ``(B, n, 3, H, W)``, ``(n, 3, H, W)`` or one image ``(3, H, W)``. A 4-D prefix is n frames of
            one clip, unlike the ``(B, 3, H, W)`` images of :func:`interpolate` / :func:`image_to_video`.
        total_frames: length of the output, > n. context: frames carried into each next window
            (default: half the window). window: frames per window (default: the trained window).
    Returns ``(B*k, total_frames, 3, H, W)``; the prefix frames are the inputs.
    """
    _own_keyword(kw, "long_video", "window")
    prefix, w = _clips(prefix, "prefix"), _window_length(pipe, window, "long_video")
    context, n = _context(context, w), prefix.shape[1]
    if not _is_count(total_frames) or total_frames <= n:
        raise ValueError(f"total_frames must be an integer > the {n} given frames, got {total_frames!r}")
    total_frames, num_samples = int(total_frames), check_count(num_samples, "num_samples", 1)
    video = torch.cat([prefix, prefix.new_zeros(prefix.shape[0], total_frames - n, *prefix.shape[2:])],
                      dim=1)  # (B, total_frames, 3, H, W)
    return _by_windows(pipe, video, expansion_mask(total_frames, n), w, context, seed, num_samples, **kw)


def window_schedule(mask: torch.Tensor, window: int, context: int | None = None) -> list[tuple[int, torch.Tensor]]:
    """The windows :func:`generate_long` samples for one clip's mask ``(T,)`` (True = generate), in order: per
    window its first frame ``s`` (negative in the backward pass) and its mask ``(window,)`` over frames
    ``s .. s + window - 1``. Frames outside ``[0, T)`` are virtual: generated, then dropped.

    Forward, while a frame after the first given one (k0) is unknown: with u the first such frame, the window
    starts at ``u - min(context, u)``, or later where that reaches the next given frame g after u without losing
    every known frame before u (``g - window + 1 <= u - 1``): then at ``max(u - min(context, u), g - window + 1)``,
    so that the frames before a given one are generated seeing it. Where a given frame b lies past the window,
    the window keeps only its generated frames up to ``max(u, b - window + min(context, window - 2))`` (the
    others are dropped and generated again by a later window), so the frame before every given frame is
    generated in a window that holds that given frame (for windows of 3 frames or more). Backward, while a frame before k0 is unknown: with v the last such frame,
    the window ends ``min(context, T - 1 - v)`` frames past v. In every window the known frames (given, or
    generated by an earlier window) are given and the unknown ones generated. ``context`` defaults to half the
    window.
    """
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError(f"mask must be a (T,) bool tensor (True = generate), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    validate_mask(mask[None])
    return [(s, m) for _, s, m in _schedule(mask.cpu(), window, _context(context, window))]


def _schedule(mask: torch.Tensor, window: int, context: int):
    """:func:`window_schedule` with each window's seed salt: ``(i,)`` for the i-th forward window (as
    :func:`long_video`'s), ``(j, 1)`` for the j-th backward one, so that neither pass's seeds depend on the other's
    length. Yields ``(salt, s, mask)``."""
    t = mask.shape[0]
    known = (~mask).tolist()
    k0 = known.index(True)

    def take(s: int, keep_until: int | None = None) -> torch.Tensor:
        frames = range(s, s + window)
        m = torch.tensor([not (0 <= i < t and known[i]) for i in frames])  # (window,) True = generate
        for i in frames:
            if 0 <= i < t and (keep_until is None or i <= keep_until):
                known[i] = True
        return m

    index = 0
    while not all(known[k0:]):  # forward: continue past the first unknown frame after k0
        u = known.index(False, k0)
        s = u - min(context, u)
        g = next((i for i in range(u + 1, t) if known[i]), None)  # the next given frame, if any
        if g is not None and g - window + 1 <= u - 1:  # reachable with a known frame before u kept
            s = max(s, g - window + 1)
        beyond = next((i for i in range(s + window, t) if known[i]), None)  # the first given frame past the window
        keep_until = None if beyond is None else max(u, beyond - window + min(context, window - 2))
        yield (index,), s, take(s, keep_until)
        index += 1
    index = 0
    while not all(known[:k0]):  # backward: the mirror image, before k0
        v = max(i for i in range(k0) if not known[i])
        s = v + 1 + min(context, t - 1 - v) - window
        yield (index, 1), s, take(s)
        index += 1


def _long_mask(mask, b: int, t: int) -> torch.Tensor:
    """The one row ``(T,)`` of a :func:`generate_long` mask: ``(T,)``, or ``(B, T)`` with equal rows."""
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.dim() not in (1, 2) or mask.shape[-1] != t \
            or (mask.dim() == 2 and mask.shape[0] != b):
        raise ValueError(f"mask must be a ({t},) or ({b}, {t}) bool tensor (True = generate), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    rows = mask.reshape(-1, t).cpu()  # (B or 1, T)
    differ = [i for i in range(1, rows.shape[0]) if not torch.equal(rows[i], rows[0])]
    if differ:
        raise ValueError(f"mask rows {differ} differ from row 0: generate_long runs one window schedule for the "
                         "whole batch; call it once per group of clips with the same mask")
    validate_mask(rows[:1])
    return rows[0]


def _by_windows(pipe, video: torch.Tensor, mask: torch.Tensor, w: int, context: int, seed, num_samples: int,
                **kw) -> torch.Tensor:
    """Sample ``video (B, T, 3, H, W)`` where ``mask (T,)`` is True over the windows of :func:`window_schedule`,
    each a full ``w``-frame window seeded per (clip, sample, window): ``(B*k, T, 3, H, W)`` float32."""
    seeds = _seeds(seed, video.shape[0])
    t = video.shape[1]
    out = video.float().repeat_interleave(num_samples, 0)  # (B*k, T, 3, H, W), a copy
    row_seeds = [(s * 1_000_003 + j) % 2**63 for s in seeds for j in range(num_samples)]  # per (clip, sample)
    for salt, s, window_mask in _schedule(mask, w, context):
        lo, hi = max(s, 0), min(s + w, t)  # the window's real frames
        given = out.new_zeros(out.shape[0], w, *out.shape[2:])  # (B*k, w, 3, H, W), virtual frames zero
        given[:, lo - s : hi - s] = out[:, lo:hi]
        clip = _window(pipe, given, window_mask, seed=_seeds(row_seeds, len(row_seeds), *salt),
                       **kw)  # (B*k, w, 3, H, W)
        out[:, lo:hi] = clip[:, lo - s : hi - s]  # given frames come back as they went in
    return out


def generate_long(pipe, video: torch.Tensor, mask: torch.Tensor, context: int | None = None,
                  window: int | None = None, seed=0, num_samples: int = 1, **kw) -> torch.Tensor:
    """Any mask over more frames than a window, sampled window by window (:func:`window_schedule`).

    Every window has the full length ``window``. Forward, for the unknown frames after the first given frame
    k0: the window starts ``min(context, u)`` frames before the first unknown frame u; backward, for those before
    k0: the mirror image, the window ends ``min(context, T - 1 - v)`` frames past the last unknown frame v (still
    sampled in time order, its given frames at its end). In each window the known frames (given, or generated by
    an earlier window) are given and the unknown ones generated; frames of a window past the video's ends are
    virtual (generated and dropped), so more frames to generate after a mask that ends with generated frames
    leave its frames as they were. Each window's seeds are those of the clip and sample salted by the window's
    index in its pass (forward windows as :func:`long_video`'s), so a clip's video depends on its batch only by
    float rounding.

    Args:
        video: ``(B, T, 3, H, W)`` (or one clip ``(T, 3, H, W)``) in [-1, 1]; masked frames' content is ignored.
        mask: ``(T,)`` or ``(B, T)`` bool, True = generate, the same for every clip.
        context: known frames before (after, backward) the frames a window generates (default: half the window).
        window: frames per window (default: the trained window).
    Returns ``(B*k, T, 3, H, W)`` float32; given frames are the inputs. For ``T <= window`` this is
    :meth:`~mardini.pipeline.MarDiniPipeline.generate`'s output (it is called).
    """
    _own_keyword(kw, "generate_long", "window")
    video, w = _clips(video, "video"), _window_length(pipe, window, "generate_long")
    context, num_samples = _context(context, w), check_count(num_samples, "num_samples", 1)
    b, t = video.shape[:2]
    row = _long_mask(mask, b, t)  # (T,)
    if t <= w:  # one window
        return pipe.generate(video, row[None].expand(b, -1).clone(), seed=seed, num_samples=num_samples, **kw)
    return _by_windows(pipe, video, row, w, context, seed, num_samples, **kw)


def slow_motion(pipe, video: torch.Tensor, factor: int = 2, window: int | None = None, seed=0,
                num_samples: int = 1, **kw) -> torch.Tensor:
    """Hierarchical interpolation: each level doubles the frame rate by generating one frame between neighbours.

    A level lays the frames so far at the even indices of the new sequence and fills the odd ones, window by
    window (an odd window of at most the trained length, its ends given, windows sharing their end frames);
    all windows of a level run as one batch. ``log2(factor)`` levels.

    Args:
        video: ``(B, n, 3, H, W)`` or ``(n, 3, H, W)``, n >= 2. factor: 2, 4, 8, ...
    Returns ``(B*k, (n - 1) * factor + 1, 3, H, W)``; the input frames are kept at every ``factor``-th index.
    """
    _own_keyword(kw, "slow_motion", "window")
    video = _clips(video, "video")
    if not _is_count(factor) or factor < 2 or factor & (factor - 1):
        raise ValueError(f"factor must be a power of 2 (2, 4, 8, ...), got {factor!r}")
    factor, num_samples = int(factor), check_count(num_samples, "num_samples", 1)
    if video.shape[1] < 2:
        raise ValueError(f"slow motion needs at least 2 frames, got {video.shape[1]}")
    w = _window_length(pipe, window, "slow_motion")
    odd = w if w % 2 else w - 1  # odd, so that given frames sit at both ends
    if odd < 3:
        asked = f"the checkpoint's trained window of {w} frames" if window is None else f"window={w}"
        fix = "a checkpoint trained on 3 or more frames" if pipe.window < 3 else \
            f"pass window >= 3, or leave it out for the checkpoint's trained window of {pipe.window}"
        raise ValueError(f"slow motion needs an odd window of at least 3 frames (given frames at both ends); "
                         f"{asked}, made odd, is {odd}: {fix}")
    w = odd
    seeds = _seeds(seed, video.shape[0])
    out = video.repeat_interleave(num_samples, 0)  # (B*k, n, 3, H, W)
    row_seeds = [(s * 1_000_003 + j) % 2**63 for s in seeds for j in range(num_samples)]
    for level in range(int(math.log2(factor))):
        out = _double(pipe, out, w, row_seeds, level, **kw)
    return out


def _double(pipe, clips: torch.Tensor, w: int, row_seeds: list[int], level: int, **kw) -> torch.Tensor:
    """One slow-motion level: ``(B, m, 3, H, W)`` -> ``(B, 2m - 1, 3, H, W)``."""
    b, m = clips.shape[:2]
    length = 2 * m - 1
    seq = clips.new_zeros(b, length, *clips.shape[2:])  # (B, 2m-1, 3, H, W)
    seq[:, ::2] = clips
    starts = list(range(0, length - 1, w - 1))  # windows [s, s + w - 1], the last one shorter
    by_len: dict[int, list[int]] = {}
    for s in starts:
        by_len.setdefault(min(w, length - s), []).append(s)
    for n, group in by_len.items():  # every window of one length in one batch
        given = torch.cat([seq[:, s : s + n] for s in group])  # (len(group)*B, n, 3, H, W), window-major
        mask = torch.arange(n) % 2 == 1  # (n,) odd frames generated
        salts = [_seeds(row_seeds, b, level, s) for s in group]
        filled = _window(pipe, given, mask, seed=[x for sl in salts for x in sl], num_samples=1, **kw)
        for i, s in enumerate(group):
            seq[:, s : s + n] = filled[i * b : (i + 1) * b]
    return seq

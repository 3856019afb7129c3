"""Frame masks: the one convention every module shares, task templates, and keep-ratio sampling.

A frame mask is a ``(B, T)`` bool tensor, **True = generate** (masked), False = reference (given).

``keep_ratio`` is what the paper calls "mask ratio": the fraction of frames *kept* as references
(PAPER.md §3.2). A drawn ratio r gives ``n_ref = clamp(round(r * T), 1, T - 1)`` references, so every
row always has at least one given and one generated frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mardini.class_paths import subclass_at

# The built-in task templates, in a fixed order: their index is what the training step logs per template.
# MaskSampler.templates starts as these; a subclass declares its own (e.g. these and one more).
TEMPLATES: tuple[str, ...] = ("random", "interpolation", "image_to_video", "expansion")


# --------------------------------------------------------------------------------------------------
# Single-row masks for the named tasks
# --------------------------------------------------------------------------------------------------


def mask_from_given(frames: int, given: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Mask of one clip from the indices of its given frames. Returns ``(T,)`` bool, True = generate."""
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (one given and one generated), got {frames}")
    idx = sorted(set(int(i) for i in given))
    if not idx:
        raise ValueError("no frame is given: give at least one reference frame")
    bad = [i for i in idx if not 0 <= i < frames]
    if bad:
        raise ValueError(f"given frame indices {bad} are outside the window [0, {frames - 1}]")
    if len(idx) == frames:
        raise ValueError(f"every one of the {frames} frames is given: leave at least one frame to generate")
    mask = torch.ones(frames, dtype=torch.bool)
    mask[idx] = False
    return mask


def interpolation_mask(frames: int) -> torch.Tensor:
    """First and last frames given, the middle generated. ``(T,)``"""
    return mask_from_given(frames, [0, frames - 1])


def image_to_video_mask(frames: int, index: int = 0) -> torch.Tensor:
    """One frame given at ``index`` (negative counts from the end, -1 = the last). ``(T,)``"""
    if not -frames <= index < frames:
        raise ValueError(f"image_to_video index {index} is outside the window of {frames} frames: give "
                         f"0..{frames - 1}, or -{frames}..-1 counting from the end")
    return mask_from_given(frames, [index % frames])


def expansion_mask(frames: int, n_given: int) -> torch.Tensor:
    """A prefix of ``n_given`` frames given, the continuation generated. ``(T,)``"""
    return mask_from_given(frames, list(range(n_given)))


def validate_mask(mask: torch.Tensor) -> None:
    """Raise if ``mask`` is not a ``(B, T)`` bool mask with a given and a generated frame in every row."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a (B, T) bool tensor, got dtype={mask.dtype} shape={tuple(mask.shape)}")
    if bool(mask.all(dim=1).any()):
        raise ValueError("a mask row generates every frame: give at least one reference frame per clip")
    if bool((~mask).all(dim=1).any()):
        raise ValueError("a mask row gives every frame: leave at least one frame to generate per clip")


def neighbour_given(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every frame, the index of the nearest given frame at or before it and at or after it.

    Args:
        mask: ``(B, T)`` bool, True = generate; every row has a given frame.
    Returns:
        ``prev, next`` ``(B, T)`` long; -1 where no given frame lies before, ``T`` where none lies after.
    """
    validate_mask(mask)
    b, t = mask.shape
    idx = torch.arange(t, device=mask.device).expand(b, t)  # (B, T)
    given = ~mask  # (B, T)
    prev = torch.where(given, idx, torch.full_like(idx, -1)).cummax(dim=1).values  # (B, T)
    rev = torch.where(given, t - 1 - idx, torch.full_like(idx, -1)).flip(1).cummax(dim=1).values.flip(1)  # (B, T)
    nxt = torch.where(rev >= 0, t - 1 - rev, torch.full_like(idx, t))  # (B, T)
    return prev, nxt


def nearest_given(mask: torch.Tensor) -> torch.Tensor:
    """Index of the nearest given frame of every frame, the earlier one on a tie. ``mask (B, T)`` -> ``(B, T)`` long."""
    prev, nxt = neighbour_given(mask)  # (B, T) each
    t = mask.shape[1]
    pos = torch.arange(t, device=mask.device)[None]  # (1, T)
    d_prev = torch.where(prev < 0, torch.full_like(prev, 2 * t), pos - prev)  # (B, T)
    d_next = torch.where(nxt >= t, torch.full_like(nxt, 2 * t), nxt - pos)  # (B, T)
    return torch.where(d_prev <= d_next, prev, nxt)  # (B, T)


def gather_frames(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Frame ``index[b, t]`` of clip b at every ``(b, t)``: ``x (B, T, ...)``, ``index (B, T)`` in [0, T) -> ``x``'s shape."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index.to(x.device)]  # (B, T, ...)


def nearest_given_frames(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every frame's nearest given frame (the earlier one on a tie); a given frame is its own.
    ``x (B, T, ...)`` (video, latents, object positions), ``mask (B, T)`` -> ``x``'s shape."""
    return gather_frames(x, nearest_given(mask))  # (B, T, ...)


def n_ref_from_ratio(keep_ratio: torch.Tensor | float, frames: int) -> torch.Tensor:
    """Number of reference frames for a kept fraction: ``clamp(round(r T), 1, T - 1)``."""
    r = torch.as_tensor(keep_ratio, dtype=torch.float64)
    return torch.clamp(torch.round(r * frames), 1, frames - 1).long()


# --------------------------------------------------------------------------------------------------
# Training-time sampler
# --------------------------------------------------------------------------------------------------


def check_keep_ratio(keep_ratio: tuple[float, float]) -> tuple[float, float]:
    """``(min, max)`` as floats, or a ValueError unless ``0 < min <= max <= 1``."""
    lo, hi = (float(v) for v in keep_ratio)
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"keep_ratio must satisfy 0 < min <= max <= 1, got {keep_ratio}")
    return lo, hi


def check_template_probs(template_probs: dict[str, float]) -> None:
    """Raise unless the probabilities are >= 0 with a positive sum (their names are the sampler class's to check)."""
    probs = [float(p) for p in template_probs.values()]
    if any(p < 0 for p in probs) or sum(probs) <= 0:
        raise ValueError(f"template_probs must be >= 0 with a positive sum, got {template_probs}")


@dataclass
class MaskSampler:
    """Draws training masks: a task template per clip, then its references.

    Extension point: a subclass declares more templates in :attr:`templates` and returns their given frames from
    :meth:`given_frames` (``super()``'s entries and its own); ``model.init_args.mask_sampler: CLASS_PATH`` makes a
    stage train with it (:func:`mask_sampler_class`), whose ``templates`` may then name them. A subclass (its own
    dataclass fields, another :meth:`sample`) survives the curriculum's changes of ``keep_ratio`` /
    ``template_probs`` (``dataclasses.replace``); the training steps call :meth:`draw`, which checks what
    :meth:`sample` returns.

    Args:
        keep_ratio: ``(min, max)`` of the kept fraction, ``0 < min <= max <= 1``; r ~ U[min, max].
        template_probs: probability of each template in :attr:`templates`; missing ones are 0.
            ``random`` puts ``n_ref(r)`` references at uniform positions, ``expansion`` puts them as a
            prefix, ``interpolation`` gives first + last, ``image_to_video`` gives one frame at a
            uniformly drawn index.
    """

    # the templates this class draws, in the order of their indices (the per-template losses' order)
    templates: ClassVar[tuple[str, ...]] = TEMPLATES

    keep_ratio: tuple[float, float] = (0.35, 1.0)
    template_probs: dict[str, float] = field(default_factory=lambda: {"random": 1.0})

    def __post_init__(self) -> None:
        self.keep_ratio = check_keep_ratio(self.keep_ratio)
        names, cls = type(self).templates, type(self).__name__
        if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{cls}.templates={names!r} must be distinct names")
        unknown = set(self.template_probs) - set(names)
        if unknown:
            raise ValueError(f"unknown task templates {sorted(unknown)}; allowed: {list(names)} ({cls}.templates); a "
                             "new template needs a MaskSampler subclass that declares it (templates, given_frames), "
                             "set as model.init_args.mask_sampler")
        check_template_probs(self.template_probs)
        probs = [float(self.template_probs.get(name, 0.0)) for name in names]
        self._probs = torch.tensor(probs, dtype=torch.float64) / sum(probs)

    def given_frames(
        self, batch: int, frames: int, n_ref: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Every template's given frames for this draw, ``{name: (B, T) bool}`` (True = given), each row with at
        least one given and one generated frame. ``n_ref (B,)``: the references the drawn keep ratios give. A
        subclass adds its templates' to ``super().given_frames(...)``'s (drawing after it, so the built-in
        templates' draws stay those of this class)."""
        order = torch.rand(batch, frames, generator=generator).argsort(dim=1)  # (B, T) random permutation
        rank = order.argsort(dim=1)  # (B, T) position of each frame in the permutation
        ar = torch.arange(frames).expand(batch, -1)  # (B, T)
        given_random = rank < n_ref[:, None]  # (B, T)
        given_prefix = ar < n_ref[:, None]  # (B, T)
        given_interp = (ar == 0) | ((ar == frames - 1) & (frames > 2))  # (B, T); T=2 keeps only the first
        i2v_index = torch.randint(0, frames, (batch,), generator=generator)  # (B,)
        given_i2v = ar == i2v_index[:, None]  # (B, T)
        return {"random": given_random, "interpolation": given_interp, "image_to_video": given_i2v,
                "expansion": given_prefix}  # each (B, T)

    def sample(
        self, batch: int, frames: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``mask (B, T)`` bool (True = generate; at least one given and one generated frame per row) and
        ``template (B,)`` long (index into :attr:`templates`)."""
        if frames < 2:
            raise ValueError(f"frames must be >= 2, got {frames}")
        template = torch.multinomial(self._probs.expand(batch, -1), 1, generator=generator).squeeze(1)  # (B,)
        lo, hi = self.keep_ratio
        r = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)  # (B,)
        n_ref = n_ref_from_ratio(r, frames)  # (B,)
        by_name = self.given_frames(batch, frames, n_ref, generator)  # {name: (B, T)}
        bad = [name for name in self.templates if not torch.is_tensor(by_name.get(name))
               or by_name[name].dtype != torch.bool or tuple(by_name[name].shape) != (batch, frames)]
        if bad:
            raise ValueError(f"{type(self).__name__}.given_frames returned no ({batch}, {frames}) bool mask for the "
                             f"templates {bad}; return one for each of its templates {list(self.templates)}")
        given = torch.stack([by_name[name] for name in self.templates], dim=1)  # (B, len(templates), T), their order
        given = given[torch.arange(batch), template]  # (B, T)
        return ~given, template

    def draw(
        self, batch: int, frames: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample`, checked: ``mask (B, T)`` bool with a given and a generated frame in every row and
        ``template (B,)`` indices into :attr:`templates`, else a ValueError naming the sampler and the row's
        template."""
        mask, template = self.sample(batch, frames, generator)
        who, names = f"{type(self).__name__}.sample", self.templates
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, frames):
            raise ValueError(f"{who} returned a mask of dtype={mask.dtype} shape={tuple(mask.shape)}; it must be a "
                             f"({batch}, {frames}) bool tensor (True = generate)")
        if template.dim() != 1 or template.shape[0] != batch or template.is_floating_point() or (
                batch and not 0 <= int(template.min()) <= int(template.max()) < len(names)):
            raise ValueError(f"{who} returned templates of shape={tuple(template.shape)}; they must be ({batch},) "
                             f"integer indices into {type(self).__name__}.templates {list(names)}")
        for bad, what in ((mask.all(dim=1), "generates every frame"), ((~mask).all(dim=1), "gives every frame")):
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(f"{who} drew a mask row that {what} (row {row}, template "
                                 f"{names[int(template[row])]!r}, {frames} frames): every row needs at least one "
                                 "given and one generated frame")
        return mask, template


def mask_sampler_class(path: str | None) -> type[MaskSampler]:
    """The :class:`MaskSampler` subclass ``model.init_args.mask_sampler`` names by its class path
    (``package.module.Class``); None: :class:`MaskSampler`. Anything else is a ValueError naming the fix."""
    if path is None:
        return MaskSampler
    return subclass_at(path, MaskSampler, f"model.mask_sampler={path!r}")

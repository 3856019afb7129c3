"""Anchored targets: diffuse a generated frame's change from its nearest given frame (an option beyond the paper).

The paper denoises the generated frames' latents themselves. With ``anchor="nearest"`` the diffusion runs on

    r = (z - z[nearest given frame]) / scale      on generated frames (references stay clean, as they are)

and sampling adds the anchor back: ``z = z[nearest given] + scale * r``. Training and sampling differ only in this
change of variables, so the loss, the schedule and the sampler are untouched. A network that predicts ``r = 0``
repeats the nearest given frame; what it learns on top is the motion. ``scale`` brings the residual to about unit
variance (the schedule assumes unit-variance data): the residual's standard deviation on the training data, which
``python -m mardini.autoencoders.pixel_stats --shards DIR --anchor-keep-ratio LO HI`` prints for masks keeping LO-HI
of the frames. At the toy budget it finds fewer objects than the paper's target (STUDIES.md, "Diffusing the change
from the nearest given frame"), so every shipped config keeps ``none``.
"""

from __future__ import annotations

import torch

from mardini.diffusion.checks import check_latents, check_mask, frame_mask
from mardini.masking import nearest_given_frames

ANCHORS = ("none", "nearest")


def check_anchor(anchor: str, scale: float) -> None:
    """Raise on an unknown anchor or a scale that is not a positive number."""
    if anchor not in ANCHORS:
        raise ValueError(f"model.anchor={anchor!r} is impossible: allowed {list(ANCHORS)} ('none' = the paper's "
                         "target, 'nearest' = the change from the nearest given frame)")
    if not scale > 0:
        raise ValueError(f"model.anchor_scale={scale!r} is impossible: it must be > 0 (the residual's standard "
                         "deviation on the data; 1 = no scaling)")


def anchor_frames(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The latents of every frame's nearest given frame (the earlier one on a tie).

    ``z (B, T, C, h, w)``, ``mask (B, T)`` bool (True = generate) -> ``(B, T, C, h, w)``; a given frame is its own.
    """
    check_latents(z, "z")
    check_mask(mask, z)
    return nearest_given_frames(z, mask.to(z.device))  # (B, T, C, h, w)


class FrameAnchor:
    """The change of variables between latents and the diffused target; ``anchor="none"`` is the identity.

    Args:
        anchor: ``none`` (the paper) or ``nearest`` (residual from the nearest given frame).
        scale: the residual is divided by it (its standard deviation on the data; 1 = none).
    """

    def __init__(self, anchor: str = "none", scale: float = 1.0) -> None:
        check_anchor(anchor, scale)
        self.anchor, self.scale = anchor, float(scale)

    @classmethod
    def from_hparams(cls, hparams) -> FrameAnchor:
        """The anchor a training module's hyper-parameters (or a checkpoint's) name; none when they name none."""
        return cls(str(hparams.get("anchor", "none")), float(hparams.get("anchor_scale", 1.0)))

    def __repr__(self) -> str:
        return f"FrameAnchor(anchor={self.anchor!r}, scale={self.scale})"

    @property
    def enabled(self) -> bool:
        return self.anchor != "none"

    @property
    def setting(self) -> tuple[str, float]:
        """``(anchor, scale)``, the scale 1 when off (unused then): equal settings train the same target."""
        return (self.anchor, self.scale) if self.enabled else ("none", 1.0)

    def to_target(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Latents -> diffused variable: generated frames become their scaled residual, references stay.

        ``z (B, T, C, h, w)``, ``mask (B, T)`` -> ``(B, T, C, h, w)`` in z's dtype.
        """
        if not self.enabled:
            return z
        residual = (z - anchor_frames(z, mask)) / self.scale  # (B, T, C, h, w)
        return torch.where(frame_mask(mask.to(z.device)), residual, z)  # (B, T, C, h, w)

    def from_target(self, r: torch.Tensor, z_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Diffused variable -> latents: the anchor (read from the references ``z_ref``) plus the scaled residual.

        ``r, z_ref (B, T, C, h, w)``, ``mask (B, T)`` -> ``(B, T, C, h, w)``; references are ``z_ref`` bit for bit.
        """
        if not self.enabled:
            return torch.where(frame_mask(mask.to(r.device)), r, z_ref)  # (B, T, C, h, w)
        z = anchor_frames(z_ref, mask).to(r.dtype) + self.scale * r  # (B, T, C, h, w)
        return torch.where(frame_mask(mask.to(r.device)), z, z_ref.to(r.dtype))  # (B, T, C, h, w)

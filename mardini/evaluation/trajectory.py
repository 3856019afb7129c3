"""Trajectory error on the synthetic "bouncing shapes" set: where are the objects in the generated frames?

Every object of a synthetic clip has its own saturated palette colour (``mardini.data.synthetic.PALETTE``), is a
point-symmetric shape (or a triangle whose centroid is its centre) and is drawn fully inside the frame, so its
centre is the colour-weighted centroid of the pixels of its colour. Steps:

1. the colour of object k: the palette colour found most often at its ground-truth centre in the real clip, among
   those not taken by an object drawn above it (the batch carries positions, not colours; any crop/resize works);
2. in a frame, pixel weight ``w = clamp(1 - |rgb - colour| / tol, 0, 1)`` (RGB in [0, 1]); centroid and mass;
3. counted: generated frames (mask True) where the object is visible in the real frame (real mass at least
   ``visible`` times its largest mass over the clip, so occluded objects are left out); detected when the generated
   mass is at least ``detect`` times the real mass. The error is the distance between the generated centroid and
   the ground truth, in pixels and as a fraction of the frame (``sqrt(dx^2 + dy^2)`` in normalised (x, y)).
4. ``traj_err_all_px`` also scores the misses: an object that is not found counts as a random guess, the mean
   distance between two uniform points of the frame (``MISS_FRACTION`` of the side, 0.5214 for a square), so a
   method cannot look good by producing objects only where they barely moved.
5. ``traj_motion_ratio``: do the found objects move as far as the real ones? Over the detected object-frames, the
   summed distance of the generated centroid from the object's true position in the nearest given frame, over the
   same sum for the true position: 0 for a frozen copy of a given frame, 1 for the truth. Unlike the error it does
   not care about the direction, which one given frame (image-to-video) cannot tell.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from mardini.data.synthetic import PALETTE
from mardini.masking import nearest_given_frames

MISS_FRACTION = 0.5214  # mean distance between two uniform random points of the unit square


def miss_px(h: int, w: int) -> float:
    """The error a missed object scores, in pixels of an ``h x w`` frame: a random guess (``MISS_FRACTION``)."""
    return MISS_FRACTION * (h * w) ** 0.5


# ------------------------------------------------------------------------------------------------
# Estimation
# ------------------------------------------------------------------------------------------------
def object_colours(video: torch.Tensor, positions: torch.Tensor, snap: float = 0.25) -> torch.Tensor:
    """Palette colour of each object, read from the real clip at the ground-truth centres.

    Objects are in drawing order (a later one occludes earlier ones), so they pick colours from the last to the
    first: each takes the palette colour most often found at its centre over the frames, among those not taken
    by an object drawn above it (which may sit on its centre).

    Args:
        video: ``(B, T, 3, H, W)`` in [-1, 1], the real clip.
        positions: ``(B, T, K, 2)`` (x, y) in [0, 1], NaN for absent objects, in drawing order.
        snap: a pixel counts for a palette colour within this RGB distance.
    Returns:
        ``(B, K, 3)`` RGB in [0, 1]; NaN for absent objects or when no palette colour is found.
    """
    b, t, _, h, w = video.shape
    rgb = (video.float().clamp(-1, 1) + 1) / 2  # (B, T, 3, H, W) in [0, 1]
    valid = ~positions.isnan().any(-1)  # (B, T, K)
    pos = positions.nan_to_num(0.5)  # (B, T, K, 2)
    col = (pos[..., 0] * w).long().clamp(0, w - 1)  # (B, T, K)
    row = (pos[..., 1] * h).long().clamp(0, h - 1)  # (B, T, K)
    bi = torch.arange(b, device=video.device)[:, None, None]  # (B, 1, 1)
    ti = torch.arange(t, device=video.device)[None, :, None]  # (1, T, 1)
    samples = rgb.permute(0, 1, 3, 4, 2)[bi, ti, row, col]  # (B, T, K, 3)
    palette = torch.as_tensor(PALETTE, device=video.device, dtype=rgb.dtype)  # (P, 3)
    dist, which = torch.cdist(samples.reshape(-1, 3), palette).min(dim=1)  # (B*T*K,)
    which = torch.where(dist < snap, which, -1).reshape(b, t, -1)  # (B, T, K) palette index or -1
    which = torch.where(valid, which, -1).cpu()
    out = torch.full((b, which.shape[2], 3), float("nan"), device=video.device)  # (B, K, 3)
    for i in range(b):  # K <= 8 objects: a small loop
        taken: set[int] = set()
        for k in reversed(range(which.shape[2])):
            votes = which[i, :, k]
            votes = votes[(votes >= 0) & ~torch.isin(votes, torch.tensor(sorted(taken), dtype=votes.dtype))]
            if votes.numel():
                p = int(torch.bincount(votes, minlength=len(palette)).argmax())
                taken.add(p)
                out[i, k] = palette[p]
    return out


def colour_centroids(
    video: torch.Tensor, colours: torch.Tensor, tol: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour-weighted centroid and mass of each object in every frame.

    Args:
        video: ``(B, T, 3, H, W)`` in [-1, 1].
        colours: ``(B, K, 3)`` RGB in [0, 1] (NaN = absent object: mass 0).
        tol: RGB distance at which a pixel's weight reaches 0.
    Returns:
        ``centroid (B, T, K, 2)`` (x, y) in [0, 1] (NaN where the mass is 0) and ``mass (B, T, K)`` in pixels.
    """
    _, _, _, h, w = video.shape
    rgb = (video.float().clamp(-1, 1) + 1) / 2  # (B, T, 3, H, W)
    diff = rgb[:, :, None] - colours[:, None, :, :, None, None]  # (B, T, K, 3, H, W)
    weight = (1 - diff.norm(dim=3) / tol).clamp(min=0).nan_to_num(0)  # (B, T, K, H, W)
    mass = weight.sum((-2, -1))  # (B, T, K)
    xs = (torch.arange(w, device=video.device, dtype=rgb.dtype) + 0.5) / w  # (W,) pixel centres
    ys = (torch.arange(h, device=video.device, dtype=rgb.dtype) + 0.5) / h  # (H,)
    cx = (weight.sum(-2) * xs).sum(-1) / mass  # (B, T, K)
    cy = (weight.sum(-1) * ys).sum(-1) / mass  # (B, T, K)
    centroid = torch.stack([cx, cy], dim=-1)  # (B, T, K, 2), NaN where mass == 0
    return centroid, mass


# ------------------------------------------------------------------------------------------------
# Metric
# ------------------------------------------------------------------------------------------------
class TrajectoryError(Metric):
    """Mean object-position error of generated frames vs ground truth (DDP-safe sums).

    ``update(fake, real, positions, mask)``; ``compute()`` -> ``{traj_err_px, traj_err_frac, traj_detected,
    traj_err_all_px, traj_motion_ratio}``: mean error over detected object-frames in pixels of the evaluated frames
    and as a fraction of the frame, the fraction of counted object-frames where the object was found, the mean error
    over all counted object-frames with a miss scored as a random guess (``MISS_FRACTION`` of the frame's side), and
    how far the found objects moved from the nearest given frame relative to the truth (step 5 above).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, tol: float = 0.2, visible: float = 0.9, detect: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        if not (0 < tol and 0 < visible <= 1 and 0 < detect):
            raise ValueError(f"need tol > 0, 0 < visible <= 1, detect > 0; got {tol}, {visible}, {detect}")
        self.tol, self.visible, self.detect = tol, visible, detect
        for name in ("err_px", "err_frac", "err_all_px", "moved_px", "true_moved_px"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("n_detected", "n_counted"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def measure(
        self, fake: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per object-frame ``(B, T, K)``: ``err_px``, ``err_frac`` (normalised (x, y)), ``counted``, ``detected``,
        ``moved_px`` / ``true_moved_px``, the generated and the true centroid's distance (pixels) from the
        object's true position in the nearest given frame (NaN where that is unknown), and ``real_mass``, the
        object's colour mass in the real frame (pixels; its visible area)."""
        if fake.shape != real.shape or positions.shape[:2] != real.shape[:2] or mask.shape != real.shape[:2]:
            raise ValueError(
                f"trajectory error needs fake/real (B, T, 3, H, W), positions (B, T, K, 2), mask (B, T) of one "
                f"B and T; got {tuple(fake.shape)}, {tuple(real.shape)}, {tuple(positions.shape)}, {tuple(mask.shape)}"
            )
        h, w = real.shape[-2:]
        colours = object_colours(real, positions)  # (B, K, 3)
        _, real_mass = colour_centroids(real, colours, self.tol)  # (B, T, K)
        fake_c, fake_mass = colour_centroids(fake, colours, self.tol)  # (B, T, K, 2), (B, T, K)
        present = ~positions.isnan().any(-1) & ~colours.isnan().any(-1)[:, None]  # (B, T, K)
        peak = real_mass.amax(dim=1, keepdim=True)  # (B, 1, K)
        counted = present & mask[..., None] & (real_mass > 0) & (real_mass >= self.visible * peak)  # (B, T, K)
        detected = counted & (fake_mass >= self.detect * real_mass)  # (B, T, K)
        scale = torch.tensor([w, h], device=real.device, dtype=fake_c.dtype)  # (2,)
        err_px = ((fake_c - positions) * scale).norm(dim=-1)  # (B, T, K)
        err_frac = (fake_c - positions).norm(dim=-1)  # (B, T, K)
        anchor = nearest_given_frames(positions, mask)  # (B, T, K, 2)
        moved_px = ((fake_c - anchor) * scale).norm(dim=-1)  # (B, T, K)
        true_moved_px = ((positions - anchor) * scale).norm(dim=-1)  # (B, T, K)
        return {"err_px": err_px, "err_frac": err_frac, "counted": counted, "detected": detected,
                "moved_px": moved_px, "true_moved_px": true_moved_px, "real_mass": real_mass}

    def update(self, fake: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> None:
        m = self.measure(fake, real, positions.to(real.device), mask)
        err_px, err_frac, counted, detected = m["err_px"], m["err_frac"], m["counted"], m["detected"]
        moving = detected & m["moved_px"].isfinite() & m["true_moved_px"].isfinite()  # (B, T, K)
        self.moved_px += m["moved_px"][moving].double().sum()
        self.true_moved_px += m["true_moved_px"][moving].double().sum()
        self.err_px += err_px[detected].double().sum()
        self.err_frac += err_frac[detected].double().sum()
        self.n_detected += detected.sum()
        self.n_counted += counted.sum()
        miss = miss_px(*real.shape[-2:])  # random-guess error in pixels
        self.err_all_px += err_px[detected].double().sum() + miss * (counted & ~detected).sum().double()

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        n = self.n_detected.double()
        return {
            "traj_err_px": self.err_px / n if n > 0 else nan,
            "traj_err_frac": self.err_frac / n if n > 0 else nan,
            "traj_detected": n / self.n_counted if self.n_counted > 0 else nan,
            "traj_err_all_px": self.err_all_px / self.n_counted.double() if self.n_counted > 0 else nan,
            "traj_motion_ratio": self.moved_px / self.true_moved_px if self.true_moved_px > 0 else nan,
        }

"""Masked MSE: the loss counts generated frames only (PAPER.md Eq. 1 and 3).

What the paper fixes: v-prediction, the loss on the masked ([NOISE]) frames only, DDIM sampling, CFG on the
planning signal (2.5 for I2V, none for interpolation). What we choose: unweighted MSE (no SNR weighting) with
uniform t from a 1000-step grid of a continuous-time cosine schedule. Reference frames never enter the loss.
Beyond the paper, :func:`min_snr_weight` gives the per-clip weights of Min-SNR-gamma (Hang et al. 2023) and
:func:`motion_weights` per-element weights that favour what changed since the nearest given frame.
"""

from __future__ import annotations

import torch

from mardini.diffusion.checks import check_latents, check_mask, frame_mask
from mardini.masking import nearest_given_frames


def _masked_sq_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error in float32 with reference frames zeroed. ``(B, T, C, h, w)``"""
    check_latents(pred, "pred")
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal pred shape {tuple(pred.shape)}")
    check_mask(mask, pred)
    diff = pred.float() - target.float()  # (B, T, C, h, w)
    # where before the square, not a multiply after it: a NaN/inf in a reference frame must reach neither the loss
    # nor, through the square's backward, the gradient.
    return torch.where(frame_mask(mask), diff, torch.zeros_like(diff)).square()  # (B, T, C, h, w)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the elements of the masked frames of the whole batch.

    ``loss = sum_{b,t: mask} ||pred - target||^2 / (n_masked_frames * C * h * w)``: every masked element of the
    batch weighs the same, so clips with more generated frames count more. Computed in float32.

    Args:
        pred, target: ``(B, T, C, h, w)``.
        mask: ``(B, T)`` bool, True = generated frame (in the loss), False = reference (ignored).
    Returns:
        scalar float32; 0 (still connected to ``pred``'s graph) when no frame is masked.
    """
    err = _masked_sq_error(pred, target, mask)  # (B, T, C, h, w)
    per_frame = err[0, 0].numel()  # C * h * w
    count = mask.sum().clamp(min=1) * per_frame  # ()
    return err.sum() / count  # ()


def masked_mse_per_sample(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-clip masked MSE ``(B,)`` (for logging per task template, or for a per-clip mean).

    ``loss[b] = sum_{t: mask[b,t]} ||pred - target||^2 / (n_masked_frames[b] * C * h * w)``; a clip with no masked
    frame gives 0. Note ``masked_mse_per_sample(...).mean()`` weighs every clip equally, while :func:`masked_mse`
    weighs every masked element equally; they agree when all clips have the same number of masked frames.

    Args: as :func:`masked_mse`, plus ``weight``: per-element weights broadcastable to ``(B, T, C, h, w)`` (e.g.
    :func:`motion_weights`), or None. Returns ``(B,)`` float32.
    """
    err = _masked_sq_error(pred, target, mask)  # (B, T, C, h, w)
    if weight is not None:
        err = err * weight.float()  # (B, T, C, h, w); reference frames are 0 already
    per_frame = err[0, 0].numel()  # C * h * w
    count = mask.sum(dim=1).clamp(min=1) * per_frame  # (B,)
    return err.flatten(1).sum(dim=1) / count  # (B,)


def min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) of a v-prediction loss, ``(B,)`` from SNRs ``(B,)``.

    An unweighted v-loss is the x0 error weighted by ``SNR + 1``; Min-SNR weighs the x0 error by ``min(SNR, gamma)``
    instead, so the v-loss is multiplied by ``min(SNR, gamma) / (SNR + 1)``: below 1 everywhere, near 0 at pure noise
    and at almost clean frames, largest (``gamma / (gamma + 1)``) at ``SNR = gamma``. Returned in ``snr``'s dtype;
    ``SNR = inf`` (t = 0) gives 0.
    """
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma={gamma!r} is impossible: it must be > 0 (5 in Hang et al. 2023)")
    clipped = snr.clamp(max=gamma)  # (B,)
    return torch.where(torch.isinf(snr), torch.zeros_like(snr), clipped / (snr + 1))  # (B,)


def motion_weights(z: torch.Tensor, mask: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-element loss weights that favour what changed since each generated frame's nearest given frame.

    ``w = 1 + strength * mean_C |z - z[nearest given]|`` at every position of a generated frame, divided by its mean
    over the clip's generated positions, so a clip's weights average 1 and its share of the loss is unchanged. A
    static background keeps weight 1 before the normalisation; a moving object weighs more at its old and its new
    place. Clips without a given frame (nothing to compare with) get 1 everywhere. Beyond the paper.

    Args:
        z: ``(B, T, C, h, w)`` the clean latents; ``mask``: ``(B, T)`` bool, True = generated.
        strength: ``>= 0``; 0 gives 1 everywhere.
    Returns:
        ``(B, T, 1, h, w)`` float32, 1 on reference frames (which the loss ignores).
    """
    check_latents(z, "z")
    check_mask(mask, z)
    if not strength >= 0:
        raise ValueError(f"model.motion_strength={strength!r} is impossible: it must be >= 0 (0 = unweighted)")
    z = z.detach().float()
    has_ref = (~mask).any(1)  # (B,)
    compare = mask.clone()
    compare[~has_ref, 0] = False  # a stand-in reference for clips without one; their change is zeroed below
    change = (z - nearest_given_frames(z, compare)).abs().mean(2, keepdim=True)  # (B, T, 1, h, w)
    w = 1 + strength * change * has_ref[:, None, None, None, None]  # (B, T, 1, h, w)
    gen = frame_mask(mask).float()  # (B, T, 1, 1, 1)
    count = (gen.sum((1, 2, 3, 4)) * w[0, 0].numel()).clamp(min=1)  # (B,) generated positions
    mean = (w * gen).sum((1, 2, 3, 4)) / count  # (B,)
    return torch.where(frame_mask(mask), w / mean[:, None, None, None, None], torch.ones_like(w))  # (B, T, 1, h, w)

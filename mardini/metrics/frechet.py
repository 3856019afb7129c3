"""The Fréchet distance between two Gaussians, and Gaussian statistics from running sums (float64 throughout).

    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))

The trace of the matrix square root is taken as ``sum sqrt(eig(C^T S2 C))`` with ``S1 = V W V^T`` and
``C = V W^(1/2)``: ``S1 S2`` is similar to ``S1^(1/2) S2 S1^(1/2)``, which is similar to ``C^T S2 C``, a symmetric PSD
matrix, so ``eigh`` is stable where ``scipy.linalg.sqrtm`` of the non-symmetric product can return complex noise and is
several times slower at D = 2048 (tests check both agree).

``C`` depends on ``S1`` alone: :class:`FrechetReference` computes it once for one side (the real statistics) and
scores several others against it (an evaluation of several methods), with the same figures to the last digit as
:func:`frechet_distance`, which is ``FrechetReference(mu1, S1).distance(mu2, S2)``.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _f64(x: ArrayLike) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _half_factor(s: np.ndarray) -> np.ndarray:
    """``C`` with ``C C^T = s`` for symmetric PSD ``s`` (``V W^(1/2)``; round-off negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return v * np.sqrt(np.clip(w, 0, None))


class FrechetReference:
    """One side ``N(mu1, sigma1)`` of the Fréchet distance, its factor ``C`` (an eigendecomposition of ``sigma1``,
    seconds at D = 2048) computed on first use and reused by every :meth:`distance` to another Gaussian.

    Args:
        mu1: mean ``(D,)``.
        sigma1: covariance ``(D, D)``, symmetric PSD.
    """

    def __init__(self, mu1: ArrayLike, sigma1: ArrayLike) -> None:
        self.mu, self.sigma = _f64(mu1), _f64(sigma1)

    def describes(self, mu1: ArrayLike, sigma1: ArrayLike) -> bool:
        """Whether this is ``N(mu1, sigma1)`` (equal to the last digit)."""
        return np.array_equal(self.mu, _f64(mu1)) and np.array_equal(self.sigma, _f64(sigma1))

    @cached_property
    def factor(self) -> np.ndarray:
        """``C`` ``(D, D)`` with ``C C^T = sigma1``."""
        return _half_factor(self.sigma)

    def distance(self, mu2: ArrayLike, sigma2: ArrayLike) -> float:
        """Squared Fréchet distance to ``N(mu2, sigma2)`` (means ``(D,)``, covariance ``(D, D)`` symmetric PSD), as a
        Python float (>= 0 up to round-off), computed in float64."""
        mu1, s1, mu2, s2 = self.mu, self.sigma, _f64(mu2), _f64(sigma2)
        d = mu1.shape[-1]
        if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
            raise ValueError(
                f"frechet_distance expects means (D,) and covariances (D, D) of one D, got {mu1.shape}, {s1.shape}, "
                f"{mu2.shape}, {s2.shape}"
            )
        c = self.factor  # (D, D)
        m = c.T @ s2 @ c  # (D, D), symmetric PSD, same eigenvalues as s1 @ s2
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
        diff = mu1 - mu2  # (D,)
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means ``(D,)``.
        sigma1, sigma2: covariances ``(D, D)``, symmetric PSD.
    Returns:
        The distance as a Python float (>= 0 up to round-off), computed in float64. Several distances to one
        ``N(mu1, sigma1)``: :class:`FrechetReference` decomposes ``sigma1`` once.
    """
    return FrechetReference(mu1, sigma1).distance(mu2, sigma2)


def gaussian_from_sums(
    feat_sum: torch.Tensor, outer_sum: torch.Tensor, count: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` in float64 from ``sum x``, ``sum x x^T`` and ``n >= 2``."""
    n = int(count)
    if n < 2:
        raise RuntimeError(f"need at least 2 samples for a covariance, got {n}; update the metric with more data")
    mu = feat_sum.double() / n  # (D,)
    cov = (outer_sum.double() - n * torch.outer(mu, mu)) / (n - 1)  # (D, D)
    return mu, cov


def sums_from_gaussian(
    mu: torch.Tensor, cov: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`gaussian_from_sums`: ``(sum x (D,), sum x x^T (D, D), n)`` in float64."""
    n = int(count)
    mu, cov = mu.double(), cov.double()
    return mu * n, cov * (n - 1) + n * torch.outer(mu, mu), torch.tensor(n, dtype=torch.long)

"""Shared machinery of the Fréchet metrics (FVD, FID): hidden feature network, running statistics, real-stats cache.

Both metrics keep torchmetrics FID's six states (``{real,fake}_features_sum`` ``(D,)``, ``..._cov_sum`` ``(D, D)``
float64, ``..._num_samples``), all reduced with ``sum`` across processes, so DDP needs no extra code.
A metric built with ``real_side=False`` has the three fake states only: it scores one more method against real
statistics that another metric holds (:meth:`FrechetStatsMixin.set_real_stats` before ``compute``), so an evaluation
of several methods allocates and fills the real side once (FID's real covariance sum alone is 32 MiB, twice with
torchmetrics' copy of its default). The real statistics carry a :class:`~mardini.metrics.frechet.FrechetReference`
(``"reference"``, passed on by :meth:`FrechetStatsMixin.real_stats`): the eigendecomposition of the real covariance
(seconds for FID's 2048 x 2048) is computed once and reused by every metric given those statistics, and by every
``compute`` of a metric holding cached ones (each validation epoch of a training callback).

The feature network is stored as a plain attribute, not a submodule: it stays out of ``state_dict`` (so out of any
LightningModule checkpoint), out of ``parameters()`` (so DDP never broadcasts it) and out of ``.to()`` calls; it is
moved to the input's device on first use.

Real statistics can be cached: :meth:`FrechetStatsMixin.save_real_stats` writes ``{protocol, feature, preprocessing,
frames, count, mean, cov}`` atomically; :meth:`~FrechetStatsMixin.load_real_stats` restores them as a fixed reference
that is not a metric state, so it is neither reset nor summed across ranks (every rank loads the same file). A file of
another protocol, feature network or preprocessing (resize, quantize, padding) is refused; ``frames`` says which frames
of the real clips were used (all, or a mask), and :meth:`~FrechetStatsMixin.check_frames` warns when the generated side
used others.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from mardini.lit.checkpoint_io import atomic_torch_save
from mardini.metrics.frechet import FrechetReference, gaussian_from_sums


# ------------------------------------------------------------------------------------------------
# Feature network kept out of the module tree
# ------------------------------------------------------------------------------------------------
def hide_module(owner: nn.Module, name: str, net: nn.Module) -> None:
    """Attach ``net`` to ``owner`` as a plain attribute (not in ``_modules``), frozen and in eval mode."""
    owner._modules.pop(name, None)
    object.__setattr__(owner, name, net.eval().requires_grad_(False))


def on_device(net: nn.Module, device: torch.device) -> nn.Module:
    """Move ``net`` to ``device`` if it is elsewhere (device only; its dtype stays float32)."""
    first = next(itertools.chain(net.parameters(), net.buffers()), None)
    if first is not None and first.device != device:
        net.to(device)
    return net


# ------------------------------------------------------------------------------------------------
# States, compute and the real-statistics cache
# ------------------------------------------------------------------------------------------------
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
REFERENCE = "reference"  # the key of the statistics' FrechetReference: in memory only, never written to a file


def portable_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` without its in-memory :class:`FrechetReference`: what a statistics file holds."""
    return {k: v for k, v in stats.items() if k != REFERENCE}


class FrechetStatsMixin:
    """For ``torchmetrics.Metric`` subclasses; they set ``protocol``, ``feature_name`` and ``num_features``."""

    protocol: str
    feature_name: str
    num_features: int
    _real_ref: dict[str, Any] | None = None  # cached real statistics (not a state)
    _frames: dict[str, set] | None = None  # {"real", "fake"}: frame selections seen since the last reset

    def preprocessing(self) -> dict[str, Any]:
        """What turns clips into the network's input (resize, quantize, ...); real statistics must share it."""
        return {}

    def _saw_frames(self, real: bool, selection: Any) -> None:
        """Record the frames an update used: ``"all"``, ``"images"`` or a mask row (a tuple of bools)."""
        if self._frames is None:
            self._frames = {"real": set(), "fake": set()}
        self._frames["real" if real else "fake"].add(selection)

    def frames_seen(self) -> dict[str, list]:
        """The frame selections seen since the last reset, ``{"real": [...], "fake": [...]}`` (mask rows as lists):
        what :meth:`check_frames` compares, for a run that saves its progress (``evaluate.py``'s resume)."""
        return {side: [list(f) if isinstance(f, tuple) else f for f in seen]
                for side, seen in (self._frames or {}).items()}

    def restore_frames_seen(self, seen: dict[str, list]) -> None:
        """Put :meth:`frames_seen`'s record back."""
        self._frames = {side: {tuple(f) if isinstance(f, list) else f for f in fs} for side, fs in seen.items()} or None

    def _real_frames(self) -> list:
        if self._real_ref is not None:
            return list(self._real_ref.get("frames") or [])
        return sorted((self._frames or {}).get("real", set()), key=repr)

    def check_frames(self) -> None:
        """Warn when the generated side used other frames of the clips than the real statistics."""
        real = {tuple(f) if isinstance(f, list) else f for f in self._real_frames()}
        fake = (self._frames or {}).get("fake", set())
        if real and fake and real != fake:
            rank_zero_warn(f"{self.protocol}: the real statistics used frames {sorted(real, key=repr)}, the generated "
                           f"side {sorted(fake, key=repr)}; compare the same frames (same mask) on both sides")

    def reset(self) -> None:
        super().reset()
        if self._frames is not None and not getattr(self, "reset_real_features", True):  # FID keeping real data
            self._frames["fake"] = set()  # its real frames stay what they were
        else:
            self._frames = None

    @property
    def holds_real_side(self) -> bool:
        """Whether the metric has states for the real side (False: built with ``real_side=False``)."""
        return REAL_STATES[0] in self._defaults

    def _add_frechet_states(self, dim: int, real: bool = True) -> None:
        for kind in ("real", "fake") if real else ("fake",):
            self.add_state(f"{kind}_features_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{kind}_features_cov_sum", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{kind}_features_num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _drop_real_states(self) -> None:
        """Remove the real side's states (and torchmetrics' copies of their defaults): for a metric whose real
        statistics another metric holds, installed with :meth:`set_real_stats` before ``compute``."""
        for name in REAL_STATES:
            for registry in (self._defaults, self._persistent, self._reductions):
                registry.pop(name, None)
            if hasattr(self, name):
                delattr(self, name)

    def _check_real_update(self, real: bool) -> None:
        if real and not self.holds_real_side:
            raise RuntimeError(
                f"{self.protocol}: this metric holds no real side (built with real_side=False); update the metric "
                "that holds the real side with the real clips and install its statistics here with set_real_stats()"
            )
        if real and self._real_ref is not None:
            raise RuntimeError(
                f"{self.protocol}: real statistics were loaded from a cache; call clear_real_stats() before "
                f"updating with real data"
            )

    def _accumulate(self, feats: torch.Tensor, real: bool) -> None:
        """Add features ``(N, D)`` to the running sums in float64."""
        feats = feats.double()  # (N, D)
        kind = "real" if real else "fake"
        setattr(self, f"{kind}_features_sum", getattr(self, f"{kind}_features_sum") + feats.sum(0))  # (D,)
        setattr(self, f"{kind}_features_cov_sum", getattr(self, f"{kind}_features_cov_sum") + feats.T @ feats)  # (D,D)
        setattr(self, f"{kind}_features_num_samples", getattr(self, f"{kind}_features_num_samples") + feats.shape[0])

    def _gaussian(self, kind: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean (D,), cov (D, D), count) of the current states; call where states are synced."""
        if kind == "real" and self._real_ref is not None:
            ref = self._real_ref
            return ref["mean"], ref["cov"], int(ref["count"])
        if kind == "real" and not self.holds_real_side:
            raise RuntimeError(
                f"{self.protocol}: this metric holds no real side (built with real_side=False) and was given no real "
                "statistics; install them with set_real_stats() (EvalSuite.use_real_stats) before compute"
            )
        n = getattr(self, f"{kind}_features_num_samples")
        feat_sum, outer_sum = getattr(self, f"{kind}_features_sum"), getattr(self, f"{kind}_features_cov_sum")
        mu, cov = gaussian_from_sums(feat_sum, outer_sum, n)
        return mu, cov, int(n)

    def _frechet(self) -> torch.Tensor:
        """The Fréchet distance of real vs fake as a float64 scalar tensor (inside ``compute``: states are synced)."""
        reference = self._real_reference()
        mu_f, cov_f, _ = self._gaussian("fake")
        d = reference.distance(mu_f, cov_f)
        return torch.tensor(d, dtype=torch.float64, device=self.fake_features_sum.device)

    def _real_reference(self) -> FrechetReference:
        """The real side of the distance: the installed statistics' reference (decomposed once), else one of the
        current states (inside ``compute``: states are synced)."""
        if self._real_ref is not None:
            return self._real_ref[REFERENCE]
        mu_r, cov_r, _ = self._gaussian("real")
        return FrechetReference(mu_r, cov_r)

    # -- cache ---------------------------------------------------------------------------------------
    def real_stats(self) -> dict[str, Any]:
        """``{protocol, feature, count, mean (D,), cov (D, D), reference}`` of the real data, synced across processes
        (``reference``: a :class:`FrechetReference` of mean and cov, for :meth:`set_real_stats` of other metrics)."""
        if self._real_ref is not None:
            return dict(self._real_ref)
        with self.sync_context(should_unsync=True):
            mu, cov, n = self._gaussian("real")
        frames = [list(f) if isinstance(f, tuple) else f for f in self._real_frames()]
        mu, cov = mu.cpu(), cov.cpu()  # (D,), (D, D)
        return {"protocol": self.protocol, "feature": self.feature_name, "preprocessing": self.preprocessing(),
                "frames": frames, "count": n, "mean": mu, "cov": cov, REFERENCE: FrechetReference(mu, cov)}

    def set_real_stats(self, stats: dict[str, Any]) -> None:
        """Use ``stats`` (from :meth:`real_stats`) as the fixed real reference; checks protocol, feature and
        preprocessing (a file written before preprocessing was recorded is taken with a warning). Their
        ``reference`` is reused where it describes this mean and covariance (one decomposition for several metrics)."""
        for key, want in (("protocol", self.protocol), ("feature", self.feature_name)):
            if stats.get(key) != want:
                raise ValueError(
                    f"cached real statistics are for {key} {stats.get(key)!r}, this metric is {want!r}; recompute them"
                )
        if "preprocessing" not in stats:
            rank_zero_warn(f"{self.protocol}: the cached real statistics do not record their preprocessing; assuming "
                           f"{self.preprocessing()}")
        elif stats["preprocessing"] != self.preprocessing():
            raise ValueError(f"cached real statistics were computed with preprocessing {stats['preprocessing']}, this "
                             f"metric uses {self.preprocessing()}; recompute them (or build the metric with theirs)")
        mean, cov = stats["mean"].double(), stats["cov"].double()
        d = self.num_features
        if mean.shape != (d,) or cov.shape != (d, d):
            raise ValueError(f"cached statistics have mean {tuple(mean.shape)} and covariance {tuple(cov.shape)}, "
                             f"expected ({d},) and ({d}, {d})")
        reference = stats.get(REFERENCE)
        if not (isinstance(reference, FrechetReference) and reference.describes(mean, cov)):
            reference = FrechetReference(mean, cov)  # decomposed on first use
        self._real_ref = {**stats, "mean": mean, "cov": cov, "count": int(stats["count"]), REFERENCE: reference}

    def clear_real_stats(self) -> None:
        """Forget cached real statistics; real data then comes from ``update(..., real=True)`` again."""
        self._real_ref = None

    def save_real_stats(self, path: str | os.PathLike) -> Path:
        """Write :meth:`real_stats` atomically to ``path`` (a ``torch.save`` file); returns the path."""
        atomic_torch_save(portable_stats(self.real_stats()), path)
        return Path(path)

    def load_real_stats(self, path: str | os.PathLike) -> None:
        """Load statistics written by :meth:`save_real_stats` and use them as the real reference."""
        self.set_real_stats(torch.load(path, map_location="cpu", weights_only=True))

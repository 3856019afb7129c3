"""An evaluation protocol (task, window, metrics, weights) and the metric suite that scores one sampler on it.

The same :class:`EvalSuite` runs inside the training callbacks and in the ``evaluate`` command, so both compute
the numbers the same way. Metrics and their names:

| key | metric | names in the results |
|---|---|---|
| ``fvd`` | :class:`~mardini.metrics.FrechetVideoDistance` (I3D weights) | ``fvd{N}_{T}f`` |
| ``fid`` | :class:`~mardini.metrics.FrameFID` on the generated frames (InceptionV3 weights) | ``fid{N}_{T}f`` |
| ``midf`` | :class:`~mardini.metrics.MidFrameMetrics` (LPIPS with ``lpips_weights``) | ``midf_psnr``, ``midf_ssim`` |
| ``traj`` | :class:`~mardini.evaluation.trajectory.TrajectoryError` (batches with ``positions``) | ``traj_err_px`` ... |
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from mardini.diffusion.guidance import IMAGE_TO_VIDEO_GUIDANCE
from mardini.masking import image_to_video_mask, interpolation_mask

TASKS = ("interpolation", "image_to_video")
METRICS = ("fvd", "fid", "midf", "traj")
DEFAULT_METRICS = {"interpolation": ("fvd", "fid", "midf", "traj"), "image_to_video": ("fvd", "fid", "traj")}
DEFAULT_GUIDANCE = {"interpolation": 1.0, "image_to_video": IMAGE_TO_VIDEO_GUIDANCE}  # PAPER.md: no CFG for interp.
FRECHET = ("fvd", "fid")


# ------------------------------------------------------------------------------------------------
# Sizes: one side (square) or height x width
# ------------------------------------------------------------------------------------------------
EvalSize = int | tuple[int, int]  # a square side, or (H, W) of a non-square size


def eval_size(value: int | str | tuple[int, int] | list[int] | None, flag: str = "resolution") -> EvalSize | None:
    """An evaluation size as the protocol keeps it: ``256``, ``"256"`` -> 256; ``"36x64"``, ``[36, 64]`` ->
    ``(36, 64)``; a square ``"32x32"`` -> 32 (one side means what it always meant); None stays None. Strings are
    parsed as ``sample.py --resolution`` parses them (:func:`mardini.pipeline.inputs.parse_size`)."""
    from mardini.pipeline.inputs import parse_size

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if value is None:
        return None
    if isinstance(value, str):
        h, w = parse_size(value, flag)
    elif whole(value):
        h = w = value
    elif isinstance(value, tuple | list) and len(value) == 2 and all(whole(v) for v in value):
        h, w = value
    else:
        raise ValueError(f"{flag} must be a side N, 'HxW' or [H, W] (pixels), got {value!r}")
    return h if h == w else (h, w)


def sides(size: EvalSize | list[int]) -> tuple[int, int]:
    """``(H, W)`` of a size: a side is square."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def size_text(size: EvalSize | list[int]) -> str:
    """``32`` -> ``"32"``; ``(36, 64)`` -> ``"36x64"`` (what ``--resolution`` takes)."""
    return str(size) if isinstance(size, int) else "x".join(str(s) for s in sides(size))


def same_aspect(a: EvalSize | list[int], b: EvalSize | list[int], tolerance: float = 0.01) -> bool:
    """Whether two sizes have one aspect ratio (within ``tolerance``): resizing one to the other keeps the
    picture's proportions, and the clips read at both show the same centred region of the source frames."""
    (ha, wa), (hb, wb) = sides(a), sides(b)
    return abs(ha * wb - hb * wa) <= tolerance * hb * wa


# ------------------------------------------------------------------------------------------------
# Protocol settings
# ------------------------------------------------------------------------------------------------
@dataclass
class EvalProtocol:
    """Settings of one evaluation protocol.

    Args:
        task: ``interpolation`` (first and last frames given) or ``image_to_video`` (first frame given).
        frames: window length T (VIDIM-Bench: 9).
        resolution: size the clips are evaluated at: a square side (``256``), or ``(H, W)`` / ``"HxW"`` (kept as
            ``(H, W)``, a square one as its side; :func:`eval_size`); None keeps the data's.
        num_clips: N, the clips the protocol is defined on (in the FVD/FID names).
        seed: base seed of the sampler (each batch gets one derived from (seed, rank, batch)).
        metrics: any of ``fvd fid midf traj``; None = the task's default (``traj`` runs only where batches carry
            ``positions``).
        missing_weights: ``error`` (raise, saying how to get them) or ``skip`` (warn, leave the metric out).
        i3d_weights: I3D weights file or folder for FVD (None: :func:`mardini.weights.default_cache_dir`).
        inception_weights: InceptionV3 TorchScript file or folder for FID (None: the same cache).
        lpips_weights: torchvision backbone file to add MidF-LPIPS (none by default: it cannot be downloaded here).
        fvd_pad_short: allow T < 9 for FVD by repeating the last frame (the name gets ``_pad``).
        steps: DDIM steps of the model.
        guidance_scale: guidance scale of the model (None = 1.0 for interpolation, 2.5 for image-to-video).
        eta: DDIM eta of the model, in [0, 1]: 0 = deterministic DDIM, 1 = ancestral.
    """

    task: Literal["interpolation", "image_to_video"] = "interpolation"
    frames: int = 9
    resolution: EvalSize | str | None = 256
    num_clips: int = 256
    seed: int = 0
    metrics: tuple[str, ...] | None = None
    missing_weights: Literal["error", "skip"] = "error"
    i3d_weights: str | None = None
    inception_weights: str | None = None
    lpips_weights: str | None = None
    fvd_pad_short: bool = False
    steps: int = 25
    guidance_scale: float | None = None
    eta: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in reports, not used

    def __post_init__(self) -> None:
        self.resolution = eval_size(self.resolution, "evaluation resolution")
        self.metrics = tuple(DEFAULT_METRICS[self.task] if self.metrics is None else self.metrics) if \
            self.task in TASKS else ()
        checks = [
            ("task", self.task in TASKS, f"one of {TASKS}"),
            ("frames", self.frames >= (3 if self.task == "interpolation" else 2), ">= 3 for interpolation, 2 for I2V"),
            ("resolution", self.resolution is None or min(sides(self.resolution)) >= 8,
             ">= 8 a side or None (the data's)"),
            ("num_clips", self.num_clips >= 2, ">= 2 (a covariance needs two clips)"),
            ("metrics", set(self.metrics) <= set(METRICS) and len(self.metrics) > 0, f"a non-empty subset of {METRICS}"),
            ("missing_weights", self.missing_weights in ("error", "skip"), "'error' or 'skip'"),
            ("steps", self.steps >= 1, ">= 1"),
            ("eta", 0 <= self.eta <= 1, "in [0, 1] (DDIM's eta: 0 deterministic, 1 ancestral)"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"evaluation {key}={getattr(self, key)!r} is impossible: it must be {allowed}")
        if "fvd" in self.metrics and self.frames < 9 and not self.fvd_pad_short:
            raise ValueError(
                f"FVD's I3D needs >= 9 frames, the protocol has {self.frames}: use frames >= 9 (--frames), "
                "fvd_pad_short=True (--fvd-pad-short: repeat the last frame), or leave 'fvd' out of metrics (--metrics)"
            )
        if self.guidance_scale is None:
            self.guidance_scale = DEFAULT_GUIDANCE[self.task]

    def mask(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The task's frame mask, ``(B, T)`` bool, True = generate."""
        row = interpolation_mask(self.frames) if self.task == "interpolation" else image_to_video_mask(self.frames)
        return row.to(device).expand(batch, -1).clone()  # (B, T)

    def real_stats_fields(self) -> dict[str, Any]:
        """What the real statistics depend on (besides the data): the cache key uses exactly these."""
        return {"task": self.task, "frames": self.frames, "resolution": self.resolution, "num_clips": self.num_clips,
                "mask": self.mask(1)[0].tolist()}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SEED_BLOCK = 8  # clips per hashed seed block (see clip_seeds); equal to the CLI's default batch size


def batch_seed(seed: int, rank: int, batch_idx: int) -> int:
    """A seed fixed by (seed, rank, index): a sha256 hash, 56 bits."""
    h = hashlib.sha256(f"{seed}/{rank}/{batch_idx}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def clip_seeds(seed: int, first: int, count: int) -> list[int]:
    """Seeds of the protocol's clips ``first .. first + count - 1`` (their index among all N clips): clip k gets
    ``batch_seed(seed, 0, k // SEED_BLOCK) + k % SEED_BLOCK``, whatever the batch size or the number of processes
    that evaluate it (with batches of ``SEED_BLOCK`` on one process, what each batch's seed gave its clips)."""
    return [batch_seed(seed, 0, k // SEED_BLOCK) + k % SEED_BLOCK for k in range(first, first + count)]


# ------------------------------------------------------------------------------------------------
# Real-statistics cache
# ------------------------------------------------------------------------------------------------
def fingerprint(obj: Any) -> str:
    """A short sha256 of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_id(paths: list[str]) -> list[list[Any]]:
    """``[[path, size, mtime_ns], ...]``: identifies data files (a rewritten file changes the key)."""
    out = []
    for p in sorted(paths):
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def keys_digest(keys: list[str]) -> int:
    """Order-free digest of clip keys: sum of 40-bit hashes (so per-rank sums add up across ranks)."""
    return sum(int(hashlib.sha1(k.encode()).hexdigest()[:10], 16) for k in keys)


class RealStatsCache:
    """Real statistics of Fréchet metrics on disk: ``root/<metric protocol>-<task>-<key>.pt``.

    The key hashes the data identity, the protocol fields and the metric's feature network; files are written
    atomically (temp file + ``os.replace``) and carry the digest of the clip keys they were computed on.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fspath(root)

    def path(self, metric: Metric, protocol: EvalProtocol, data_id: Any) -> str:
        net = getattr(metric, "network", None) or getattr(metric, "inception", None)
        key = fingerprint({
            "data": data_id, "protocol": protocol.real_stats_fields(), "metric": metric.protocol,
            "feature": metric.feature_name, "network": type(net).__qualname__,
            "resize": getattr(net, "resize", getattr(metric, "resize", None)),
            "quantize": getattr(net, "quantize", getattr(metric, "quantize", None)), "version": 1,
        })
        return os.path.join(self.root, f"{metric.protocol}-{protocol.task}-{key}.pt")

    @staticmethod
    def load(path: str) -> dict | None:
        """The statistics in ``path``, or None when there is no file or it cannot be read (truncated, not a torch
        file: warned, naming it); a miss is computed again and :meth:`save` overwrites the file."""
        if not os.path.isfile(path):
            return None
        try:
            stats = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            detail = str(err).split(". ")[0] if str(err) else type(err).__name__  # torch's first sentence
            rank_zero_warn(f"real-statistics cache file {path} cannot be read ({detail}); computing the real "
                           "statistics again and overwriting it")
            return None
        if not isinstance(stats, dict):
            rank_zero_warn(f"real-statistics cache file {path} holds no statistics ({type(stats).__name__}); "
                           "computing them again and overwriting it")
            return None
        return stats

    @staticmethod
    def save(stats: dict, path: str) -> None:
        from mardini.lit.checkpoint_io import atomic_torch_save
        from mardini.metrics.stats import portable_stats

        atomic_torch_save(portable_stats(stats), path)


# ------------------------------------------------------------------------------------------------
# Metric suite
# ------------------------------------------------------------------------------------------------
LPIPS_LEAVE_OUT = "drop lpips_weights (--lpips-weights); PSNR and SSIM need no weights"


def _weights_missing(name: str, err: Exception, missing_weights: str, leave_out: str | None = None) -> str:
    """Raise ``err`` with how to evaluate without ``name`` (``missing_weights`` "error"), or warn and return it."""
    msg = f"{name} is off: {err}"
    if missing_weights == "error":
        leave_out = leave_out or f"leave '{name}' out of metrics (--metrics)"
        raise FileNotFoundError(f"{msg}\n(or evaluate without it: {leave_out}, "
                                f"or set missing_weights='skip' (--missing-weights skip))") from err
    rank_zero_warn(msg)
    return msg


def resolve_metric_weights(
    metrics: tuple[str, ...] | list[str], missing_weights: str = "error", i3d_weights: str | None = None,
    inception_weights: str | None = None, lpips_weights: str | None = None, prog: str = "evaluate.py",
) -> dict[str, dict[str, str] | None]:
    """Find and verify the weight files ``metrics`` need, before any data is read or model loaded.

    Returns ``{"i3d" | "inception" | "lpips": {"path": resolved file, "sha256": ...}}`` for those needed (None for
    one missing under ``missing_weights="skip"``, warned: the suite leaves its metric out). Raises as
    :class:`EvalSuite` would: FileNotFoundError saying how to get a missing file (``"error"``), ValueError for a
    file that is not the one asked for. ``prog``: the evaluation command the messages name.
    """
    from mardini.metrics.frame_metrics import check_lpips_weights
    from mardini.weights import WEIGHTS, resolve_weights

    out: dict[str, dict[str, str] | None] = {}
    for metric, name, given in (("fvd", "i3d", i3d_weights), ("fid", "inception", inception_weights)):
        if metric in metrics:
            try:
                path = resolve_weights(name, given, prog=prog)  # size and sha256 checked
                out[name] = {"path": str(path.resolve()), "sha256": WEIGHTS[name].sha256}
            except FileNotFoundError as err:
                _weights_missing(metric, err, missing_weights)
                out[name] = None
    if "midf" in metrics and lpips_weights is not None:
        try:
            out["lpips"] = {"path": str(Path(lpips_weights).resolve()), "sha256": check_lpips_weights(lpips_weights)}
        except FileNotFoundError as err:
            _weights_missing("midf_lpips", err, missing_weights, LPIPS_LEAVE_OUT)
            out["lpips"] = None
    return out


class EvalSuite:
    """The metrics of one protocol for one sampler; DDP-safe (torchmetrics states, synced at ``compute``).

    Args:
        protocol: the settings.
        networks: optional ready feature networks ``{"fvd": module, "fid": module}`` (tests, or sharing one
            network between suites); otherwise the pretrained ones are loaded from the weights files.
        real_side: False builds the Fréchet metrics without real-side states, for one more method scored on the
            same clips: ``update`` adds the generated side only, and the real statistics of the suite that holds
            them are installed with :meth:`use_real_stats` before :meth:`compute`.
    The metrics are plain attributes of the suite: whoever holds the suite (a callback) keeps them out of the
    LightningModule, its checkpoints and its EMA.
    """

    def __init__(
        self, protocol: EvalProtocol, networks: dict[str, nn.Module] | None = None, real_side: bool = True
    ) -> None:
        from mardini.evaluation.trajectory import TrajectoryError
        from mardini.metrics import FrameFID, FrechetVideoDistance, MidFrameMetrics

        self.protocol = p = protocol
        networks = networks or {}
        self.metrics: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        n, t = p.num_clips, p.frames
        builders = {
            "fvd": lambda: FrechetVideoDistance(n, t, weights=p.i3d_weights, network=networks.get("fvd"),
                                                pad_short=p.fvd_pad_short, real_side=real_side),
            "fid": lambda: FrameFID(n, t, weights=p.inception_weights, network=networks.get("fid"),
                                    real_side=real_side),
            "midf": lambda: MidFrameMetrics(lpips_weights=p.lpips_weights),
            "traj": lambda: TrajectoryError(),
        }
        for name in p.metrics:
            try:
                self.metrics[name] = builders[name]()
            except FileNotFoundError as err:
                if name == "midf" and p.lpips_weights is not None:  # PSNR and SSIM need no weights: keep them
                    self.skipped["midf_lpips"] = _weights_missing("midf_lpips", err, p.missing_weights,
                                                                  LPIPS_LEAVE_OUT)
                    self.metrics[name] = MidFrameMetrics(lpips_weights=None)
                else:
                    self.skipped[name] = _weights_missing(name, err, p.missing_weights)
        self.real_side = real_side  # False: the real statistics come from another suite (use_real_stats)
        self.real_cached = False  # True once the Fréchet metrics hold real statistics from a cache

    # -- state --------------------------------------------------------------------------------------
    @property
    def frechet(self) -> dict[str, Any]:
        return {k: m for k, m in self.metrics.items() if k in FRECHET}

    def to(self, device: torch.device | str) -> EvalSuite:
        for m in self.metrics.values():
            m.to(device)
        return self

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()

    # -- update / compute ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self, real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None
    ) -> None:
        """Score one batch: ``real``/``fake`` ``(B, T, 3, H, W)`` in [-1, 1], ``mask (B, T)``, ``positions
        (B, T, K, 2)`` or None. Real statistics are updated unless they came from the cache or another suite
        (``real_side=False``)."""
        for name, m in self.frechet.items():
            kw = {"mask": mask} if name == "fid" else {}
            if self.real_side and not self.real_cached:
                m.update(real, real=True, **kw)
            m.update(fake, real=False, **kw)
        if "midf" in self.metrics:
            self.metrics["midf"].update(fake, real)
        if "traj" in self.metrics and positions is not None:
            self.metrics["traj"].update(fake, real, positions, mask)

    @torch.no_grad()
    def update_real(self, real: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch of real clips ``(B, T, 3, H, W)`` (``mask (B, T)``) to the Fréchet metrics' real side only."""
        for name, m in self.frechet.items():
            m.update(real, real=True, **({"mask": mask} if name == "fid" else {}))

    def compute(self) -> dict[str, float]:
        """All results as floats, named by protocol (call on every rank: it syncs)."""
        out: dict[str, float] = {}
        for name, m in self.metrics.items():
            if name == "traj" and not _any_rank_counted(m):
                continue  # no positions in the data
            value = m.compute()
            if isinstance(value, dict):
                out.update({k: float(v) for k, v in value.items()})
            else:
                out[m.protocol] = float(value)
        return out

    # -- real statistics ----------------------------------------------------------------------------
    def use_real_stats(self, stats: dict[str, dict]) -> None:
        """Install real statistics ``{metric key: stats}`` (from a cache or another suite) in the Fréchet metrics."""
        for name, m in self.frechet.items():
            m.set_real_stats(stats[name])
        self.real_cached = True

    def real_stats(self) -> dict[str, dict]:
        """``{metric key: stats}`` of the Fréchet metrics (synced across processes; call on every rank)."""
        return {name: m.real_stats() for name, m in self.frechet.items()}

    def load_real_cache(self, cache: RealStatsCache, data_id: Any) -> dict[str, str] | None:
        """Use cached real statistics if every Fréchet metric has a file; returns ``{key: path}`` or None."""
        if not self.frechet:
            return None
        paths = {name: cache.path(m, self.protocol, data_id) for name, m in self.frechet.items()}
        stats = {name: RealStatsCache.load(path) for name, path in paths.items()}
        if any(s is None for s in stats.values()):
            return None
        self.use_real_stats(stats)
        return paths

    def real_cache_matches(self, digest: int, count: int) -> bool:
        """Whether the cached real statistics in use were computed on the clips of key digest ``digest`` (see
        :func:`keys_digest`) and ``count`` clips; a file that records neither is taken as it is."""
        refs = [m._real_ref or {} for m in self.frechet.values()]
        return all(r.get("keys_digest") in (None, digest) and r.get("clips") in (None, count) for r in refs)

    def drop_real_stats(self) -> None:
        """Forget cached real statistics: the real side is accumulated by updates again."""
        for m in self.frechet.values():
            m.clear_real_stats()
        self.real_cached = False

    def save_real_cache(
        self, cache: RealStatsCache, data_id: Any, digest: int, count: int, write: bool = True
    ) -> dict[str, str]:
        """Sync the real statistics (every rank), write them (``write``: rank zero only) and use them from now on.
        Returns ``{metric key: path}``."""
        stats, paths = self.real_stats(), {}
        for name, m in self.frechet.items():
            stats[name] = {**stats[name], "keys_digest": int(digest), "clips": int(count), "data": data_id}
            paths[name] = cache.path(m, self.protocol, data_id)
            if write:
                RealStatsCache.save(stats[name], paths[name])
        self.use_real_stats(stats)
        return paths


def _any_rank_counted(m: Metric) -> bool:
    """Whether any process saw positions (collective when distributed, so every rank takes the same branch)."""
    n = m.n_counted.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
    return int(n) > 0

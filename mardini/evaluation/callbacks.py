"""Lightning callbacks that score the model on the validation set: ``InterpolationEval`` and ``ImageToVideoEval``.

During validation (every ``every_n_epochs`` epochs, not in the sanity check) each rank takes its first clips of
the validation loader (``num_clips`` in all, split over the ranks; never the clips a ``DistributedSampler`` repeats to
pad the ranks' shares of a map-style set, :attr:`~mardini.lit.clip_draws.ValidationOrder.distinct`; where every rank
reads the whole set in order, a ``SequentialSampler`` Lightning did not split, rank r takes the clips of index r,
r + R, ... below ``num_clips``, those a ``DistributedSampler`` would give it: :func:`scored_positions`), samples the
task's frames with fixed seeds (one per clip, by its identity, :func:`identity_seeds`, so a clip's noise does not
depend on the world size; the model at the data's size, its outputs resized to the protocol's ``resolution``), and
updates the metrics; at the end of the epoch every
rank computes (torchmetrics syncs the states) and the results are logged as ``eval/<task>/<name>``. Under FSDP,
whose forwards gather parameters from every rank, the ranks sample together: while any rank still needs clips, a
rank past its share samples one clip of its batch and drops it (the ranks must see as many validation batches), as
does a rank on a padding batch (its stream ran short: :func:`~mardini.data.batching.padding_of`).

Real statistics of FVD/FID are cached in ``cache_dir`` keyed by the data (validation shards, their sizes and
times, loader settings, world size) and the protocol; a cached file also records the digest of the clip keys it
was computed on, and a later epoch that sees other clips drops the file and does not log Fréchet numbers.

The metrics (and their I3D / InceptionV3 networks) live in the callback, never in the LightningModule: they are
not in its ``state_dict`` (so not in checkpoints), not in ``parameters()`` (DDP, optimiser) and not in the EMA.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from mardini.data.batching import is_padding
from mardini.evaluation.protocol import EvalProtocol, EvalSuite, RealStatsCache, clip_seeds, files_id, keys_digest
from mardini.evaluation.samplers import Sampler, ema_context, make_sampler, to_real_size
from mardini.lit.clip_draws import ValidationOrder, clip_seed, validation_order
from mardini.lit.fsdp import fsdp_root, root_unsharded


class _TaskEval(L.Callback):
    """Shared body of the two callbacks; see the module docstring.

    Args:
        sampler: ``"pipeline"`` (the model, built from the LightningModule with its EMA weights),
            ``"linear_blend"``, ``"nearest_frame"``, or a callable ``(video, mask, seed) -> video``.
        num_clips: N clips over all ranks (the validation loader must deliver them).
        frames: window length; a longer validation clip is cut to its centred window.
        resolution: evaluation size: a side, ``[H, W]`` or ``"HxW"`` (``"36x64"``); None keeps the validation
            data's. The model (``"pipeline"``) samples at the data's size (its training resolution) and its outputs
            are resized to this size to be scored.
        metrics: subset of ``fvd fid midf traj`` (None = the task's default).
        seed: base seed of the sampler: each clip's is derived from it and the clip's identity (its ``key``, else
            its dataset index; :func:`identity_seeds`).
        steps: DDIM steps of the model.
        guidance_scale: guidance scale of the model (None = 1.0 for interpolation, 2.5 for image-to-video).
        eta: DDIM eta of the model, in [0, 1]: 0 = deterministic (the paper), 1 = ancestral.
        every_n_epochs: run on validation epochs whose index is a multiple of this.
        cache_dir: folder of cached real statistics (None: no cache).
        missing_weights: ``skip`` (default here: warn and train on) or ``error``.
        i3d_weights: I3D weights file or folder for FVD (None: :func:`mardini.weights.default_cache_dir`).
        inception_weights: InceptionV3 TorchScript file or folder for FID (None: the same cache).
        lpips_weights: torchvision AlexNet backbone file: adds MidF-LPIPS (None: left out).
        fvd_pad_short: allow windows under 9 frames for FVD by repeating the last frame (the name gets ``_pad``).
        networks: ready feature networks ``{"fvd": ..., "fid": ...}`` (tests; default: pretrained weights).
    """

    TASK = ""

    def __init__(
        self,
        sampler: str | Sampler = "pipeline",
        num_clips: int = 64,
        frames: int = 9,
        resolution: int | tuple[int, int] | str | None = None,
        metrics: list[str] | None = None,
        seed: int = 0,
        steps: int = 25,
        guidance_scale: float | None = None,
        eta: float = 0.0,
        every_n_epochs: int = 1,
        cache_dir: str | None = "outputs/eval/real_stats",
        missing_weights: str = "skip",
        i3d_weights: str | None = None,
        inception_weights: str | None = None,
        lpips_weights: str | None = None,
        fvd_pad_short: bool = False,
        networks: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.protocol = EvalProtocol(
            task=self.TASK, frames=frames, resolution=resolution, num_clips=num_clips, seed=seed,
            metrics=None if metrics is None else tuple(metrics), missing_weights=missing_weights,
            i3d_weights=i3d_weights, inception_weights=inception_weights, lpips_weights=lpips_weights,
            fvd_pad_short=fvd_pad_short, steps=steps, guidance_scale=guidance_scale, eta=eta,
        )
        self.sampler_spec, self.every_n_epochs = sampler, every_n_epochs
        self.cache = RealStatsCache(cache_dir) if cache_dir else None
        self.networks = networks
        self.prefix = f"eval/{self.TASK}"
        self.suite: EvalSuite | None = None  # built on first use, in the process that evaluates
        self._active = False
        self._sampler: Sampler | None = None
        self._seen = 0
        self._scored: set[int] | None = None  # positions in this rank's pass that it scores (scored_positions)
        self._order: ValidationOrder | None = None  # this rank's validation loader order, where it can be read
        self._warned_positional = False
        self._keys: list[str] = []
        self._data_id: Any = None
        self._cache_paths: dict[str, str] | None = None
        self.last_results: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------
    # Hooks
    # ----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0
        if not self._active:
            return
        if self.suite is None:
            self.suite = EvalSuite(self.protocol, self.networks)
        self.suite.to(pl_module.device).reset()
        p = self.protocol
        self._sampler = make_sampler(self.sampler_spec, pl_module, p.steps, p.guidance_scale, p.frames, p.eta)
        self._seen, self._keys = 0, []
        self._order = validation_order(val_loader(trainer))
        self._scored = None if self._order is None else scored_positions(
            self._order, self.protocol.num_clips, trainer.global_rank, trainer.world_size)
        self._data_id = data_identity(trainer, p)
        if self.cache is not None and self._data_id is not None and not self.suite.real_cached:
            self._cache_paths = self.suite.load_real_cache(self.cache, self._data_id)
            if self._cache_paths:
                rank_zero_info(f"{self.prefix}: real statistics from {sorted(self._cache_paths.values())}")

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:
            return
        rows = self._rows_to_score(trainer, batch, batch_idx)  # the batch's clips this rank scores
        wants = bool(rows)
        root = fsdp_root(pl_module)
        if root is not None and not trainer.strategy.reduce_boolean_decision(wants, all=False):
            return  # no rank needs clips any more (a collective: every rank asks)
        if not wants:
            if root is not None:  # FSDP: every forward gathers from all ranks, so this rank samples one clip too
                real, _, own = eval_window(batch, pl_module, self.protocol)  # (B, T, 3, R, R), (B, T, 3, H, W)
                self._sample(trainer, pl_module, root, real[:1], self.protocol.mask(1, real.device), [0], own[:1])
            return
        real, positions, own = eval_window(batch, pl_module, self.protocol)  # (B, T, 3, R, R), (B, T, K, 2) | None
        real, own = real[rows], own[rows]  # (b, T, 3, R, R); own: (b, T, 3, H, W), the data's size
        positions = None if positions is None else positions[rows]  # (b, T, K, 2)
        mask = self.protocol.mask(len(rows), real.device)  # (b, T)
        seed = self._clip_seeds(trainer, batch, batch_idx, rows)  # one per clip, by its identity: any batch size
        fake = self._sample(trainer, pl_module, root, real, mask, seed, own)  # (b, T, 3, R, R)
        self.suite.update(real, fake, mask, positions)
        self._seen += len(rows)
        keys = batch.get("key")
        self._keys += [] if keys is None else [str(keys[i]) for i in rows]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        digest, count = self._reduce_keys(pl_module)
        stale = self._stale_cache(digest, count)
        if stale:  # the same on every rank: the cached files record the global digest
            rank_zero_warn(f"{self.prefix}: cached real statistics were computed on other clips; dropping "
                           f"{sorted(self._cache_paths.values())}, FVD/FID not logged this epoch")
            if trainer.is_global_zero:
                for path in self._cache_paths.values():
                    if os.path.exists(path):
                        os.remove(path)
            for m in self.suite.frechet.values():
                m.clear_real_stats()
            self.suite.real_cached, self._cache_paths = False, None
        results = {**self._compute(skip_frechet=stale), "clips": float(count)}
        if not stale and not self.suite.real_cached and self.suite.frechet and self.cache and self._data_id:
            paths = self.suite.save_real_cache(self.cache, self._data_id, digest, count, write=trainer.is_global_zero)
            rank_zero_info(f"{self.prefix}: real statistics cached in {sorted(paths.values())}")
        self.last_results = results
        for name, value in results.items():
            pl_module.log(f"{self.prefix}/{name}", value, on_epoch=True, sync_dist=False)
        self.suite.reset()
        self._sampler = None

    # ----------------------------------------------------------------------------------------------
    def _rows_to_score(self, trainer: L.Trainer, batch: dict, batch_idx: int) -> list[int]:
        """The rows of ``batch`` this rank scores: those at the positions of its pass that :func:`scored_positions`
        gives (the batches before it full), or, where the loader's order cannot be read, its first clips up to its
        share of ``num_clips``. None of a padding batch's (its clips count nowhere)."""
        if is_padding(batch):
            return []
        rows = batch_rows(batch)
        if self._scored is None:
            quota = clips_for_rank(self.protocol.num_clips, trainer.global_rank, trainer.world_size)
            return list(range(min(rows, max(0, quota - self._seen))))
        first = batch_idx * self._order.batch_size
        return [i for i in range(rows) if first + i in self._scored]

    def _clip_seeds(self, trainer: L.Trainer, batch: dict, batch_idx: int, rows: list[int]) -> list[int]:
        """Seeds of the batch's clips ``rows`` by their identity (:func:`identity_seeds`); where it cannot be
        read, by the clips' positions in the rank-by-rank order (earlier ranks' shares, then this rank's; ``rows``
        then the batch's first), which depend on the world size: warned once under DDP."""
        first = 0 if self._order is None else batch_idx * self._order.batch_size
        seeds = identity_seeds(self.protocol.seed, batch, rows, self._order, first)
        if seeds is not None:
            return seeds
        if trainer.world_size > 1 and not self._warned_positional:
            self._warned_positional = True
            rank_zero_warn(positional_warning(self.prefix, trainer.world_size))
        before = sum(clips_for_rank(self.protocol.num_clips, r, trainer.world_size) for r in range(trainer.global_rank))
        return clip_seeds(self.protocol.seed, before + self._seen, len(rows))

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule, root: nn.Module | None, real: torch.Tensor,
                mask: torch.Tensor, seed: list[int], own: torch.Tensor) -> torch.Tensor:
        """The sampler's ``(B, T, 3, R, R)`` in [-1, 1] with the EMA weights; under FSDP with the root unit's own
        parameters gathered (sampling runs outside the root's forward) in the precision of the training forward.
        The model (``"pipeline"``) samples ``own``, the clips at the data's size ``(B, T, 3, H, W)``, its output
        resized to ``real``'s (:func:`~mardini.evaluation.samplers.to_real_size`); any other sampler ``real``."""
        model = self.sampler_spec == "pipeline" and own.shape != real.shape
        precision = trainer.precision_plugin.forward_context() if root is not None else contextlib.nullcontext()
        with torch.no_grad(), ema_context(pl_module), root_unsharded(root, writeback=False), precision:
            if model:
                return to_real_size(self._sampler(own, mask, seed).clamp(-1, 1), real, mask)  # (B, T, 3, R, R)
            return self._sampler(real, mask, seed).clamp(-1, 1)

    def _compute(self, skip_frechet: bool) -> dict[str, float]:
        if skip_frechet:
            frechet = self.suite.frechet
            keep = {k: m for k, m in self.suite.metrics.items() if k not in frechet}
            full, self.suite.metrics = self.suite.metrics, keep
            try:
                return self.suite.compute()
            finally:
                self.suite.metrics = full
        return self.suite.compute()

    def _reduce_keys(self, pl_module: L.LightningModule) -> tuple[int, int]:
        """Digest and number of the clips scored on all ranks (a collective when distributed)."""
        t = torch.tensor([keys_digest(self._keys), self._seen], dtype=torch.long, device=pl_module.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return int(t[0]), int(t[1])

    def _stale_cache(self, digest: int, count: int) -> bool:
        if not self.suite.real_cached or not self._cache_paths:
            return False
        ref = next(iter(self.suite.frechet.values()))._real_ref or {}
        return ref.get("keys_digest") not in (None, digest) or ref.get("clips") not in (None, count)

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing of the metrics goes into checkpoints


class InterpolationEval(_TaskEval):
    """Interpolation (first and last frames given): FVD, FID, MidF-PSNR/SSIM, trajectory error on synthetic data."""

    TASK = "interpolation"


class ImageToVideoEval(_TaskEval):
    """Image-to-video (first frame given): FVD, FID, trajectory error on synthetic data."""

    TASK = "image_to_video"


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def clips_for_rank(total: int, rank: int, world_size: int) -> int:
    """This rank's share of ``total`` clips."""
    return total // world_size + (rank < total % world_size)


def scored_positions(order: ValidationOrder, num_clips: int, rank: int, world_size: int) -> set[int]:
    """The positions in this rank's validation pass (read as ``order``) whose clips it scores, ``num_clips`` over
    all ranks, each once. A split pass (a ``DistributedSampler``'s share, or its wrapper's): its first clips, up to
    the rank's share (:func:`clips_for_rank`) and never the padding's repeats (``order.distinct``). The whole set on
    every rank (``order.whole_set``: a ``SequentialSampler``, which Lightning leaves unsplit under
    ``use_distributed_sampler: false``): the clips of index ``rank, rank + world_size, ...`` below ``num_clips``, the
    ones a ``DistributedSampler`` would give this rank. Either way each clip is scored once, and an unsplit set
    scores the clips Lightning's split (no shuffle) does. Before, every rank of an unsplit set scored its first
    clips: 8 clips on 2 ranks, clips 0-3 twice and 4-7 never."""
    if order.whole_set:
        return set(range(rank, min(num_clips, order.distinct), world_size))
    return set(range(min(clips_for_rank(num_clips, rank, world_size), order.distinct)))


def batch_rows(batch: dict) -> int:
    """The number of clips of a validation batch (its ``video`` or ``z_high``)."""
    for name in ("video", "z_high"):
        if name in batch:
            return int(batch[name].shape[0])
    raise ValueError(f"an evaluation batch needs 'video' (or 'z_high' and an autoencoder), got {sorted(batch)}")


def val_loader(trainer: L.Trainer) -> Any:
    """The trainer's (first) validation loader, None where it has none."""
    loaders = getattr(trainer, "val_dataloaders", None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders


def key_seed(seed: int, key: Any) -> int:
    """The sampling seed of the clip whose ``key`` is ``key``: a sha256 hash of (seed, key), 63 bits
    (:func:`~mardini.lit.clip_draws.clip_seed`, apart from the validation loss's draws of the same clip)."""
    return clip_seed(seed, f"eval key {key}")


def identity_seeds(
    seed: int, batch: dict, rows: list[int], order: ValidationOrder | None, first: int
) -> list[int] | None:
    """Sampling seeds of the clips ``rows`` of ``batch`` (row numbers) by their identity, as the module's validation
    draws (:class:`~mardini.lit.clip_draws.ClipGenerators`): by the batch's ``key`` where it carries one
    (:func:`key_seed`; ``VideoDataModule``'s batches do), else by the clip's dataset index read from ``order``
    (:func:`~mardini.lit.clip_draws.validation_order`; ``first``: the batch's first position in this rank's pass),
    clip ``i`` getting ``evaluate.py``'s seed of clip ``i`` (``protocol.clip_seeds``). None where neither can be read.
    Either way a clip gets the same seed on 1 rank or N, in any batching."""
    keys = batch.get("key")
    if keys is not None:
        keys = list(keys)
        if rows and len(keys) <= max(rows):
            raise ValueError(f"the batch has {len(keys)} keys for {max(rows) + 1} clips; collate one key per clip")
        return [key_seed(seed, keys[i]) for i in rows]
    if order is None or order.indices is None:
        return None
    return [clip_seeds(seed, order.indices[first + i], 1)[0] for i in rows]


def positional_warning(prefix: str, world_size: int) -> str:
    """The warning for clips whose identity :func:`identity_seeds` cannot read, under DDP."""
    return (f"{prefix}: validation batches without a 'key' on {world_size} ranks, from a loader whose clip order "
            "cannot be read back (not a DistributedSampler over a map-style dataset): each clip is seeded by its "
            "position over the ranks, so its sampling noise, and the scores, depend on the world size; collate a "
            "'key' per clip (a string naming it) to seed each clip by it")


def eval_window(
    batch: dict, pl_module: Any, protocol: EvalProtocol
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The protocol's window of a validation batch: ``video (B, T, 3, R, R)`` in [-1, 1], ``positions``, and the
    same window at the data's size ``(B, T, 3, H, W)`` (what the model samples: its training resolution).

    Latent batches (``z_high``) are decoded with the module's autoencoder. A longer clip is cut to its centred
    ``frames`` window; ``resolution`` (a side or ``(H, W)``) resizes (positions are relative, so they stay valid).
    """
    from mardini.data.transforms import resize_video

    if "video" in batch:
        video = batch["video"]
    elif "z_high" in batch and hasattr(pl_module, "autoencoder"):
        video = pl_module.autoencoder.decode(batch["z_high"].float()).clamp(-1, 1)
    else:
        raise ValueError(f"an evaluation batch needs 'video' (or 'z_high' and an autoencoder), got {sorted(batch)}")
    t = video.shape[1]
    if t < protocol.frames:
        raise ValueError(f"validation clips have {t} frames, the {protocol.task} protocol needs {protocol.frames}; "
                         "raise data.frames or lower the callback's frames")
    start = (t - protocol.frames) // 2
    video = video[:, start : start + protocol.frames].float()  # (B, T, 3, H, W)
    positions = batch.get("positions")
    if positions is not None:
        positions = positions[:, start : start + protocol.frames].to(video.device)  # (B, T, K, 2)
    own = video
    if protocol.resolution is not None:
        video = resize_video(own, protocol.resolution).clamp(-1, 1)  # (B, T, 3, R, R)
    return video, positions, own


def data_identity(trainer: L.Trainer, protocol: EvalProtocol) -> Any:
    """What the validation data of this run is: shard files and loader settings (None when unknown: no cache)."""
    dm = getattr(trainer, "datamodule", None)
    shards = getattr(dm, "val_shards", None)
    if dm is None or not shards:
        return None
    from mardini.data.sharding import list_shards

    try:
        files = files_id(list_shards(shards))
    except (OSError, ValueError):
        return None
    settings = {k: getattr(dm, k, None) for k in ("frames", "fps", "resolution", "val_clips", "num_workers",
                                                   "latents")}
    return {"shards": files, "loader": settings, "world_size": trainer.world_size}

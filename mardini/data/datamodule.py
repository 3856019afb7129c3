"""``VideoDataModule``: streaming clips (or cached latents) from WebDataset shards for any number of ranks.

Batches are dicts:

- pixels: ``video`` ``(B, T, 3, H, W)`` float32 in [-1, 1];
- latents (``latents=True``): ``z_high`` ``(B, T, C, h, w)`` and ``z_low`` ``(B, T, C, h', w')`` float32;
- always: ``fps`` ``(B,)`` float32 (effective rate of the sampled frames), ``key`` list[str], ``skipped``
  (long scalar: bad samples the producing worker dropped since its previous batch);
- when the shards carry them (synthetic): ``positions`` ``(B, T, K, 2)`` float32, (x, y) in [0, 1] of the
  cropped frame, NaN-padded to the most objects in the batch.

Training reads resampled shards (each (rank, worker) its own seed from (seed, rank, worker, epoch) and its
own share of the shards when there are enough), a shuffle buffer, and ``epoch_size`` clips per rank per
epoch. Validation reads a finite split once, centre-cropped, each clip by exactly one (rank, worker): whole shards
per reader when there are at least ranks x workers shards, else every reader scans all the shards and keeps every
(ranks x workers)-th sample (any number of shards works; each rank needs one clip at least, see
:func:`check_validation_split`).
Bad samples are skipped and counted (``batch["skipped"]``, :attr:`VideoDataModule.skipped`; a validation worker
whose share gives no clip is counted through a marker the loader drops, so the step never sees an empty batch).
Local shards without a tar member are left out at ``setup`` (:func:`without_empty_shards`).
Loader workers leave the first SIGTERM to the main process (:func:`leave_first_sigterm_to_main`; a datamodule of
one's own gets it from ``PreemptionSave``: :func:`protect_loader_workers`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import tarfile
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any, Literal

import warnings

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch.utils.data import DataLoader

from mardini.data.batch_split import check_split, epoch_batches, largest_rank_batch, rank_batch
from mardini.data.decode import BadSample, decode_json, frame_stride
from mardini.data.sharding import first_shard_per_folder, list_shards
from mardini.data.stream import ClipStream, StreamLoader, StreamState, name_shards, worker_quota


class VideoDataModule(L.LightningDataModule):
    """Streams fixed-length clips for training and validation.

    Args:
        train_shards: training shards: a directory, brace pattern (``a-{000..099}.tar``), glob, or ``::``-joined.
        val_shards: validation shards (finite split), or None for no validation.
        frames: frames per clip (T).
        fps: target frame rate; the frame stride comes from each clip's own fps (None = native rate).
        resolution: output size, ``int`` for square or ``(H, W)``; for latents, the pixel size they were cached at.
        batch_size: GLOBAL batch size, split over the ranks in ``setup``; when the world size does not divide it,
            the first ``batch_size % world`` ranks get one clip more (:mod:`mardini.data.batch_split`; the training
            loss is weighted to match). At least one clip per rank.
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: samples in the training shuffle buffer (0 = off).
        seed: base seed of every random draw of the stream. None: train.py's ``seed_everything`` (0 from Python, or
            where ``seed_everything`` is false); a resume takes the checkpoint's.
        epoch_size: training clips per rank per epoch (the resampled stream is endless); batches per epoch are
            ``epoch_size`` over the largest per-rank batch, the same on every rank, rounded down to a multiple of
            ``trainer.accumulate_grad_batches`` (with a warning), so that every optimiser step takes a full window.
        crop: ``random`` (crop window and start frame drawn) or ``center`` for training; validation is
            always centred.
        crop_scale: ``(min, max)`` side fraction of the largest window of the target aspect ratio.
        val_clips: at most this many validation clips PER RANK (None = the whole split): each of the rank's loader
            workers takes its part (``val_clips // workers``, one more for the first ``val_clips % workers``) from
            the start of its share of the split. So R ranks validate up to R x ``val_clips`` clips, and which ones
            depends on the world size and ``num_workers`` wherever the cap leaves clips of the split out (``setup``
            warns under DDP: :func:`val_clips_warning`). It stays a per-rank cap because it keeps the ranks'
            validation batches equal (a rank's share of a global count could hold one batch more, which FSDP, whose
            forwards gather from every rank, cannot run); ``val_clips: null`` validates the same clips on any ranks,
            in batches that differ between ranks where the shards differ in size: under FSDP ``setup`` refuses
            unequal validation steps (batches up to an int ``trainer.limit_val_batches``), naming the cap every
            rank fills (:func:`check_equal_validation_batches`).
        val_batch_size: per-rank validation batch (default: the largest per-rank training batch, the same on every
            rank).
        latents: read cached latent shards (``data/cache_latents.py``) instead of pixels.
        pin_memory: the DataLoaders' ``pin_memory``.
        prefetch_factor: the DataLoaders' ``prefetch_factor`` (batches each worker loads ahead).
        loader_timeout: seconds a worker may take to deliver one batch before the run fails with a timeout
            error instead of hanging on a stuck read or decode (workers only; 0 = wait forever).
    """

    def __init__(
        self,
        train_shards: str = "data/shards/synthetic/train",
        val_shards: str | None = "data/shards/synthetic/val",
        frames: int = 9,
        fps: float | None = 8.0,
        resolution: int | tuple[int, int] = 32,
        batch_size: int = 8,
        num_workers: int = 2,
        shuffle_buffer: int = 256,
        seed: int | None = None,
        epoch_size: int = 10_000,
        crop: Literal["random", "center"] = "random",
        crop_scale: tuple[float, float] = (1.0, 1.0),
        val_clips: int | None = 64,
        val_batch_size: int | None = None,
        latents: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        loader_timeout: float = 600.0,
    ) -> None:
        super().__init__()
        checks = [
            ("frames", frames >= 1, ">= 1"),
            ("fps", fps is None or fps > 0, "> 0 or null (native)"),
            ("batch_size", batch_size >= 1, ">= 1"),
            ("num_workers", num_workers >= 0, ">= 0"),
            ("shuffle_buffer", shuffle_buffer >= 0, ">= 0"),
            ("epoch_size", epoch_size >= 1, ">= 1"),
            ("crop", crop in ("random", "center"), "'random' or 'center'"),
            ("crop_scale", 0 < crop_scale[0] <= crop_scale[1] <= 1, "0 < min <= max <= 1"),
            ("val_clips", val_clips is None or val_clips >= 1, ">= 1 or null"),
            ("resolution", min([resolution] if isinstance(resolution, int) else list(resolution)) >= 1
             and (isinstance(resolution, int) or len(resolution) == 2), ">= 1, or [H, W] with both >= 1"),
            ("val_batch_size", val_batch_size is None or val_batch_size >= 1, ">= 1 or null"),
            ("prefetch_factor", prefetch_factor >= 1, ">= 1"),
            ("loader_timeout", loader_timeout >= 0, ">= 0 seconds (0 = no timeout)"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"data.{key}={locals()[key]!r} is impossible: it must be {allowed}")
        seed = 0 if seed is None else seed  # recorded as drawn with (save_hyperparameters reads the arguments now)
        self.save_hyperparameters(logger=False)  # the CLI writes config.yaml; avoids key clashes with the model (frames, seed)
        self.train_shards, self.val_shards = train_shards, val_shards
        self.frames, self.fps, self.resolution = frames, fps, resolution
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.epoch_size = shuffle_buffer, epoch_size
        self.crop, self.crop_scale = crop, tuple(crop_scale)
        self.val_clips, self.val_batch_size = val_clips, val_batch_size
        self.latents, self.pin_memory, self.prefetch_factor = latents, pin_memory, prefetch_factor
        self.loader_timeout = loader_timeout
        self.state = StreamState(seed=seed)
        self.rank, self.world_size = 0, 1
        self.per_rank_batch_size = batch_size
        self.train_set: ClipStream | None = None
        self.val_set: ClipStream | None = None
        self.train_data: dict | None = None  # the training shards' manifest settings (setup), saved in checkpoints

    # ----------------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------------
    def configure_ranks(self, rank: int, world_size: int) -> None:
        """Set this process's rank and the world size (``setup`` takes them from the trainer)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} does not fit world size {world_size}")
        check_split(self.batch_size, world_size)
        self.rank, self.world_size = rank, world_size
        self.per_rank_batch_size = rank_batch(self.batch_size, rank, world_size)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.configure_ranks(self.trainer.global_rank, self.trainer.world_size)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.configure_ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())
        else:
            self.configure_ranks(self.rank, self.world_size)
        common = dict(frames=self.frames, fps=self.fps, resolution=self.resolution, rank=self.rank,
                      world_size=self.world_size, latents=self.latents, state=self.state)
        if stage in (None, "fit"):
            shards = without_empty_shards(list_shards(self.train_shards), "data.train_shards")
            self.train_data = shards_manifest(self.train_shards)
            if self.latents:
                for shard in first_shard_per_folder(shards):  # each cache a pattern joins
                    check_latent_shards(shard, self.frames, self.fps, self.resolution)
            else:
                check_pixel_shards(shards, self.frames, self.fps, self.resolution, "data.train_shards")
            batches = epoch_batches(self.epoch_size, self.batch_size, self.world_size)  # the same on every rank
            if batches < 1:
                raise ValueError(
                    f"data.epoch_size={self.epoch_size} is smaller than one per-rank batch "
                    f"({largest_rank_batch(self.batch_size, self.world_size)}); raise epoch_size"
                )
            batches = self._whole_windows(batches)
            self.train_set = ClipStream(
                shards, batch_size=self.per_rank_batch_size, train=True, shuffle_buffer=self.shuffle_buffer,
                crop=self.crop, crop_scale=self.crop_scale, epoch_batches=batches, **common,
            )
        if stage in (None, "fit", "validate") and self.val_shards:
            shards = without_empty_shards(list_shards(self.val_shards), "data.val_shards")
            check_validation_split(self.val_shards, shards, self.world_size)
            if self.latents:
                for shard in first_shard_per_folder(shards):  # each cache a pattern joins
                    check_latent_shards(shard, self.frames, self.fps, self.resolution)
            else:
                check_pixel_shards(shards, self.frames, self.fps, self.resolution, "data.val_shards")
            self.val_set = ClipStream(
                shards, batch_size=self.val_batch_size or largest_rank_batch(self.batch_size, self.world_size),
                train=False, max_clips=self.val_clips, **common,
            )
            if self.world_size > 1 and self.val_clips is not None and self.rank == 0:
                message = val_clips_warning(self.val_set, max(1, self.num_workers))
                if message:
                    _warn_once(message)
            if self.world_size > 1 and needs_equal_validation_steps(self.trainer):
                check_equal_validation_batches(self.val_set, max(1, self.num_workers), self.val_shards,
                                               validation_step_limit(self.trainer))

    def _whole_windows(self, batches: int) -> int:
        """``batches`` per epoch rounded down to a multiple of the trainer's gradient-accumulation window, with a
        warning, so that every optimiser step takes a full window: Lightning also steps after an epoch's last batch,
        and still divides a short last window's gradient by the window's length. Unchanged without accumulation."""
        window = accumulation_window(self.trainer)
        whole = batches // window * window
        if whole == batches:
            return batches
        per_rank = largest_rank_batch(self.batch_size, self.world_size)
        if whole == 0:
            raise ValueError(
                f"data.epoch_size={self.epoch_size} is smaller than one optimiser step's clips per rank ({window} "
                f"accumulated batches of {per_rank}); raise data.epoch_size to a multiple of {window * per_rank}"
            )
        _warn_once(
            f"data.epoch_size={self.epoch_size} makes {batches} batches of {per_rank} clips per rank, not a multiple of "
            f"the {window} accumulated per optimiser step: an epoch trains {whole} (its last step would take "
            f"{batches - whole}, its gradient still divided by {window}); set data.epoch_size to a multiple of "
            f"{window * per_rank}"
        )
        return whole

    # ----------------------------------------------------------------------------------------------
    # Loaders
    # ----------------------------------------------------------------------------------------------
    def _loader(self, dataset: ClipStream) -> StreamLoader:
        extra = {"prefetch_factor": self.prefetch_factor, "timeout": self.loader_timeout,
                 "worker_init_fn": leave_first_sigterm_to_main} if self.num_workers > 0 else {}
        return StreamLoader(
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=False, **extra,
        )

    def train_dataloader(self) -> StreamLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set)

    def val_dataloader(self) -> StreamLoader | list:
        if self.val_set is None and self.val_shards:
            self.setup("validate")
        return self._loader(self.val_set) if self.val_set is not None else []

    # ----------------------------------------------------------------------------------------------
    # Resumable stream state (Lightning saves it in checkpoints)
    # ----------------------------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Bad samples skipped so far in this process (summed from the batches it received)."""
        return self.state.skipped

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Record where the training stream stands at the batch about to be trained on (exact resume)."""
        if isinstance(batch, dict) and "stream" in batch:
            self.state.mark_trained(batch.pop("stream"), int(batch.get("skipped", 0)))
        return batch

    def state_dict(self) -> dict:
        """The stream position: ``seed``, ``epoch`` (next to start), the epoch in progress and, per worker, the
        raw samples read and batches delivered up to the last batch trained on, and ``skipped`` up to that batch
        too. A resumed run with the same worker count continues that epoch exactly where it stopped (same clips,
        crops and order) and counts the skips of the batches it reads again once. ``train_data``: what the training
        shards' ``manifest.json`` records (:func:`shards_manifest`; the synthetic set's clip count, ...), so that a
        checkpoint says what it was trained on (read, not restored; checkpoints before 2026-12-07 lack it)."""
        s = self.state
        own = {"seed": s.seed, "epoch": s.epoch, "skipped": s.skipped_trained, "in_epoch": s.in_epoch,
               "workers": s.workers, "progress": [[w, *p] for w, p in sorted(s.progress.items())]}
        world = _distributed_world()
        if world is None:
            return {**own, "train_data": self.train_data}
        # Lightning writes rank 0's checkpoint, and every rank calls this when it saves: each rank's own position
        # goes in too (ranks that skipped different numbers of bad samples have read different numbers of them)
        ranks: list = [None] * world[1]
        torch.distributed.all_gather_object(ranks, own)
        return {**own, "ranks": ranks, "train_data": self.train_data}

    def load_state_dict(self, state_dict: dict) -> None:
        ranks = state_dict.get("ranks")
        world = _distributed_world()
        if ranks and world is not None and len(ranks) == world[1]:
            state_dict = ranks[world[0]]  # this rank's own position
        elif ranks and (world is None or len(ranks) != world[1]):
            warnings.warn(f"the checkpoint holds the stream positions of {len(ranks)} ranks and this run has "
                          f"{1 if world is None else world[1]}: every rank resumes from rank 0's position, so the "
                          "clips after the resume are not exactly those of an uninterrupted run", stacklevel=2)
        s = self.state
        s.seed = int(state_dict.get("seed", s.seed))
        s.epoch = int(state_dict.get("epoch", s.epoch))
        s.skipped = int(state_dict.get("skipped", s.skipped))
        progress = {int(w): [int(r), int(b)] for w, r, b in state_dict.get("progress", [])}
        if progress and int(state_dict.get("in_epoch", -1)) >= 0:
            s.resume = {"epoch": int(state_dict["in_epoch"]), "workers": int(state_dict.get("workers", 1)),
                        "progress": progress}


def shards_manifest(shards: str) -> dict | None:
    """The ``settings`` of ``<shards>/manifest.json`` when ``shards`` is a local folder holding one (the shard writers
    record their settings there: :mod:`mardini.data.synthetic_shards`, :mod:`mardini.data.video_shards`,
    :mod:`mardini.data.latent_cache`), else None (a pattern, a list, no manifest, an unreadable one)."""
    manifest = os.path.join(shards, "manifest.json")
    if "::" in shards or not os.path.isfile(manifest):
        return None
    try:
        with open(manifest, encoding="utf-8") as f:
            settings = json.load(f).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def leave_first_sigterm_to_main(worker_id: int) -> None:
    """A loader worker's ``worker_init_fn``: the worker outlives the first SIGTERM it gets. SLURM, ``timeout`` and a
    container stop signal the whole process group; a worker ended there made the main process fail at once
    ("DataLoader worker ... killed by signal: Terminated") before the checkpoint ``PreemptionSave`` saves at the end of
    the step. The main process shuts the worker down after it (or ends with it); a second SIGTERM ends it."""
    signal.signal(signal.SIGTERM, _end_on_the_next_sigterm)


def _end_on_the_next_sigterm(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class LeaveFirstSigtermToMain:
    """A loader's ``worker_init_fn``: :func:`leave_first_sigterm_to_main`, then ``then`` (the loader's own, or None).
    A class, so that loaders of the ``spawn`` start method can pickle it."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        leave_first_sigterm_to_main(worker_id)
        if self.then is not None:
            self.then(worker_id)


def protect_loader_workers(loaders: Any, rank: int = 0) -> Any:
    """Make the workers of every DataLoader in ``loaders`` (a loader, or a list, tuple, dict or ``CombinedLoader`` of
    them: what a ``*_dataloader`` hook returns) outlive their first SIGTERM: a loader with workers gets
    :class:`LeaveFirstSigtermToMain` as its ``worker_init_fn``, chaining its own after it (one without its own, under
    ``seed_everything(workers=True)`` as LightningCLI runs it, chains the seeding Lightning would give it:
    ``pl_worker_init_function`` of ``rank``). Loaders already protected (VideoDataModule's) stay as they are.
    Returns ``loaders``."""
    for loader in dataloaders_in(loaders):
        then = loader.worker_init_fn
        if loader.num_workers == 0 or then is leave_first_sigterm_to_main or isinstance(then, LeaveFirstSigtermToMain):
            continue
        if then is None and int(os.environ.get("PL_SEED_WORKERS", 0)):  # Lightning adds it to loaders without one
            then = partial(pl_worker_init_function, rank=rank)
        loader.worker_init_fn = LeaveFirstSigtermToMain(then)
    return loaders


def dataloaders_in(loaders: Any) -> Iterator[DataLoader]:
    """The DataLoaders in ``loaders``: itself, or those inside a list, tuple, dict or ``CombinedLoader``."""
    if isinstance(loaders, DataLoader):
        yield loaders
    elif isinstance(loaders, CombinedLoader):
        for inner in loaders.flattened:
            yield from dataloaders_in(inner)
    elif isinstance(loaders, Mapping):
        for inner in loaders.values():
            yield from dataloaders_in(inner)
    elif isinstance(loaders, (list, tuple)):
        for inner in loaders:
            yield from dataloaders_in(inner)


def accumulation_window(trainer: L.Trainer | None) -> int:
    """Training batches per optimiser step that an epoch's batch count must be a multiple of: the trainer's
    ``accumulate_grad_batches``, or under a ``GradientAccumulationScheduler`` the least common multiple of its
    windows; 1 without a trainer."""
    if trainer is None:
        return 1
    scheduled = [cb.scheduling.values() for cb in trainer.callbacks if isinstance(cb, GradientAccumulationScheduler)]
    return math.lcm(trainer.accumulate_grad_batches, *(int(k) for ks in scheduled for k in ks))


def _distributed_world() -> tuple[int, int] | None:
    """``(rank, world size)`` of an initialised process group of more than one process, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        return (torch.distributed.get_rank(), world) if world > 1 else None
    return None


# --------------------------------------------------------------------------------------------------
# Shards must match the loader settings (checked on the first sample's json at setup)
# --------------------------------------------------------------------------------------------------

_WARNED: set[str] = set()  # setup-check warnings already given in this process (each once)


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        rank_zero_warn(message)


PROBE_SHARDS = 8  # shards whose first clip the setup check reads


def without_empty_shards(shards: list[str], option: str) -> list[str]:
    """``shards`` less the local ones that hold no tar member (:func:`holds_no_member`), with a warning naming them;
    a ValueError when none is left (the training stream would reopen empty shards for ever). Reads one tar header
    per shard, not the shards."""
    empty = [shard for shard in shards if holds_no_member(shard)]
    if len(empty) == len(shards):
        no_val = f", or set {option}: null to train without validation" if option == "data.val_shards" else ""
        are, them = ("the shard is", "it") if len(shards) == 1 else (f"all {len(shards)} shards are", "them")
        raise ValueError(f"{option}: {are} empty (no tar member: {name_shards(shards)}); rebuild {them} "
                         f"(data/README.md) or give {option} shards that hold clips{no_val}")
    if empty:
        _warn_once(f"{option}: {len(empty)} of {len(shards)} shards are empty (no tar member: {name_shards(empty)}) "
                   f"and are left out; rebuild them (data/README.md) or leave them out of {option}")
    left_out = set(empty)
    return [shard for shard in shards if shard not in left_out]


def holds_no_member(shard: str) -> bool:
    """True for a local file that is empty or a tar archive without a member (its first header is the end of the
    archive); False for anything else, remote or unreadable too (the loader counts those as it reads them)."""
    try:
        if not os.path.isfile(shard):
            return False
        if os.path.getsize(shard) == 0:
            return True
        # the first header only; a .tar read as plain (a third of the time of trying each compression first)
        with tarfile.open(shard, "r:" if shard.endswith(".tar") else "r:*") as tar:
            return tar.next() is None
    except (OSError, tarfile.TarError):
        return False


def check_pixel_shards(shards: list[str], frames: int, fps: float | None, resolution: int | tuple[int, int],
                       option: str = "data.train_shards") -> None:
    """Check the first clip of the first ``PROBE_SHARDS`` pixel shards against what the stage needs, from their
    ``json`` alone (no decode), until one fits.

    Raises a ValueError when every probed clip holds fewer source frames than ``frames`` at ``fps`` span (clips
    of one length would all be skipped as too short, and training would stop after a thousand of them); warns
    (once) when only some of them are too short (shards of mixed rates or lengths: the loader skips and counts
    those), and when the first clip that fits is smaller than ``resolution`` (it is upscaled) or its rate is more
    than 10 % below ``fps`` (the stage trains at the clip's own rate: the stride cannot go below 1). The loader
    itself never skips a clip for its size or rate. A remote or unreadable shard, or a first sample whose json is
    bad, counts as fitting: the loader skips and counts those.
    """
    too_short = []
    for shard in shards[:PROBE_SHARDS]:
        problem = _check_first_clip(shard, frames, fps, resolution, option)
        if problem is None:
            if too_short:
                _warn_once(f"{too_short[0]} (the first clips of {len(too_short)} of the probed shards are too "
                           "short; others fit, so the loader skips and counts the short ones)")
            return
        too_short.append(problem)
    if too_short:
        more = f" (so is the first clip of every shard probed, {len(too_short)})" if len(too_short) > 1 else ""
        raise ValueError(too_short[0].replace(": every clip would", f"{more}: every clip would", 1))


def _check_first_clip(shard: str, frames: int, fps: float | None, resolution: int | tuple[int, int],
                      option: str) -> str | None:
    """The too-short message for the first clip of ``shard`` (None when it fits; the size and rate warnings)."""
    if not os.path.isfile(shard):
        return None
    try:
        meta = decode_json(first_json_bytes(shard))
    except (OSError, tarfile.TarError, ValueError, UnicodeDecodeError, BadSample):
        return None
    src_fps, n_src = float(meta["fps"]), int(meta["frames"])
    stride = frame_stride(src_fps, fps)
    span = (frames - 1) * stride + 1
    at = "its native rate" if fps is None else f"{fps:g} fps"
    clip = f"the first clip of {shard} holds {n_src} frames at {src_fps:g} fps"
    if span > n_src:
        fits = (n_src - 1) // stride + 1
        fixes = [f"set data.frames <= {fits} (and the model's frames with it)"]
        if stride > 1 and frames <= n_src:
            fixes.append(f"a data.fps that gives a smaller stride (data.fps: {src_fps:g} or null takes every frame)")
        fixes.append(f"rebuild {option} with longer clips (data/videos_to_shards.py --clip-frames {span} or more; "
                     f"synthetic shards: data/make_synthetic.py --frames {span})")
        return (
            f"{option}: the stage needs {frames} frames at {at}, a span of {span} source frames (stride {stride} "
            f"from the clip's {src_fps:g} fps), but {clip}: every clip would be skipped as too short. Fix: "
            + "; or ".join(fixes)
        )
    if fps is not None and src_fps < 0.9 * fps:  # integer strides alone can land up to 10 % below: no warning
        _warn_once(
            f"{option}: {clip}, slower than data.fps={fps:g}: the stage trains at {src_fps:g} fps (the frame "
            f"stride cannot go below 1; each batch's fps says so). Rebuild the shards from the source videos with "
            f"data/videos_to_shards.py --max-fps {fps:g} or higher (or no --max-fps), or set data.fps <= {src_fps:g}"
        )
    height, width = meta.get("height"), meta.get("width")
    if isinstance(height, (int, float)) and isinstance(width, (int, float)) and height > 0 and width > 0:
        want_h, want_w = (resolution, resolution) if isinstance(resolution, int) else resolution
        factor = max(want_h / height, want_w / width)
        if factor > 1:
            short = math.ceil(min(height, width) * factor)
            _warn_once(
                f"{option}: the first clip of {shard} is {int(width)}x{int(height)} (WxH), smaller than "
                f"data.resolution={want_h}x{want_w} (HxW): clips are upscaled {factor:.2g}x. Rebuild the shards with "
                f"data/videos_to_shards.py --short-side {short} or more (one shard set per stage "
                f"resolution, or one at the largest), or lower data.resolution"
            )
    return None


# --------------------------------------------------------------------------------------------------
# Latent shards must match the loader settings
# --------------------------------------------------------------------------------------------------


def first_clips(shards: str, n: int, frames: int, resolution: int, fps: float | None) -> torch.Tensor:
    """The first ``n`` usable clips of ``shards`` as training reads them (``frames`` at ``fps``, resized to
    ``resolution``), in the deterministic order of the validation loader: ``(n', T, 3, H, W)`` in [-1, 1], n' <= n."""
    return first_batch(shards, n, frames, resolution, fps)["video"]


def first_batch(shards: str, n: int, frames: int, resolution: int, fps: float | None) -> dict:
    """:func:`first_clips` as the loader's batch: ``video``, ``key`` and, for the synthetic set, ``positions``."""
    if n < 1:
        raise ValueError(f"need at least one clip, got n={n}")
    dm = VideoDataModule(train_shards=shards, val_shards=shards, frames=frames, fps=fps, resolution=resolution,
                         batch_size=n, num_workers=0, val_clips=n)
    dm.setup("validate")  # the validation loader only: no training stream (whose epoch_size has nothing to do here)
    batch = next(iter(dm.val_dataloader()), None)
    if batch is None:
        raise ValueError(f"no clip of {shards!r} could be read (every sample was bad); rebuild the shards")
    return batch


def check_validation_split(pattern: str, shards: list[str], world_size: int) -> None:
    """Raise if the validation split holds fewer clips than ranks: a rank without a validation batch would leave
    the others waiting on it when they sync the metrics. Counts clips (json members) only when there are fewer
    shards than ranks: a shard holds one clip at least, and the ranks' shares differ by one clip at most."""
    if len(shards) >= world_size or not all(os.path.isfile(shard) for shard in shards):  # remote: cannot count
        return
    clips = sum(count_samples(shard) for shard in shards)
    if clips < world_size:
        raise ValueError(
            f"the validation split {pattern!r} holds {clips} clips, fewer than the {world_size} ranks: every rank "
            "needs one validation clip at least (the others wait on its share of the metrics); write more clips "
            "in the validation split, run on fewer processes, or set data.val_shards: null"
        )


def val_clips_warning(stream: ClipStream, workers: int) -> str | None:
    """The warning for ``data.val_clips`` (``stream.max_clips``) on ``stream.world_size`` ranks of ``workers``
    loader workers where the cap leaves clips of the split out (some reader's share holds more samples than its part,
    :func:`~mardini.data.stream.worker_quota`), or may (shards that are not local files are not counted); None where
    every reader reads its whole share: the whole split, the same clips on any world size."""
    local = all(os.path.isfile(shard) for shard in stream.shards)
    if local:
        counts = {shard: count_samples(shard) for shard in stream.shards}
        readers = [copy.copy(stream) for _ in range(stream.world_size)]
        for rank, reader in enumerate(readers):
            reader.rank = rank
        if all(reader.share_samples(worker, workers, counts) <= worker_quota(stream.max_clips, worker, workers)
               for reader in readers for worker in range(workers)):
            return None
    cap, world = stream.max_clips, stream.world_size
    leaves = "leaves clips of the split out" if local else "may leave clips out (remote shards: not counted)"
    return (f"data.val_clips={cap} is a limit per rank, split over its {workers} loader worker(s): these {world} ranks "
            f"validate at most {cap * world} clips, the first of each (rank, worker)'s share, and this {leaves}; "
            "which clips val/loss and the evaluation callbacks score then depends on the world size and "
            "data.num_workers. Set data.val_clips: null to validate the whole split (the same clips on any world "
            "size), or compare runs at one world size and worker count")


def needs_equal_validation_steps(trainer) -> bool:
    """Whether every rank must run as many validation steps: under FSDP each forward gathers the parameters from all
    ranks, so a rank with one batch more waits for ever (DDP's validation forwards need no other rank)."""
    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def validation_step_limit(trainer) -> int | None:
    """The validation steps a rank runs at most whatever its batches: ``trainer.limit_val_batches`` where it counts
    batches (an int; Lightning stops each rank's validation there), else None (a fraction: every batch)."""
    limit = getattr(trainer, "limit_val_batches", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def validation_batches(stream: ClipStream, workers: int, counts: dict[str, int]) -> list[int]:
    """The validation batches each rank of ``stream.world_size`` streams from a finite split whose shards hold
    ``counts`` samples (all of them good), over ``workers`` loader workers: each (rank, worker) batches its share
    (:meth:`ClipStream.share_samples`), capped by its part of ``stream.max_clips``
    (:func:`~mardini.data.stream.worker_quota`)."""
    per_rank = []
    for rank in range(stream.world_size):
        clips = [_reader(stream, rank).share_samples(worker, workers, counts) for worker in range(workers)]
        if stream.max_clips is not None:
            clips = [min(n, worker_quota(stream.max_clips, worker, workers)) for worker, n in enumerate(clips)]
        per_rank.append(sum(math.ceil(n / stream.batch_size) for n in clips))
    return per_rank


def equalising_val_clips(stream: ClipStream, workers: int, counts: dict[str, int]) -> int | None:
    """The largest ``data.val_clips`` that every (rank, worker) share fills (so every rank streams as many
    clips, and batches, as the others); None where no cap does (a worker's share is empty)."""
    fewest = [min(_reader(stream, rank).share_samples(worker, workers, counts) for rank in range(stream.world_size))
              for worker in range(workers)]
    for cap in range(sum(fewest), 0, -1):
        if all(worker_quota(cap, worker, workers) <= n for worker, n in enumerate(fewest)):
            return cap
    return None


def _reader(stream: ClipStream, rank: int) -> ClipStream:
    reader = copy.copy(stream)
    reader.rank = rank
    return reader


def check_equal_validation_batches(stream: ClipStream, workers: int, pattern: str, limit: int | None = None) -> None:
    """Refuse a validation split that gives the ranks unequal numbers of validation steps where every rank must run
    as many (:func:`needs_equal_validation_steps`): ``data.val_clips: null`` on shards of unequal sizes (each rank
    reads its own shards), or a cap some share does not fill; each rank runs its batches up to ``limit``
    (``trainer.limit_val_batches``: :func:`validation_step_limit`), so batches that differ beyond it are no
    problem. Shards that are not local files cannot be counted: a warning says so. Bad samples skipped while
    validating can still unbalance the ranks."""
    if limit == 0:  # no validation step on any rank
        return
    if not all(os.path.isfile(shard) for shard in stream.shards):
        _warn_once(f"the validation shards {pattern!r} are not local files and cannot be counted: under FSDP every "
                   "rank must stream as many validation batches; set data.val_clips to at most the clips of the "
                   "smallest (rank, loader worker) share")
        return
    counts = {shard: count_samples(shard) for shard in stream.shards}
    batches = validation_batches(stream, workers, counts)
    if len({n if limit is None else min(n, limit) for n in batches}) == 1:  # the steps each rank runs
        return
    cap = equalising_val_clips(stream, workers, counts)
    cap_now = "null" if stream.max_clips is None else stream.max_clips
    fix = (f"set data.val_clips: {cap} (a cap per rank that every rank's share fills)" if cap is not None else
           "write the validation split in more shards of equal size, or use fewer data.num_workers")
    if min(batches) > 0:  # every rank then stops at the same step
        fix += f", or trainer.limit_val_batches: {min(batches)}"
    raise ValueError(
        f"under FSDP every rank must run as many validation steps (each forward gathers the parameters from all "
        f"ranks: a rank with a batch more waits for ever), but data.val_clips: {cap_now} gives these "
        f"{stream.world_size} ranks {batches} validation batches of {stream.batch_size} from {pattern!r} "
        f"({sum(counts.values())} clips in {len(counts)} shards, {workers} loader worker(s) per rank); {fix}"
    )


def count_samples(shard: str) -> int:
    """Samples (``json`` members) in a shard, reading the tar headers only, up to where it stops reading as a tar."""
    n = 0
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                n += member.name.endswith(".json")
    except (OSError, tarfile.TarError):
        pass
    return n


def first_json(shard: str) -> dict:
    """The ``json`` member of the first sample of a shard."""
    return json.loads(first_json_bytes(shard))


def first_json_bytes(shard: str) -> bytes:
    """The raw ``json`` member of the first sample of a shard."""
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                return tar.extractfile(member).read()
    raise ValueError(f"shard {shard} has no json member")


def check_latent_shards(shard: str, frames: int, fps: float | None, resolution: int | tuple[int, int]) -> None:
    """Raise if cached latents were made in a format this code does not read, for another resolution, frame rate,
    or too few frames."""
    from mardini.data.latent_cache import check_cache_format

    meta = first_json(shard)
    cache = meta.get("latent_cache")
    if cache is None:
        raise ValueError(f"{shard} is not a latent shard (no 'latent_cache' in its json); set data.latents=false")
    check_cache_format(cache, f"the latent cache {shard}")
    want = [resolution, resolution] if isinstance(resolution, int) else list(resolution)
    if list(cache["resolution"]) != want:
        raise ValueError(f"latents in {shard} were cached at {cache['resolution']}, data.resolution asks {want}")
    cached_fps = cache.get("fps")  # what the cache was asked for (None: native); the clips' own rate can differ
    if (fps is None) != (cached_fps is None) or (fps is not None and abs(float(cached_fps) - fps) > 1e-6):
        def yaml(v):
            return "null" if v is None else v

        raise ValueError(
            f"latents in {shard} were cached with fps {yaml(cached_fps)} (null: native), data.fps asks {yaml(fps)}; "
            f"re-cache with {'--fps ' + str(fps) if fps is not None else 'no --fps'} into a new folder, or set "
            f"data.fps: {yaml(cached_fps)}"
        )
    if cache["frames"] < frames:
        raise ValueError(f"latents in {shard} hold {cache['frames']} frames, data.frames asks {frames}")

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
:func:`~mardini.data.validation_split.check_validation_split`).
Bad samples are skipped and counted (``batch["skipped"]``, :attr:`VideoDataModule.skipped`; a validation worker
whose share gives no clip is counted through a marker the loader drops, so the step never sees an empty batch).
Local shards without a tar member are left out at ``setup``
(:func:`~mardini.data.shard_checks.without_empty_shards`).
Loader workers leave the first SIGTERM to the main process
(:func:`~mardini.data.worker_signals.leave_first_sigterm_to_main`; a datamodule of one's own gets it from
``PreemptionSave``: :func:`~mardini.data.worker_signals.protect_loader_workers`).

This module holds the DataModule and what builds one (:func:`first_batch`); the checks its ``setup`` runs are in
:mod:`mardini.data.shard_checks` (the shards) and :mod:`mardini.data.validation_split` (the split over the ranks),
the loader workers' SIGTERM protection in :mod:`mardini.data.worker_signals`, each re-exported here.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_warn

from mardini.data.batch_split import check_split, epoch_batches, largest_rank_batch, rank_batch
from mardini.data.resumed_data import data_record, gathered_shard_sizes, mixed_epoch, resume_notes, validation_reading
from mardini.data.setup_warnings import warn_once
from mardini.data.shard_checks import (
    PROBE_SHARDS,
    check_latent_shards,
    check_pixel_shards,
    count_samples,
    first_json,
    first_json_bytes,
    holds_no_member,
    shards_manifest,
    without_empty_shards,
)
from mardini.data.sharding import first_shard_per_folder, list_shards
from mardini.data.stream import ClipStream, StreamState
from mardini.data.stream_loader import StreamLoader
from mardini.data.validation_split import (
    all_gather_ranks,
    check_equal_validation_batches,
    check_validation_split,
    equalising_val_clips,
    needs_equal_validation_steps,
    val_clips_warning,
    validation_batches,
    validation_step_limit,
)
from mardini.data.worker_signals import (
    LeaveFirstSigtermToMain,
    dataloaders_in,
    leave_first_sigterm_to_main,
    protect_loader_workers,
)

__all__ = [
    "VideoDataModule", "first_clips", "first_batch", "accumulation_window",
    # re-exported from the modules that define them (train.py, the notebooks, the tests import them from here)
    "PROBE_SHARDS", "check_latent_shards", "check_pixel_shards", "count_samples", "first_json", "first_json_bytes",
    "holds_no_member", "shards_manifest", "without_empty_shards",
    "check_equal_validation_batches", "check_validation_split", "equalising_val_clips", "needs_equal_validation_steps",
    "val_clips_warning", "validation_batches", "validation_step_limit",
    "LeaveFirstSigtermToMain", "dataloaders_in", "leave_first_sigterm_to_main", "protect_loader_workers",
]


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
            rank fills (:func:`check_equal_validation_batches`), and a rank whose bad clips, skipped while
            validating, leave it short of those steps runs zero-weight copies of its last batch in their place.
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
        # setup's path -> bytes of each split (all ranks': gathered_shard_sizes); checkpoints keep a compact record
        self.shard_sizes: dict[str, dict | None] = {"train": None, "val": None}
        self.resumed_data: dict | None = None  # what the checkpoint resumed recorded, until setup compares it

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
            self.shard_sizes["train"] = gathered_shard_sizes(shards, self.rank, self.world_size)
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
            self.shard_sizes["val"] = gathered_shard_sizes(shards, self.rank, self.world_size)
            if self.world_size > 1 and self.val_clips is not None and self.rank == 0:
                message = val_clips_warning(self.val_set, max(1, self.num_workers))
                if message:
                    warn_once(message)
            if self.world_size > 1 and needs_equal_validation_steps(self.trainer):
                self.val_set.min_batches = check_equal_validation_batches(  # a short pass pads up to it
                    self.val_set, max(1, self.num_workers), self.val_shards, validation_step_limit(self.trainer))
        if stage in (None, "fit"):
            self._compare_resumed_data()

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
        warn_once(
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
        checkpoint says what it was trained on (read, not restored; checkpoints before 2026-12-07 lack it). ``data``:
        the shards each split read (a compact record: :func:`~mardini.data.resumed_data.shard_record`) and the
        ``data.*`` settings, which a resume compares with its own
        (:mod:`mardini.data.resumed_data`; checkpoints before 2026-12-08 lack it)."""
        s = self.state
        own = {"seed": s.seed, "epoch": s.epoch, "skipped": s.skipped_trained, "in_epoch": s.in_epoch,
               "workers": s.workers, "progress": [[w, *p] for w, p in sorted(s.progress.items())]}
        world = _distributed_world()
        own_data = {"train_data": self.train_data, "data": self._data_record()}
        if world is None:
            return {**own, **own_data}
        # Lightning writes rank 0's checkpoint, and every rank calls this when it saves: each rank's own position
        # goes in too (ranks that skipped different numbers of bad samples have read different numbers of them)
        ranks: list = [None] * world[1]
        torch.distributed.all_gather_object(ranks, own)
        return {**own, "ranks": ranks, **own_data}

    def load_state_dict(self, state_dict: dict) -> None:
        self.resumed_data = state_dict.get("data")  # every rank's (None from checkpoints before 2026-12-08)
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
        if self.train_set is not None:  # Lightning restores after setup; a caller may load before it
            self._compare_resumed_data()

    def _data_record(self, seed: int | None = None, whole: bool = False) -> dict:
        """What a checkpoint records of the data this module reads (:func:`~mardini.data.resumed_data.data_record`),
        with the stream's seed or ``seed`` (the one the settings ask); ``whole`` keeps the shard lists whole (what a
        resume compares with, to name the shards that changed where the checkpoint holds their list)."""
        seed = self.state.seed if seed is None else seed
        return data_record(dict(self.hparams), seed, self.shard_sizes["train"], self.shard_sizes["val"],
                           self._validation_reading(), whole)

    def _validation_reading(self) -> dict | None:
        """How the validation split is read (:func:`~mardini.data.resumed_data.validation_reading`): the trainer's
        ``limit_val_batches`` (None without a trainer), the validation batch, workers and world size. None before
        ``setup`` read the split."""
        if self.val_set is None:
            return None
        limit = getattr(self.trainer, "limit_val_batches", None) if self.trainer is not None else None
        return validation_reading(limit, self.val_set.batch_size, self.num_workers, self.world_size)

    def _compare_resumed_data(self) -> None:
        """Warn (rank 0) naming what changed in the data since the checkpoint resumed, and start the training
        stream's next epoch where its shards changed (:func:`~mardini.data.resumed_data.resume_notes`). Once per
        resume; a ``validate`` compares nothing (it logs a run of its own)."""
        old, self.resumed_data = self.resumed_data, None
        if old is None or self.trainer is not None and self.trainer.state.fn != "fit":
            return
        new = self._data_record(seed=self.hparams.seed, whole=True)
        notes, restart = resume_notes(old, new, self.state.epoch)
        for note in notes:
            rank_zero_warn(note)
        others = self._ranks_restarting(restart)
        if others and not restart:
            rank_zero_warn(f"resuming with other training shards than the checkpoint's on rank(s) {others} (their "
                           "files differ from rank 0's: node-local copies?): every rank starts epoch "
                           f"{self.state.epoch} instead of going on mid-epoch, so that the ranks read one epoch")
        if restart or others:
            self.state.resume = None  # StreamLoader starts epoch state.epoch, the checkpoint's next
        old_batch = (old.get("settings") or {}).get("batch_size")
        if old_batch not in (None, self.batch_size) and self.train_set is not None:  # the global batch: every rank
            note = mixed_epoch(self.state.resume, rank_batch(old_batch, self.rank, self.world_size),
                               self.per_rank_batch_size, self.train_set.epoch_batches, max(1, self.num_workers))
            if note is not None:  # every rank marks an epoch that ended (mixed_epoch), rank 0 says it
                rank_zero_warn(note)

    def _ranks_restarting(self, restart: bool) -> list[int]:
        """The ranks whose training shards changed since the checkpoint (``restart`` is this rank's), where a process
        group runs (a collective: every rank calls it). Each rank compares the checkpoint's record (rank 0's files)
        with the files it sees: where only some see a change, all must start the next epoch, or the ranks would read
        different epochs (and yield different numbers of batches) from then on."""
        flags = all_gather_ranks(restart, self.world_size)  # None: one process
        return [rank for rank, flag in enumerate(flags or []) if flag]


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

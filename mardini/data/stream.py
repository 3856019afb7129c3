"""The clip stream: a WebDataset pipeline that yields ready batches, and the loader that counts skips.

One :class:`ClipStream` serves either the training stream (resampled shards, endless, split into epochs by
``with_epoch``) or a finite split, read once: each shard by exactly one (rank, worker) when there are at least as
many shards as readers (ranks x workers), else each sample by exactly one reader (every reader scans all the shards
and keeps every k-th sample, see :meth:`ClipStream.sample_share`). Batching happens inside the workers so that
every batch can carry ``skipped``: the number of bad samples its worker dropped since its previous batch. A finite split's worker whose share gave no clip at all still reports its skips, on a
clip-less marker ``{"skipped": n}`` (:func:`skip_only`). :class:`StreamLoader` sums ``skipped`` into
:attr:`StreamState.skipped` in the main process (markers are counted, never passed on) and advances the epoch
every time the training stream starts.

Seeds: every (seed, rank, worker, epoch) gets its own ``numpy.random.SeedSequence`` entropy, which drives
the shard resampling, the shuffle buffer, the temporal start and the crop.

The worker's skip counter is :mod:`mardini.data.skip_log`, the batch and its skip-only marker
:mod:`mardini.data.batching`, the loader :mod:`mardini.data.stream_loader` (re-exported here).
"""

from __future__ import annotations

import io
import os
import random
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mardini.data.batching import collate, skip_only
from mardini.data.decode import (
    BadSample,
    BadShape,
    decode_json,
    decode_mp4,
    decode_npy,
    frame_indices,
    max_start,
    npy_header,
)
from mardini.data.sharding import split_shards
from mardini.data.skip_log import FIXES, SkipLog, fix_for
from mardini.data.stream_loader import StreamLoader
from mardini.data.transforms import Size, crop_and_resize

__all__ = [
    "StreamState", "stream_seed", "worker_info", "worker_quota", "openable_url", "name_shards", "ClipStream",
    # re-exported from the modules that define them (the DataModule, the evaluation and the tests import them here)
    "collate", "skip_only", "FIXES", "SkipLog", "fix_for", "StreamLoader",
]


# --------------------------------------------------------------------------------------------------
# Shared state and seeds
# --------------------------------------------------------------------------------------------------


@dataclass
class StreamState:
    """What the DataModule saves in checkpoints, plus the skip counters (main process)."""

    seed: int = 0
    epoch: int = 0  # epoch number the next training stream will use
    skipped: int = 0  # bad samples dropped so far (summed from the batches)
    # of those, the ones on training batches fetched but not yet trained on (the loader runs ahead): a checkpoint
    # leaves them out, as its position does, so that a resumed run that reads those batches again counts them once
    in_flight: int = 0
    in_epoch: int = -1  # epoch of the training stream being consumed (-1: none started)
    workers: int = 1  # worker processes of that stream
    # worker -> [raw samples read, batches delivered] up to the last batch TRAINED ON (see
    # VideoDataModule.on_before_batch_transfer); a resumed run skips exactly these.
    progress: dict[int, list[int]] = field(default_factory=dict)
    resume: dict | None = None  # set by load_state_dict: continue epoch ``resume["epoch"]`` mid-way

    def mark_trained(self, position: torch.Tensor, skipped: int = 0) -> None:
        """Record a training batch's ``stream`` position ``[worker, raw samples read, batches delivered]`` and that
        its ``skipped`` count is no longer in flight."""
        worker, raw, batches = (int(v) for v in position.tolist())
        self.progress[worker] = [raw, batches]
        self.in_flight = max(0, self.in_flight - int(skipped))

    @property
    def skipped_trained(self) -> int:
        """Bad samples dropped up to the last batch trained on (what a checkpoint saves)."""
        return self.skipped - self.in_flight


def stream_seed(seed: int, rank: int, worker: int, epoch: int, salt: int = 0) -> int:
    """A 63-bit seed unique to (seed, rank, worker, epoch, salt)."""
    return int(np.random.SeedSequence([seed, rank, worker, epoch, salt]).generate_state(1, np.uint64)[0] >> 1)


def worker_info() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the current DataLoader process; ``(0, 1)`` in the main one."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def worker_quota(max_clips: int, worker: int, workers: int) -> int:
    """Loader worker ``worker``'s part of a rank's ``max_clips`` validation clips: ``max_clips // workers``, one
    more for the first ``max_clips % workers`` workers."""
    return max_clips // workers + (worker < max_clips % workers)


def _constant_zero() -> int:
    return 0


def _ignore_and_continue(exn: Exception) -> bool:
    """webdataset handler of a sample-split reader other than slot 0: the error is counted there."""
    return True


def _shard_samples(item: dict, handler) -> Iterator[dict]:
    """The samples of one shard ``item`` (``{"url": ...}``), as ``wds.tarfile_samples`` reads them, with the
    shard's file closed once its read ends or is abandoned (webdataset leaves it to the garbage collector, which
    warns ``ResourceWarning: unclosed file``)."""
    url = item["url"]
    for source in wds.tariterators.url_opener([{**item, "url": openable_url(url)}], handler=handler):
        source["url"] = url  # the samples' __url__, as given
        try:
            files = wds.tariterators.tar_file_expander([source], handler=handler)
            yield from wds.tariterators.group_by_keys(files, handler=handler)
        finally:
            source["stream"].close()


def openable_url(url: str) -> str:
    """``url`` as webdataset opens it: a local file whose path parses as a URL with a scheme (a Windows drive,
    ``C:\\data\\a.tar``; a folder named ``run:1``) as a ``file://`` URL, which it opens as that file (given as it is,
    it failed: "no gopen handler defined" and every shard skipped as corrupt); anything else as it is."""
    if urllib.parse.urlparse(url).scheme and os.path.isfile(url):
        return Path(url).absolute().as_uri()
    return url


def name_shards(shards: list[str]) -> str:
    """The first few of ``shards``, for a message."""
    return ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")


def _no_sample(shards: list[str], whose: str) -> str:
    """The error for training shards (``whose``: of which reader) that give no sample at all."""
    give, them = ("the shard gives", "it") if len(shards) == 1 else (f"all {len(shards)} shards give", "them")
    return (f"data.train_shards{whose}: {give} no sample ({name_shards(shards)}: empty tar archives, or members not "
            f"named key.extension); rebuild {them} (data/README.md) or leave {them} out of data.train_shards")


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


class ClipStream(IterableDataset):
    """Yields batch dicts (see :mod:`mardini.data.datamodule` for the keys) from shards; a finite split's share
    that gave no clip but skipped some ends with a skip-only marker instead (:func:`skip_only`).

    Args:
        shards: shard paths (already expanded).
        frames: frames per clip.
        fps: target frame rate (None = the clip's own rate; ignored for latents, whose frame selection was fixed
            by the cache).
        resolution: ``int`` (square) or ``(H, W)`` output size; for latents, the pixel resolution the cache
            was made at (checked by the DataModule).
        batch_size: clips per batch on this rank.
        train: True = endless resampled stream cut into ``epoch_batches`` per epoch; False = finite split.
        rank: this process's rank in distributed training.
        world_size: the number of processes in distributed training.
        shuffle_buffer: samples held by the shuffle buffer (train only; 0 = off).
        crop: ``random`` or ``center`` crop window (train; a finite split always uses ``center``); ``random``
            also draws the temporal start, ``center`` centres it.
        crop_scale: ``(min, max)`` side fraction of the largest window of the target aspect ratio (``random``:
            drawn in it; ``center``: ``max``).
        epoch_batches: batches per epoch on this rank (train).
        max_clips: at most this many clips per rank from a finite split, each worker taking its part
            (:func:`worker_quota`) from the start of its share (None = all).
        latents: read ``z_high.npy`` / ``z_low.npy`` instead of pixels.
        keep_meta: also return each sample's parsed json (batch key ``meta``, a list of dicts), and with a finite
            split the raw samples read through each batch (``raw_read``, an int: where ``start_raw`` goes on).
        state: shared :class:`StreamState` (seed, epoch).
        max_consecutive_bad: this many bad samples in a row means a wrong setup: raise a ValueError.
        start_raw: a finite split (one reader) starts after its first ``start_raw`` raw samples, read but not
            decoded (a resumed evaluation going on after the clips it did; ``max_clips`` counts from there).
    """

    def __init__(
        self,
        shards: list[str],
        frames: int,
        fps: float | None,
        resolution: Size,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 256,
        crop: str = "random",
        crop_scale: tuple[float, float] = (1.0, 1.0),
        epoch_batches: int | None = None,
        max_clips: int | None = None,
        latents: bool = False,
        keep_meta: bool = False,
        state: StreamState | None = None,
        max_consecutive_bad: int = 1000,
        start_raw: int = 0,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("ClipStream needs at least one shard")
        if batch_size < 1 or frames < 1:
            raise ValueError(f"batch_size and frames must be >= 1, got {batch_size}, {frames}")
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        self.shards = list(shards)
        self.frames, self.fps, self.resolution = frames, fps, resolution
        self.batch_size, self.train = batch_size, train
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.crop = crop if train else "center"
        self.crop_scale = tuple(crop_scale)
        self.epoch_batches, self.max_clips = epoch_batches, max_clips
        # a finite pass's batches at least: StreamLoader pads a short one with zero-weight copies (FSDP validation)
        self.min_batches: int | None = None
        self.latents, self.keep_meta = latents, keep_meta
        self.state = state if state is not None else StreamState()
        self.current_epoch = self.state.epoch
        self.resume_progress: dict[int, list[int]] = {}  # worker -> [raw samples, batches] already trained on
        self.worker_shift = 0  # DataLoader worker k reads as worker (k + shift) % workers (a resumed epoch)
        self.max_consecutive_bad = max_consecutive_bad
        self.start_raw = start_raw

    def __len__(self) -> int:
        if self.train and self.epoch_batches is not None:
            return self.epoch_batches
        raise TypeError("a finite split streams an unknown number of batches")

    # ----------------------------------------------------------------------------------------------
    def my_shards(self, worker: int, workers: int) -> list[str]:
        """Shards this (rank, worker) reads. Finite split: a disjoint share when there are at least as many shards
        as readers, else all of them (:meth:`sample_share` then splits the samples).
        Train: a disjoint share too when the shards split evenly among ranks x workers, else all of them: every
        reader delivers the same number of batches, so uneven shares would draw the shards of the smaller ones more
        often (3 shards on 2 workers: one shard half of all clips)."""
        readers = self.world_size * workers
        if self.train and len(self.shards) % readers == 0 or not self.train and len(self.shards) >= readers:
            return split_shards(self.shards, self.rank, self.world_size, worker, workers)
        return self.shards

    def sample_share(self, worker: int, workers: int) -> tuple[int, int] | None:
        """``(slot, readers)`` when this (rank, worker) keeps the raw samples ``i`` (counted over all the shards in
        order) with ``i % readers == slot``: a finite split of fewer shards than readers. Slots go round the ranks
        first (sample i to rank ``i % world_size``), so the ranks' shares differ by one clip at most. None when
        the reader keeps every sample of its shards (training, or a split of at least one shard per reader)."""
        readers = self.world_size * workers
        if self.train or len(self.shards) >= readers:
            return None
        return worker * self.world_size + self.rank, readers

    def share_samples(self, worker: int, workers: int, counts: dict[str, int]) -> int:
        """Raw samples this (rank, worker) reads of a finite split whose shards hold ``counts`` samples."""
        share = self.sample_share(worker, workers)
        if share is None:
            return sum(counts[shard] for shard in self.my_shards(worker, workers))
        slot, readers = share
        return len(range(slot, sum(counts.values()), readers))

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_info()
        if self.train:  # the worker whose part of the epoch this process reads (see StreamLoader)
            worker = (worker + self.worker_shift) % workers
        epoch = self.current_epoch if self.train else 0
        seed = stream_seed(self.state.seed, self.rank, worker, epoch, salt=int(not self.train))
        skips = SkipLog(self.max_consecutive_bad if self.train else 0)
        self.skip_log = skips  # the reasons of this iteration's skips, for a caller iterating in its own process
        skip_raw, done_batches = self.resume_progress.get(worker, [0, 0]) if self.train else (self.start_raw, 0)
        shards = self.my_shards(worker, workers)
        share = self.sample_share(worker, workers)
        if self.train:
            source = wds.ResampledShards(shards, seed=seed, worker_seed=_constant_zero, deterministic=True)
        else:
            source = wds.SimpleShardList(shards)  # in order, each once
        # every reader of a sample-split meets the same shard read errors: only slot 0 counts them
        handler = skips.tar_handler if share is None or share[0] == 0 else _ignore_and_continue
        stages = [source, lambda src: self._samples(src, handler, shards, worker), skips.tally]
        if share is not None:  # before decoding: each sample, good or bad, is decoded and counted by one reader
            slot, readers = share
            stages.append(lambda src: (s for i, s in enumerate(src) if i % readers == slot))
        if self.train and self.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 64), rng=random.Random(seed)))
        stages.append(lambda src: self._decode_all(src, seed, skips, skip_raw))
        if not self.train and self.max_clips is not None:
            quota = worker_quota(self.max_clips, worker, workers)
            stages.append(lambda src: (s for _, s in zip(range(quota), src)))
        stages.append(lambda src: self._batches(src, skips, worker, done_batches))
        pipeline = wds.DataPipeline(*stages)
        if self.train and self.epoch_batches is not None:
            mine = self.epoch_batches // workers + (worker < self.epoch_batches % workers) - done_batches
            if mine <= 0:  # more workers than batches in an epoch: this one has nothing to do
                return iter(())
            pipeline = pipeline.with_epoch(nbatches=mine)
        return iter(pipeline)

    # ----------------------------------------------------------------------------------------------
    def _samples(self, src: Iterator[dict], handler, shards: list[str], worker: int) -> Iterator[dict]:
        """Raw samples of each shard of ``src`` (``{"url": ...}``), read one shard at a time (webdataset's
        ``tarfile_samples``) to know which reads gave nothing.

        Training: once every shard of this reader has been read in a row (since its last sample) without giving a
        sample or a read error, they are empty and the resampled stream would reopen them for ever: raise a
        ValueError naming them. An empty shard among good ones is only reopened now and then (``setup`` leaves out
        the local shards that hold no member: :func:`mardini.data.shard_checks.without_empty_shards`)."""
        mine, empty = set(shards), set()  # empty: the shards read since the last sample that gave nothing at all
        failed = False

        def counted(exn: Exception) -> bool:
            nonlocal failed
            failed = True
            return handler(exn)

        for item in src:
            failed, gave = False, False
            for sample in _shard_samples(item, counted):
                gave = True
                yield sample
            if gave:
                empty.clear()
            elif not failed and self.train:
                empty.add(item["url"])
                if empty >= mine:
                    whose = f" read by rank {self.rank}, loader worker {worker}" if len(mine) < len(self.shards) else ""
                    raise ValueError(_no_sample(sorted(mine), whose))

    def _decode_all(self, src: Iterator[dict], seed: int, skips: SkipLog, skip_raw: int = 0) -> Iterator[dict]:
        """Decode raw samples; the random draws of sample ``i`` come from (seed, i) alone, so a resumed stream
        skips the first ``skip_raw`` raw samples without decoding them and continues bit-identically."""
        gen = torch.Generator()
        # Read errors (a truncated shard) met while replaying the first skip_raw samples were counted before the
        # checkpoint: the replay reads the same bytes in the same order, so they fire again at the same places.
        skips.muted = skip_raw > 0
        for index, raw in enumerate(src):
            if index < skip_raw:
                skips.muted = index + 1 < skip_raw  # errors met on the way to sample skip_raw are new
                continue
            gen.manual_seed(stream_seed(seed, index, 0, 0, salt=7))
            key = raw.get("__key__", "?")
            try:
                out = self.decode_latents(raw, gen) if self.latents else self.decode_pixels(raw, gen)
            except BadSample as e:
                skips.add(e.reason, f"{raw.get('__url__', '?')}:{key}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 -- a bad sample must never stop training; counted
                skips.add(f"error {type(e).__name__}", f"{raw.get('__url__', '?')}:{key}: {e!r}")
                continue
            skips.consecutive = 0
            out["key"] = key
            out["raw_read"] = index + 1
            if not self.keep_meta:
                for name in ("meta", "indices", "crop"):
                    out.pop(name, None)
            yield out

    def _start(self, last: int, gen: torch.Generator) -> int:
        if self.crop == "random":
            return int(torch.randint(0, last + 1, (), generator=gen))
        return last // 2

    def decode_pixels(self, raw: dict, gen: torch.Generator) -> dict:
        """One raw sample -> ``video (T, 3, H, W)`` in [-1, 1], ``fps``, optional ``positions (T, K, 2)``."""
        if "json" not in raw:
            raise BadSample("sample has no json member")
        meta = decode_json(raw["json"])
        n_src = int(meta["frames"])
        start = self._start(max_start(float(meta["fps"]), n_src, self.fps, self.frames), gen)
        idx, eff_fps = frame_indices(float(meta["fps"]), n_src, self.fps, self.frames, start)
        if "video.mp4" in raw:
            arr = decode_mp4(raw["video.mp4"], idx)  # (T, H, W, 3) uint8
        elif "video.npy" in raw:
            arr = decode_npy(raw["video.npy"], idx)  # (T, H, W, 3) uint8
        else:
            raise BadSample(f"sample has no video.mp4 or video.npy member (has {sorted(raw)})")
        h, w = arr.shape[1:3]
        video, (top, left, ch, cw) = crop_and_resize(arr, self.resolution, self.crop, gen, self.crop_scale)
        # video: (T, 3, h, w) in [-1, 1]
        out = {"video": video, "fps": eff_fps, "meta": meta, "indices": idx.tolist(), "crop": [top, left, ch, cw]}
        if "positions" in meta:
            pos = _positions(meta["positions"])  # (T_src, K, 2)
            if pos.ndim != 3 or pos.shape[0] != n_src or pos.shape[2] != 2:
                raise BadShape(f"positions must be (frames={n_src}, K, 2), got {pos.shape}")
            pos = pos[idx]  # (T, K, 2)
            pos[..., 0] = (pos[..., 0] * w - left) / cw  # crop-relative x in [0, 1]
            pos[..., 1] = (pos[..., 1] * h - top) / ch  # crop-relative y
            out["positions"] = torch.from_numpy(pos)
        return out

    def decode_latents(self, raw: dict, gen: torch.Generator) -> dict:
        """One cached sample -> ``z_high (T, C, h, w)``, ``z_low (T, C, h', w')`` float32, ``fps``, positions."""
        if "json" not in raw or "z_high.npy" not in raw or "z_low.npy" not in raw:
            raise BadSample(f"latent sample needs json, z_high.npy and z_low.npy (has {sorted(raw)})")
        meta = decode_json(raw["json"])
        z_high = _load_array(raw["z_high.npy"], "z_high")  # (T_c, C, h, w)
        z_low = _load_array(raw["z_low.npy"], "z_low")  # (T_c, C, h', w')
        if z_high.ndim != 4 or z_low.ndim != 4 or z_high.shape[0] != z_low.shape[0]:
            raise BadShape(f"z_high {z_high.shape} and z_low {z_low.shape} must be (T, C, h, w) with the same T")
        n = z_high.shape[0]
        if n < self.frames:
            raise BadSample(f"cached clip has {n} latent frames, need {self.frames}; re-cache with more frames")
        start = self._start(n - self.frames, gen)
        sl = slice(start, start + self.frames)
        out = {
            "z_high": torch.from_numpy(z_high[sl].astype(np.float32)),  # (T, C, h, w)
            "z_low": torch.from_numpy(z_low[sl].astype(np.float32)),  # (T, C, h', w')
            "fps": float(meta["fps"]),
            "meta": meta,
        }
        if "positions" in meta:
            pos = _positions(meta["positions"])  # (T_c, K, 2)
            if pos.ndim != 3 or pos.shape[0] != n:
                raise BadShape(f"positions must be ({n}, K, 2), got {pos.shape}")
            out["positions"] = torch.from_numpy(pos[sl])  # (T, K, 2)
        return out

    # ----------------------------------------------------------------------------------------------
    def _batches(self, src: Iterator[dict], skips: SkipLog, worker: int = 0, done: int = 0) -> Iterator[dict]:
        """Group decoded samples into batches (by hand: each batch also carries this worker's skip count).

        Training batches also carry ``stream = [worker, raw samples read, batches delivered]`` (the resume
        position). A finite split holds each batch back until the next one is ready, so the skips found after
        the last sample still reach (the last) batch; a share that gave no clip ends with a skip-only marker.
        The training stream never ends (resampled), and drains its skips into each batch as it is made.
        """
        buf: list[dict] = []
        held: dict | None = None
        for sample in src:
            buf.append(sample)
            if len(buf) == self.batch_size:
                batch = collate(buf, skips.drain())
                raw_read = buf[-1]["raw_read"]
                buf = []
                if self.train:
                    done += 1
                    batch["stream"] = torch.tensor([worker, raw_read, done], dtype=torch.long)
                    yield batch
                    continue
                if self.keep_meta:
                    batch["raw_read"] = raw_read
                if held is not None:
                    yield held
                held = batch
        if self.train:
            return
        if buf:
            if held is not None:
                yield held
            held = collate(buf, 0)
            if self.keep_meta:
                held["raw_read"] = buf[-1]["raw_read"]
        if held is not None:
            held["skipped"] += skips.drain()
            yield held
        elif skips.pending:  # no clip in this share: the skips need an item of their own (see skip_only)
            yield {"skipped": torch.tensor(skips.drain(), dtype=torch.long)}


def _load_array(data: bytes, name: str) -> np.ndarray:
    npy_header(data, f"{name}.npy")  # a corrupt or lying header fails before anything is allocated
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises many types on corrupt input
        raise BadShape(f"{name}.npy does not load: {type(e).__name__}: {e}") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadShape(f"{name}.npy holds NaN or inf values; re-cache this clip")
    return array


def _positions(value) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadShape(f"json 'positions' is not an array of numbers: {e}") from None

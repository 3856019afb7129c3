"""The DataLoader over a :class:`~mardini.data.stream.ClipStream`: it takes the training epoch (and a resume's
position) when a pass starts, sums the batches' ``skipped`` into the shared state, drops skip-only markers and pads a
finite pass that ran short of its ``min_batches`` with zero-weight batches."""

from __future__ import annotations

import gc
import logging
import traceback
import warnings
from collections.abc import Iterator

from torch.utils.data import DataLoader

from mardini.data.batching import padding_of, skip_only

log = logging.getLogger("mardini.data")


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`~mardini.data.stream.ClipStream` (``batch_size=None``: the stream batches).

    Each new iteration of a training stream takes the next epoch number from the shared state (workers get
    it when they start, so use ``persistent_workers=False``) when its first batch is asked for, not at ``iter()``:
    Lightning restoring a checkpoint saved in an epoch's last validation iterates that finished epoch again without
    reading it, and such an iterator must leave the epoch number and the resume position alone (taking them made
    the resumed run skip a data epoch). A resume position marked ``ended`` (another batch size whose trained batches
    fill the epoch: :func:`~mardini.data.resumed_data.mixed_epoch`) gives no batch: Lightning ends that epoch, and
    the next iteration starts the next one. Every batch's ``skipped`` is added to ``state.skipped`` and to
    :attr:`pass_skipped` (this pass's), and skip-only markers (:func:`skip_only`) end there: the consumer sees clips
    only. Before it starts workers it collects the garbage of this process, which a forked worker would free without
    the threads it may hold.

    A finite stream whose ``min_batches`` is set (the validation steps every rank runs under FSDP, counted at
    ``setup`` from the tar headers) and whose pass gives fewer batches (bad clips skipped at decode time) ends with
    copies of its last batch that weigh 0 (:func:`~mardini.data.batching.padding_of`), with a warning: every rank then
    runs as many steps. Before, that rank's validation ended early and the others waited in an all-gather for ever.
    """

    pass_skipped = 0  # bad samples counted in the current (or last) pass over the loader

    def __iter__(self) -> Iterator[dict]:
        # a generator: nothing below runs (no epoch taken, no worker started) until the first batch is asked for
        from mardini.data.stream import ClipStream  # not at the top: stream.py imports this module

        self.pass_skipped = 0
        ds = self.dataset
        if isinstance(ds, ClipStream) and ds.train:
            state, workers = ds.state, max(1, self.num_workers)
            resume, state.resume = state.resume, None
            if resume is not None and resume.get("ended"):
                return  # a resume under another batch size whose trained batches fill the epoch: it ends, no batch
            ds.current_epoch, ds.resume_progress, ds.worker_shift = state.epoch, {}, 0
            if resume is not None:
                delivered = sum(b for _, b in resume["progress"].values())
                if resume["workers"] != workers:
                    log.warning(
                        "not continuing epoch %d mid-way: it was read by %d workers, now %d; starting epoch %d",
                        resume["epoch"], resume["workers"], workers, state.epoch,
                    )
                elif ds.epoch_batches is None or delivered < ds.epoch_batches:
                    ds.current_epoch = resume["epoch"]
                    ds.resume_progress = {w: list(p) for w, p in resume["progress"].items()}
                    # batch i of an epoch comes from worker i % workers, and the DataLoader asks its workers in turn
                    # from its first: that one reads as the worker whose batch is due, so the order goes on
                    ds.worker_shift = delivered % workers
            state.epoch = ds.current_epoch + 1
            state.in_epoch, state.workers = ds.current_epoch, workers
            state.progress = {w: list(p) for w, p in ds.resume_progress.items()}
            state.in_flight = 0  # a new stream: batches the last one fetched and never trained are not read again
        if self.num_workers > 0:
            # A forked worker inherits the garbage not yet collected here and frees it when its own collector runs:
            # garbage holding a running video decoder hung it for ever (freeing the decoder waits for its threads,
            # which the fork does not copy). Collected here, where the threads run.
            gc.collect()
        yield from self._count(super().__iter__())

    def _count(self, it: Iterator[dict]) -> Iterator[dict]:
        state = getattr(self.dataset, "state", None)
        given, last = 0, None  # this pass's batches, and the last of them (the padding's template)
        try:
            for batch in it:
                self.pass_skipped += int(batch.get("skipped", 0))
                if state is not None:
                    state.skipped += int(batch.get("skipped", 0))
                    if "stream" in batch:  # a training batch: in flight until trained on (StreamState.in_flight)
                        state.in_flight += int(batch.get("skipped", 0))
                if not skip_only(batch):
                    given, last = given + 1, batch
                    yield batch
        except Exception as err:
            # A worker's error (a data error, a timeout) leaves the iterator's frames in the traceback, holding it
            # alive to the end of the process: its workers, which outlive the first SIGTERM (see
            # worker_signals.leave_first_sigterm_to_main), then blocked the exit, where multiprocessing sends one
            # SIGTERM and waits. Clearing those frames frees the iterator now, which shuts its workers down.
            traceback.clear_frames(err.__traceback__)
            del it
            raise
        yield from self._padding(given, last)

    def _padding(self, given: int, last: dict | None) -> Iterator[dict]:
        """Zero-weight copies of ``last`` up to the dataset's ``min_batches`` after a pass that gave ``given``."""
        wanted = getattr(self.dataset, "min_batches", None)
        if wanted is None or given >= wanted:
            return
        rank = getattr(self.dataset, "rank", 0)
        if last is None:
            raise RuntimeError(
                f"rank {rank}'s validation pass gave no usable clip ({self.pass_skipped} bad ones skipped) of the "
                f"{wanted} batches every rank runs under FSDP: the other ranks wait on its steps; rebuild or leave out "
                "the bad validation shards (the skip log names them), or set data.val_shards: null")
        warnings.warn(
            f"rank {rank}'s validation pass gave {given} batches of the {wanted} every rank runs under FSDP "
            f"({self.pass_skipped} bad clips skipped at decode time): it runs {wanted - given} copies of its last "
            "batch that weigh 0, so that the other ranks' all-gathers do not wait on it; rebuild or leave out the bad "
            "validation shards (the skip log names them) to validate every clip", stacklevel=2)
        for _ in range(wanted - given):
            yield padding_of(last)

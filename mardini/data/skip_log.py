"""Counting bad samples inside one loader worker: :class:`SkipLog` tallies them by reason, logs the first few of each,
and stops the stream with a ValueError that names the fix (:func:`fix_for`) after too many in a row."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

log = logging.getLogger("mardini.data")


# What to change when most bad samples share one reason (the ValueError of SkipLog says it).
FIXES = {
    "too few frames": "the clips are shorter than data.frames at data.fps span (frames - 1) * stride + 1 with "
    "stride round(clip fps / data.fps); lower data.frames (and the model's frames), choose a data.fps that gives a "
    "smaller stride, or rebuild the shards with longer clips (data/videos_to_shards.py --clip-frames)",
    "bad json": "the samples' json members lack a positive 'fps' and 'frames'; rebuild the shards with "
    "data/videos_to_shards.py or data/make_synthetic.py",
    "corrupt video": "the video members do not decode; rebuild the shards (data/videos_to_shards.py) or leave the "
    "broken ones out of the shard pattern",
    "corrupt shard": "the shard files do not read as tar archives (truncated or not shards); rebuild them or leave "
    "them out of the shard pattern",
    "wrong shape": "the arrays do not have the expected shape (pixels: uint8 (T, H, W, 3); latents: z_high and "
    "z_low (T, C, h, w)); rebuild the shards or re-cache the latents with the stage's settings",
    "bad sample": "the samples lack the members the loader reads (json + video.mp4 or video.npy; with "
    "data.latents=true json + z_high.npy + z_low.npy, enough latent frames): check data.latents and data.frames, "
    "or rebuild / re-cache the shards",
}


def fix_for(reason: str) -> str:
    """What to change when most bad samples fail for ``reason`` (a :class:`SkipLog` key)."""
    return FIXES.get(reason, "an unexpected error while decoding; the last detail above names it")


class SkipLog:
    """Counts bad samples by reason inside one worker; logs the first few of each reason."""

    def __init__(self, max_consecutive: int) -> None:
        self.muted = False  # a resumed stream replaying what the checkpoint already counted
        self.pending = 0
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, str] = {}  # the first detail of each reason
        self.consecutive = 0
        self.max_consecutive = max_consecutive
        self.read: Counter[str] = Counter()  # samples of the current read of each shard (url), for read errors
        self._first_key: dict[str, str] = {}  # each shard's first sample: meeting it again starts a new read

    def add(self, reason: str, detail: str) -> None:
        if self.muted:
            return
        self.pending += 1
        self.reasons[reason] += 1
        self.examples.setdefault(reason, detail)
        self.consecutive += 1
        if self.reasons[reason] <= 3:
            log.warning("skipping a bad sample (%s): %s", reason, detail)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            reason = self.reasons.most_common(1)[0][0]
            # a ValueError: the shards or settings are wrong, and train.py reports it in one line as other data errors
            raise ValueError(
                f"{self.consecutive} bad samples in a row (counts {dict(self.reasons)}; last: {detail}); "
                f"the shards do not fit the loader settings or are broken. Mostly {reason!r}: {fix_for(reason)}"
            )

    def tar_handler(self, exn: Exception) -> bool:
        """webdataset handler for unreadable shards / tar members: count and go on. A shard that breaks partway
        counts once, its samples after the break unknown; the message says after how many samples it broke."""
        url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else None  # webdataset appends the url
        read = self.read.get(url, 0) if url else 0
        where = f"{url} broke after {read} samples (the rest of this read of it is lost): " if read else ""
        self.add("corrupt shard", f"{where}{exn!r}")
        return True

    def tally(self, src: Iterator[dict]) -> Iterator[dict]:
        """Pass raw samples through, counting each shard's current read (``self.read``)."""
        for sample in src:
            url, key = sample.get("__url__", "?"), sample.get("__key__")
            if self._first_key.setdefault(url, key) == key:
                self.read[url] = 0  # a (re)read of the shard from its start (training resamples shards)
            self.read[url] += 1
            yield sample

    def drain(self) -> int:
        n, self.pending = self.pending, 0
        return n

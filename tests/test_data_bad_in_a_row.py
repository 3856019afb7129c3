"""The training stream's "bad samples in a row" limit: it counts a run of bad samples, and a good one ends the run."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

from mardini.data import synthetic as S
from mardini.data.sharding import atomic_tar, npy_bytes
from mardini.data.stream import ClipStream


def _shard(path: Path, pattern: str) -> str:
    """A shard of good (``g``) and bad (``b``: an unreadable npy) samples in the order of ``pattern``."""
    good = npy_bytes(S.render_clip(1, frames=12, height=16, width=16)[0])
    meta = json.dumps({"fps": 16.0, "frames": 12}).encode()
    with atomic_tar(path) as sink:
        for i, kind in enumerate(pattern):
            sink.write({"__key__": f"{kind}{i}", "video.npy": good if kind == "g" else b"junk", "json": meta})
    return str(path)


def _stream(shard: str) -> ClipStream:
    return ClipStream([shard], frames=4, fps=None, resolution=8, batch_size=1, train=True, shuffle_buffer=0,
                      max_consecutive_bad=2)


def test_bad_samples_between_good_ones_never_reach_the_limit_and_each_is_counted(tmp_path):
    stream = _stream(_shard(tmp_path / "alternating-000000.tar", "bgbgbgbg"))
    batches = list(islice(iter(stream), 8))  # two reads of the shard: 8 bad samples, one before each good one
    assert [b["key"] for b in batches] == [[f"g{i}"] for i in (1, 3, 5, 7)] * 2
    assert [int(b["skipped"]) for b in batches] == [1] * 8


def test_the_limit_stops_a_run_of_bad_samples(tmp_path):
    stream = _stream(_shard(tmp_path / "run-000000.tar", "gbbg"))
    with pytest.raises(ValueError, match="2 bad samples in a row"):
        list(islice(iter(stream), 2))

"""Bad data never stops training: fuzzed members fail as a counted ``BadSample``, loaders skip them and never hang.

Hypothesis feeds the decoders truncated, corrupted and wrong-type members (random bytes, bytes of another format,
cut or bit-flipped mp4s, npy headers that claim huge shapes, json with wrong types or huge numbers); whole shards of
such members go through the stream, with and without worker processes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mardini.data.datamodule import VideoDataModule
from mardini.data.decode import BadSample, decode_json, decode_mp4, decode_npy
from mardini.data.encode import encode_mp4
from mardini.data.sharding import atomic_tar, npy_bytes
from mardini.data.stream import ClipStream, skip_only
from mardini.data.testing import moving_frames

FRAMES = moving_frames(12, 16, 16)  # (T, H, W, 3) uint8
MP4 = encode_mp4(FRAMES, 16.0)
NPY = npy_bytes(FRAMES)
META = json.dumps({"fps": 16.0, "frames": 12}).encode()
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# --------------------------------------------------------------------------------------------------
# Members that are bad for a known reason
# --------------------------------------------------------------------------------------------------


def _npy_header(shape: tuple, dtype: str = "|u1", payload: bytes = b"") -> bytes:
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload


def _one_frame_mp4() -> bytes:
    return encode_mp4(FRAMES[:1], 16.0)


def _other_size_mp4() -> bytes:
    return encode_mp4(moving_frames(12, 8, 24), 16.0)


BAD = {  # name -> (members of the sample); each must be skipped
    "bad json": {"json": b"{oops", "video.npy": NPY},
    "json list": {"json": b"[1, 2]", "video.npy": NPY},
    "json string fps": {"json": b'{"fps": "16", "frames": 12}', "video.npy": NPY},
    "json infinite frames": {"json": b'{"fps": 16, "frames": Infinity}', "video.npy": NPY},
    "json huge frames": {"json": b'{"fps": 16, "frames": 1e300}', "video.npy": NPY},
    "json NaN fps": {"json": b'{"fps": NaN, "frames": 12}', "video.npy": NPY},
    "json not utf8": {"json": b"\xff\xfe\x00", "video.npy": NPY},
    "json bad positions": {"json": b'{"fps": 16, "frames": 12, "positions": [["a"]]}', "video.npy": NPY},
    "no json": {"video.npy": NPY},
    "no video": {"json": META},
    "empty mp4": {"json": META, "video.mp4": b""},
    "mp4 of one frame": {"json": META, "video.mp4": _one_frame_mp4()},
    "truncated mp4": {"json": META, "video.mp4": MP4[: len(MP4) // 4]},
    "non-video bytes as mp4": {"json": META, "video.mp4": b"PK\x03\x04 this is a zip, not a video" * 20},
    "npy bytes as mp4": {"json": META, "video.mp4": NPY},
    "empty npy": {"json": META, "video.npy": b""},
    "float npy": {"json": META, "video.npy": npy_bytes(FRAMES.astype(np.float32))},
    "npy of 2 channels": {"json": META, "video.npy": npy_bytes(FRAMES[..., :2].copy())},
    "npy of zero-size frames": {"json": META, "video.npy": npy_bytes(np.zeros((12, 0, 16, 3), np.uint8))},
    "npy header claims a huge shape": {"json": META, "video.npy": _npy_header((10**6, 10**5, 10**5, 3), payload=b"x")},
    "npy header claims more than it holds": {"json": META, "video.npy": _npy_header((12, 64, 64, 3), payload=NPY[200:])},
    "npy object dtype": {"json": META, "video.npy": _npy_header((2,), "|O", b"\x80\x04N.")},
    "json claims more frames than the video": {"json": json.dumps({"fps": 16, "frames": 400}).encode(),
                                               "video.npy": NPY},
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(BAD))
def test_each_kind_of_bad_member_is_a_bad_sample(name):
    stream = ClipStream(["unused"], frames=4, fps=8, resolution=8, batch_size=1, train=False)
    with pytest.raises(BadSample) as info:
        stream.decode_pixels({"__key__": name, **BAD[name]}, torch.Generator().manual_seed(0))
    assert str(info.value) and info.value.reason  # a message and a counter key


def test_other_frame_size_is_cropped_to_the_training_size():
    stream = ClipStream(["unused"], frames=4, fps=8, resolution=8, batch_size=1, train=False)
    out = stream.decode_pixels({"json": META, "video.mp4": _other_size_mp4()}, torch.Generator().manual_seed(0))
    assert out["video"].shape == (4, 3, 8, 8)


# --------------------------------------------------------------------------------------------------
# Fuzzed members: a decoder returns a valid array or raises BadSample, nothing else
# --------------------------------------------------------------------------------------------------


def _mutations(base: bytes) -> st.SearchStrategy[bytes]:
    cut = st.integers(0, len(base)).map(lambda n: base[:n])
    flips = st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(1, 255)), min_size=1, max_size=8).map(
        lambda fl: bytes(_flip(bytearray(base), fl)))
    splice = st.tuples(st.integers(0, len(base)), st.binary(min_size=1, max_size=64)).map(
        lambda t: base[: t[0]] + t[1] + base[t[0]:])
    return st.one_of(cut, flips, splice, st.binary(max_size=2048))


def _flip(buf: bytearray, flips) -> bytearray:
    for pos, x in flips:
        buf[pos] ^= x
    return buf


def _check_video(out: np.ndarray) -> None:
    assert out.dtype == np.uint8 and out.ndim == 4 and out.shape[-1] == 3 and min(out.shape) >= 1


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=300)
@given(data=_mutations(MP4), wanted=st.sampled_from([None, np.arange(4), np.array([0, 5, 11])]))
def test_fuzzed_mp4_decodes_or_is_a_bad_sample(data, wanted):
    try:
        out = decode_mp4(data, wanted)
    except BadSample:
        return
    _check_video(out)


@pytest.mark.timeout(120)
@FUZZ
@given(data=_mutations(NPY), wanted=st.sampled_from([None, np.arange(4)]))
def test_fuzzed_npy_decodes_or_is_a_bad_sample(data, wanted):
    try:
        out = decode_npy(data, wanted)
    except BadSample:
        return
    _check_video(out)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.timeout(120)
@FUZZ
@given(meta=st.dictionaries(st.sampled_from(["fps", "frames", "positions", "x"]), _JSON_VALUES, max_size=4)
       | _JSON_VALUES, raw=st.binary(max_size=64), use_raw=st.booleans())
def test_fuzzed_json_and_sample_decode_or_is_a_bad_sample(meta, raw, use_raw):
    data = raw if use_raw else json.dumps(meta).encode()
    stream = ClipStream(["unused"], frames=4, fps=8, resolution=8, batch_size=1, train=True)
    try:
        out = stream.decode_pixels({"json": data, "video.npy": NPY}, torch.Generator().manual_seed(0))
    except BadSample:
        return
    assert out["video"].shape == (4, 3, 8, 8) and torch.isfinite(out["video"]).all()
    parsed = decode_json(data)
    assert parsed["fps"] > 0 and parsed["frames"] >= 1


# --------------------------------------------------------------------------------------------------
# Whole shards through the stream: every good sample arrives, every bad one is skipped and counted
# --------------------------------------------------------------------------------------------------


def _write_shard(path, samples: list[tuple[str, dict]]) -> None:
    with atomic_tar(path) as sink:
        for key, members in samples:
            sink.write({"__key__": key, **members})


@pytest.mark.timeout(180)
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kinds=st.lists(st.sampled_from(["good", "good-mp4", *sorted(BAD)]), min_size=1, max_size=16),
       fuzzed=st.lists(_mutations(MP4), max_size=3))
def test_stream_skips_and_counts_every_bad_sample(tmp_path_factory, kinds, fuzzed):
    samples = []
    for i, kind in enumerate(kinds):
        members = {"good": {"json": META, "video.npy": NPY}, "good-mp4": {"json": META, "video.mp4": MP4}}.get(kind)
        samples.append((f"{i:03d}-{'good' if members else 'bad'}", members or BAD[kind]))
    for j, data in enumerate(fuzzed):
        samples.append((f"{len(kinds) + j:03d}-fuzz", {"json": META, "video.mp4": data}))
    shard = tmp_path_factory.mktemp("fuzz") / "s-000000.tar"
    _write_shard(shard, samples)
    stream = ClipStream([str(shard)], frames=4, fps=8, resolution=8, batch_size=2, train=False)
    batches = list(stream)
    keys = [k for b in batches if not skip_only(b) for k in b["key"]]
    skipped = sum(int(b["skipped"]) for b in batches)
    good = [k for k, _ in samples if k.endswith("-good")]
    bad = [k for k, _ in samples if k.endswith("-bad")]
    assert set(good) <= set(keys) and not set(bad) & set(keys)
    assert keys == sorted(keys)  # order kept
    assert len(keys) + skipped == len(samples)  # each sample either arrives or is counted
    # no good sample: the count rides on one skip-only marker instead of a batch
    assert [skip_only(b) for b in batches] == ([True] if not keys else [False] * len(batches))


# --------------------------------------------------------------------------------------------------
# Worker processes: bad samples are skipped there too; a stuck or dying worker fails fast, never hangs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("badshards")
    names = sorted(BAD)
    for s in range(4):
        samples = []
        for i in range(8):
            kind = names[(s * 8 + i) % len(names)] if i % 2 else "good"
            samples.append((f"s{s}-{i:02d}", BAD.get(kind, {"json": META, "video.npy": NPY})))
        _write_shard(root / f"bad-{s:06d}.tar", samples)
    (root / "bad-000004.tar").write_bytes((root / "bad-000000.tar").read_bytes()[:5000])  # a truncated shard
    return root


def _dm(root, **kw) -> VideoDataModule:
    args = dict(train_shards=str(root), val_shards=str(root), frames=4, fps=8, resolution=8, batch_size=2,
                num_workers=2, shuffle_buffer=4, epoch_size=8, val_clips=None)
    return VideoDataModule(**{**args, **kw})


@pytest.mark.timeout(60)
def test_workers_skip_and_count_bad_samples(bad_shards):
    dm = _dm(bad_shards)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(f"s{s}-{i:02d}" for s in range(4) for i in range(0, 8, 2))
    # 4 bad per full shard; the truncated copy of shard 0 adds what it holds plus its own read error
    assert dm.skipped == sum(int(b["skipped"]) for b in batches) >= 16 + 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers, any_good", [(2, True), (2, False), (0, False)])
def test_a_share_without_a_good_sample_still_counts_its_skips(tmp_path, num_workers, any_good):
    names, good = sorted(BAD), {"json": META, "video.npy": NPY}
    _write_shard(tmp_path / "v-000000.tar", [(f"a{i}", BAD[names[i]]) for i in range(3)])  # worker 0: bad only
    second = [("b0", good), ("b1", BAD[names[3]]), ("b2", good)] if any_good else [("b0", BAD[names[4]])]
    _write_shard(tmp_path / "v-000001.tar", second)
    dm = _dm(tmp_path, num_workers=num_workers)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert all(b["key"] and b["video"].shape[0] == len(b["key"]) for b in batches)  # never an empty batch
    assert [k for b in batches for k in b["key"]] == (["b0", "b2"] if any_good else [])
    assert dm.skipped == 3 + 1  # the bad-only share's skips are counted too


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers, unreadable", [(0, False), (2, False), (0, True), (2, True)])
def test_a_resumed_run_counts_each_skip_once(tmp_path, num_workers, unreadable):
    """The loader runs ahead of training: a checkpoint's skip count stops at the last batch trained on, as its
    position does, so the batches read again after the resume are not counted twice. An unreadable shard's read
    error, met again while the resumed stream replays up to its position, is not counted twice either."""
    names, good = sorted(BAD), {"json": META, "video.npy": NPY}
    for s in range(2):  # every other sample bad: almost every batch carries skips
        _write_shard(tmp_path / f"t-{s:06d}.tar", [(f"s{s}-{i:02d}", good if i % 2 else BAD[names[(s + i) % 5]])
                                                   for i in range(16)])
    if unreadable:  # a third shard that does not read as a tar: a read error, no sample
        (tmp_path / "t-000002.tar").write_bytes(bytes(range(256)) * 40)
    kw = dict(num_workers=num_workers, epoch_size=16 if unreadable else 12, shuffle_buffer=1)
    trained = 6 if unreadable else 4  # with the unreadable shard: its read error comes before the checkpoint

    full = _dm(tmp_path, **kw)
    full.setup("fit")
    reference = list(full.train_dataloader())  # one epoch, 6 batches
    first = _dm(tmp_path, **kw)
    first.setup("fit")
    it = iter(first.train_dataloader())
    for _ in range(trained):  # an even count: with 2 workers the resumed loader starts at worker 0 again
        first.on_before_batch_transfer(next(it), 0)  # trained on
    ahead = next(it)  # fetched, never trained on
    assert int(ahead["skipped"]) > 0  # else the test shows nothing
    state = first.state_dict()
    del it
    assert state["skipped"] == sum(int(b["skipped"]) for b in reference[:trained]) == first.skipped - int(ahead["skipped"])

    resumed = _dm(tmp_path, **kw)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    rest = list(resumed.train_dataloader())
    assert [b["key"] for b in rest] == [b["key"] for b in reference[trained:]]
    assert resumed.skipped == full.skipped == sum(int(b["skipped"]) for b in reference)


@pytest.mark.timeout(60)
def test_a_stuck_decoder_fails_with_a_timeout_not_a_hang(bad_shards, monkeypatch):
    def stuck(*args, **kwargs):
        time.sleep(600)

    monkeypatch.setattr(ClipStream, "decode_pixels", stuck)  # forked workers inherit it
    dm = _dm(bad_shards, loader_timeout=2, num_workers=1)
    dm.setup("fit")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out"):
        next(iter(dm.train_dataloader()))
    assert time.monotonic() - start < 30


@pytest.mark.timeout(60)
def test_a_worker_killed_by_a_sample_fails_fast_with_the_signal(bad_shards, monkeypatch):
    def crash(self, raw, gen):
        os.kill(os.getpid(), signal.SIGKILL)  # what a segfaulting decoder or the OOM killer does

    monkeypatch.setattr(ClipStream, "decode_pixels", crash)
    dm = _dm(bad_shards)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=r"DataLoader worker .*(exited unexpectedly|killed by signal)"):
        next(iter(dm.train_dataloader()))


# --------------------------------------------------------------------------------------------------
# The counts reach the training module and are logged
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_skipped_counts_reach_the_module_and_are_logged(bad_shards, tmp_path):
    import lightning as L

    from mardini.lit import GenerationModule

    seen: list[int] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(int(batch["skipped"]))

    dm = _dm(bad_shards, val_shards=None, num_workers=1, epoch_size=12)
    model = GenerationModule(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[Spy()])
    trainer.fit(model, datamodule=dm)
    assert sum(seen) > 0  # the shards are half bad: batches carry their skips
    assert float(trainer.logged_metrics["data/skipped"]) == sum(seen)
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "data/skipped" in rows.splitlines()[0]
    path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(path)
    before = sum(seen)
    resumed = GenerationModule(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[Spy()])
    trainer.fit(resumed, datamodule=_dm(bad_shards, val_shards=None, num_workers=1, epoch_size=12),
                ckpt_path=str(path))
    assert len(seen) == 8 and sum(seen) > before  # the resumed steps' batches carry skips too
    assert resumed._skipped_total == sum(seen)  # the logged count goes on from the checkpoint's


def test_a_shard_that_breaks_partway_says_after_how_many_samples(tmp_path, caplog):
    full = tmp_path / "full.tar"
    _write_shard(full, [(f"k{i:02d}", {"json": META, "video.npy": NPY}) for i in range(6)])
    broken = tmp_path / "broken-000000.tar"
    broken.write_bytes(full.read_bytes()[: full.stat().st_size * 3 // 5])  # ends inside a later sample
    dm = _dm(tmp_path, num_workers=0, train_shards=str(broken), val_shards=str(broken))
    dm.setup("validate")
    with caplog.at_level(logging.WARNING):
        keys = [k for b in dm.val_dataloader() for k in b.get("key", [])]
    assert 0 < len(keys) < 6
    said = [r.getMessage() for r in caplog.records if "corrupt shard" in r.getMessage()]
    assert any(f"broken-000000.tar broke after {len(keys)} samples" in m for m in said), said

"""VideoDataModule: batch contract, rank/worker splits, seeded resumable streams, errors, skipped-sample counts."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import warnings
from contextlib import closing
from pathlib import Path

import av
import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds

from mardini.data import synthetic as S
from mardini.data.datamodule import VideoDataModule
from mardini.data.encode import encode_mp4
from mardini.data.sharding import atomic_tar, list_shards, npy_bytes, split_shards
from mardini.data.stream import ClipStream, StreamLoader, _shard_samples
from mardini.data.testing import moving_frames, tiny_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("synth"))


def _dm(root: Path, **kw) -> VideoDataModule:
    args = dict(train_shards=str(root / "train"), val_shards=str(root / "val"), frames=4, fps=8, resolution=8,
                batch_size=4, num_workers=0, shuffle_buffer=8, epoch_size=16, val_clips=None)
    args.update(kw)
    return VideoDataModule(**args)


def _val_keys(dm: VideoDataModule) -> list[str]:
    return [k for b in dm.val_dataloader() for k in b["key"]]


# --------------------------------------------------------------------------------------------------
# Batch contract
# --------------------------------------------------------------------------------------------------


def test_batch_contract(synth):
    dm = _dm(synth)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 4, 3, 8, 8) and batch["video"].dtype == torch.float32
    assert -1 <= float(batch["video"].min()) < float(batch["video"].max()) <= 1
    assert batch["fps"].dtype == torch.float32 and batch["fps"].tolist() == [8.0] * 4
    assert len(batch["key"]) == 4 and all(k.startswith("train-") for k in batch["key"])
    pos = batch["positions"]
    assert pos.shape[:2] == (4, 4) and pos.shape[-1] == 2 and pos.dtype == torch.float32
    assert int(batch["skipped"]) == 0
    # NaN padding: a clip with fewer objects than the batch maximum has NaN columns, the rest are finite
    n_obj = (~pos[:, 0, :, 0].isnan()).sum(1)
    assert (n_obj >= 2).all() and torch.isfinite(pos[:, :, : int(n_obj.min())]).all()


def test_positions_follow_frame_selection_and_crop(synth):
    dm = _dm(synth, frames=3, fps=8, resolution=16)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    key = batch["key"][0]
    idx = int(key.split("-")[1])
    from mardini.data.synthetic_shards import clip_seed

    _, meta = S.render_clip(clip_seed("val", idx), frames=12, height=16, width=16)
    full = np.asarray(meta["positions"], np.float32)  # (12, K, 2)
    start = (12 - 5) // 2  # centred start, stride 2 (16 -> 8 fps), span 5
    k = full.shape[1]
    assert torch.allclose(batch["positions"][0, :, :k], torch.from_numpy(full[start : start + 5 : 2]), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Finite split: disjoint, complete coverage over ranks and workers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_val_split_is_disjoint_and_complete(synth, world):
    seen = []
    for rank in range(world):
        dm = _dm(synth, num_workers=2, batch_size=2 * world)
        dm.configure_ranks(rank, world)
        dm.setup("validate")
        seen.append(_val_keys(dm))
    flat = [k for keys in seen for k in keys]
    assert len(flat) == len(set(flat)) == 16  # every clip exactly once
    assert all(len(keys) == 16 // world for keys in seen)


@pytest.fixture(scope="module")
def one_val_shard(tmp_path_factory) -> Path:
    """``val/``: a single shard of 7 clips (what a small videos_to_shards.py run writes)."""
    from mardini.data.synthetic_shards import write_synthetic_split

    root = tmp_path_factory.mktemp("one_val_shard")
    write_synthetic_split(root, "val", 7, 7, frames=12, height=16, width=16, fps=16.0, progress=False)
    return root


def _rank_keys(root: Path, world: int, **kw) -> list[list[str]]:
    """Validation keys of each rank of ``world``, read one rank at a time."""
    seen = []
    for rank in range(world):
        dm = _dm(root, batch_size=2 * world, **kw)
        dm.configure_ranks(rank, world)
        dm.setup("validate")
        seen.append(_val_keys(dm))
    return seen


def test_one_val_shard_feeds_every_worker_each_clip_once(one_val_shard):
    # 1 shard, 2 worker processes: both scan it, each keeps every other sample
    (keys,) = _rank_keys(one_val_shard, 1, num_workers=2)
    assert sorted(keys) == [f"val-{i:07d}" for i in range(7)]


@pytest.mark.parametrize(("world", "workers", "shards"), [(2, 0, "one"), (2, 2, "one"), (3, 2, "one"), (4, 3, "eight")])
def test_fewer_val_shards_than_readers_split_by_sample(one_val_shard, synth, world, workers, shards):
    root, total = (one_val_shard, 7) if shards == "one" else (synth, 16)
    seen = _rank_keys(root, world, num_workers=workers)
    flat = [k for keys in seen for k in keys]
    assert len(flat) == len(set(flat)) == total  # every clip exactly once, whatever the ranks and workers
    assert max(map(len, seen)) - min(map(len, seen)) <= 1  # samples go round the ranks first: balanced


def test_val_shard_split_is_kept_when_every_reader_has_a_shard(synth):
    stream = ClipStream(list_shards(str(synth / "val")), frames=2, fps=None, resolution=8, batch_size=2,
                        train=False, rank=1, world_size=2)
    assert stream.sample_share(0, 4) is None  # 8 shards, 8 readers: whole shards, as before
    assert stream.my_shards(0, 4) == split_shards(stream.shards, 1, 2, 0, 4)
    assert stream.sample_share(1, 5) == (1 * 2 + 1, 10) and stream.my_shards(1, 5) == stream.shards


def _setup_warnings(root: Path, rank: int, world: int, **kw) -> list[str]:
    """The warnings ``setup("validate")`` gives on rank ``rank`` of ``world``."""
    import warnings

    dm = _dm(root, batch_size=2 * world, **kw)
    dm.configure_ranks(rank, world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("validate")
    return [str(w.message) for w in caught]


def test_val_clips_is_a_cap_per_rank_and_setup_warns_under_ddp_where_it_leaves_clips_out(synth, monkeypatch):
    """16 clips in 8 shards. val_clips caps each rank's (and worker's) share, so the clips validated depend on the
    world size: val_clips=2 in one process reads val-0 and val-1, val_clips=1 on each of 2 ranks val-0 and val-2.
    Under DDP setup says so once, naming the fix; it does not where every reader reads its whole share (the whole
    split, the same clips on any world size), nor in one process. Before, nothing said it."""
    from mardini.data import setup_warnings

    monkeypatch.setattr(setup_warnings, "WARNED", set())
    caught = _setup_warnings(synth, 0, 2, val_clips=1)
    cap = [m for m in caught if "data.val_clips=1 is a limit per rank" in m]
    assert len(cap) == 1 and "these 2 ranks validate at most 2 clips" in cap[0] and "leaves clips of" in cap[0]
    assert "data.val_clips: null" in cap[0]
    assert not [m for m in _setup_warnings(synth, 0, 2, val_clips=1) if "val_clips" in m]  # once
    (one,) = _rank_keys(synth, 1, val_clips=2)
    two = [k for keys in _rank_keys(synth, 2, val_clips=1) for k in keys]
    assert one == ["val-0000000", "val-0000001"] and two == ["val-0000000", "val-0000002"]
    monkeypatch.setattr(setup_warnings, "WARNED", set())
    assert [m for m in _setup_warnings(synth, 0, 2, val_clips=7, num_workers=2) if "val_clips=7" in m]  # 4 > 3
    for world, kw in [(2, {"val_clips": 8}), (2, {"val_clips": 8, "num_workers": 2}), (1, {"val_clips": 4})]:
        assert not [m for m in _setup_warnings(synth, 0, world, **kw) if "val_clips" in m], (world, kw)


def _fsdp_rank(dm: VideoDataModule, rank: int, world: int) -> VideoDataModule:
    """``dm`` as rank ``rank`` of ``world`` under FSDP sees its trainer (the parts ``setup`` reads)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, strategy=FSDPStrategy())
    return dm


@pytest.mark.parametrize(("data", "world", "kw"), [("synth", 3, {}), ("synth", 3, {"num_workers": 2}),
                                                   ("synth", 2, {"val_clips": 5, "num_workers": 2}),
                                                   ("one", 2, {"val_batch_size": 1}), ("one", 3, {"num_workers": 2})])
def test_validation_batches_counts_what_each_rank_streams(synth, one_val_shard, data, world, kw):
    """The count logic of the FSDP check (``validation_batches``) against each rank's loader, read one rank at a time:
    with data.val_clips null, 16 clips in 8 shards of 2 give 3 ranks 3, 3 and 2 batches of 2 (each rank reads its
    own shards), 7 clips of one shard on 2 ranks in batches of 1 give 4 and 3: unequal, which FSDP cannot run."""
    from mardini.data.datamodule import count_samples, validation_batches

    root = synth if data == "synth" else one_val_shard
    streamed = []
    for rank in range(world):
        dm = _dm(root, batch_size=2 * world, **kw)
        dm.configure_ranks(rank, world)
        dm.setup("validate")
        streamed.append(len(list(dm.val_dataloader())))
    counts = {shard: count_samples(shard) for shard in dm.val_set.shards}
    assert validation_batches(dm.val_set, max(1, dm.num_workers), counts) == streamed
    if (data, kw) in [("synth", {}), ("one", {"val_batch_size": 1})]:
        assert streamed == ([3, 3, 2] if data == "synth" else [4, 3])


def test_fsdp_refuses_a_validation_split_that_gives_the_ranks_unequal_batches(synth):
    """Under FSDP, data.val_clips: null on 3 ranks of 16 clips in 8 shards (3, 3 and 2 batches) is refused at setup,
    naming the cap every rank fills (4 clips: 2 batches each), with which every rank streams as many batches; DDP
    runs it (its validation forwards need no other rank). Before, the rank with fewer batches left the others waiting
    in an FSDP all-gather for ever."""
    with pytest.raises(ValueError, match=r"gives these 3 ranks \[3, 3, 2\] validation batches.*set data.val_clips: 4"):
        _fsdp_rank(_dm(synth, batch_size=6), 0, 3).setup("validate")
    streamed = []
    for rank in range(3):
        dm = _fsdp_rank(_dm(synth, batch_size=6, val_clips=4), rank, 3)
        dm.setup("validate")
        streamed.append(len(list(dm.val_dataloader())))
    assert streamed == [2, 2, 2]
    dm = _dm(synth, batch_size=6)
    dm.configure_ranks(0, 3)
    dm.setup("validate")


@pytest.mark.parametrize(("limit", "refused"), [(1.0, True), (3, True), (2, False), (1, False), (0, False)])
def test_fsdp_runs_unequal_batches_that_trainer_limit_val_batches_evens_out(synth, limit, refused):
    """Every rank stops its validation at trainer.limit_val_batches (an int): 3, 3 and 2 batches capped at 2 (or 1,
    or 0) are as many steps on every rank, which FSDP runs; capped at 3 (or a fraction: all of them) they are not,
    and the refusal names the limit that evens them out beside the cap. Before, every limit was refused."""
    def setup(rank: int) -> VideoDataModule:
        dm = _fsdp_rank(_dm(synth, batch_size=6), rank, 3)
        dm.trainer.limit_val_batches = limit
        dm.setup("validate")
        return dm

    if refused:
        with pytest.raises(ValueError, match=r"ranks \[3, 3, 2\].*data.val_clips: 4.*trainer.limit_val_batches: 2"):
            setup(0)
        return
    steps = [min(len(list(setup(rank).val_dataloader())), limit) for rank in range(3)]
    assert steps == [limit] * 3


def _two_clip_shards(folder: Path, bad: set[str]) -> Path:
    """Two validation shards of two npy clips each; the clips named in ``bad`` hold junk for a video (their tar
    headers and json are sound: setup counts them, the loader skips them at decode time)."""
    good = S.render_clip(1, frames=12, height=16, width=16)[0]
    meta = json.dumps({"fps": 16.0, "frames": 12}).encode()
    folder.mkdir()
    for shard in range(2):
        with atomic_tar(folder / f"val-{shard:06d}.tar") as sink:
            for clip in range(2):
                key = f"s{shard}c{clip}"
                sink.write({"__key__": key, "video.npy": b"junk" if key in bad else npy_bytes(good), "json": meta})
    return folder


def test_under_fsdp_a_rank_whose_bad_clip_is_skipped_pads_its_validation_with_batches_that_weigh_nothing(synth,
                                                                                                         tmp_path):
    """Under FSDP, 2 ranks with a shard of 2 clips each pass setup's count (2 batches of 1 each), but rank 1's second
    clip is bad and skipped at decode time: its pass still runs 2 steps, the second a copy of its last batch marked
    padding (which validation weighs 0), with a warning naming the skip. Before, rank 1 ran 1 step and rank 0 waited
    in the all-gather of its second forward for ever. DDP (no count) pads nothing."""
    val = _two_clip_shards(tmp_path / "val", bad={"s1c1"})
    passes, short = [], []
    for rank in range(2):
        dm = _fsdp_rank(_dm(synth, val_shards=str(val), batch_size=2, val_batch_size=1), rank, 2)
        dm.setup("validate")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            passes.append(list(dm.val_dataloader()))
        short.append([str(w.message) for w in caught if "validation pass gave" in str(w.message)])
    assert [len(p) for p in passes] == [2, 2] and dm.val_set.min_batches == 2
    assert [len(messages) for messages in short] == [0, 1]
    assert [[b.get("padding", False) for b in p] for p in passes] == [[False, False], [False, True]]
    assert short[1][0].startswith("rank 1's validation pass gave 1 batches of the 2 every rank runs under FSDP (1 bad")
    assert passes[1][1]["key"] == ["s1c0"] and int(passes[1][1]["skipped"]) == 0
    dm = _dm(synth, val_shards=str(val), batch_size=2, val_batch_size=1)
    dm.configure_ranks(1, 2)
    dm.setup("validate")
    assert dm.val_set.min_batches is None and len(list(dm.val_dataloader())) == 1


def test_under_fsdp_a_rank_with_no_usable_validation_clip_names_the_problem(synth, tmp_path):
    """Rank 1's clips are all bad: there is no batch to pad with, and the error names the rank and the fix."""
    val = _two_clip_shards(tmp_path / "val", bad={"s1c0", "s1c1"})
    dm = _fsdp_rank(_dm(synth, val_shards=str(val), batch_size=2, val_batch_size=1), 1, 2)
    dm.setup("validate")
    with pytest.raises(RuntimeError, match="rank 1's validation pass gave no usable clip .2 bad ones skipped. of the 2"):
        list(dm.val_dataloader())


def test_the_fsdp_count_reads_each_shard_s_headers_on_one_rank_only(synth, monkeypatch):
    """With a process group of 3 ranks (its all-gather faked: every rank's part, as each counts it), each rank reads
    the tar headers of its own slice of the 8 validation shards alone, and the check refuses as counting every shard
    in one process does ([3, 3, 2] batches). Before, every rank read all 8 shards' headers (256 ranks: 256 reads of
    each shard; 0.76 ms per shard of 16 clips here, cached)."""
    from mardini.data import validation_split
    from mardini.data.datamodule import check_equal_validation_batches, count_samples

    def refusal(dm: VideoDataModule) -> str:
        with pytest.raises(ValueError) as refused:
            check_equal_validation_batches(dm.val_set, 1, dm.val_shards)
        return str(refused.value)

    alone = _dm(synth, batch_size=6)
    alone.configure_ranks(0, 3)
    alone.setup("validate")  # no FSDP trainer: no check at setup
    shards = alone.val_set.shards
    expected = refusal(alone)  # no process group: one process counts every shard
    ranks = []
    for rank in range(3):
        ranks.append(_dm(synth, batch_size=6))
        ranks[-1].configure_ranks(rank, 3)
        ranks[-1].setup("validate")
    parts = [{shard: count_samples(shard) for shard in shards[rank::3]} for rank in range(3)]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, value, group=None: out.__setitem__(
        slice(None), parts))  # every rank's part
    read: list[str] = []
    monkeypatch.setattr(validation_split, "count_samples", lambda shard: read.append(shard) or count_samples(shard))
    for rank, dm in enumerate(ranks):
        read.clear()
        assert refusal(dm) == expected
        assert read == shards[rank::3]


def test_a_val_split_of_fewer_clips_than_ranks_is_refused(one_val_shard):
    dm = _dm(one_val_shard, batch_size=8)
    dm.configure_ranks(0, 8)
    with pytest.raises(ValueError, match="holds 7 clips, fewer than the 8 ranks.*run on fewer processes"):
        dm.setup("validate")
    dm = _dm(one_val_shard, num_workers=4, batch_size=7)  # as many clips as ranks: fine, one each
    dm.configure_ranks(6, 7)
    dm.setup("validate")
    assert _val_keys(dm) == ["val-0000006"]


def test_split_shards_covers_every_shard_once():
    shards = [f"s{i:02d}" for i in range(11)]
    for world, workers in [(1, 1), (2, 3), (4, 2), (3, 1)]:
        parts = [split_shards(shards, r, world, w, workers) for r in range(world) for w in range(workers)]
        assert sorted(s for p in parts for s in p) == shards


def test_val_clips_caps_per_rank(synth):
    dm = _dm(synth, val_clips=5, num_workers=2)
    dm.setup("validate")
    keys = _val_keys(dm)
    assert len(keys) == 5 and keys == _val_keys(dm)  # deterministic


# --------------------------------------------------------------------------------------------------
# Training stream: seeds, epochs, resume
# --------------------------------------------------------------------------------------------------


def _epoch_keys(dm: VideoDataModule) -> list[str]:
    return [k for b in dm.train_dataloader() for k in b["key"]]


def test_train_stream_is_seeded_by_rank_and_epoch_and_resumable(synth):
    a = _dm(synth)
    a.setup("fit")
    e0, e1 = _epoch_keys(a), _epoch_keys(a)
    assert len(e0) == 16 and e0 != e1  # with_epoch: 16 clips per rank per epoch; a new epoch, a new stream
    assert a.state_dict()["epoch"] == 2
    b = _dm(synth)
    b.setup("fit")
    assert _epoch_keys(b) == e0  # same seed, same stream
    c = _dm(synth)
    c.load_state_dict({"seed": 0, "epoch": 1})
    c.setup("fit")
    assert _epoch_keys(c) == e1  # resumed at epoch 1: the stream of epoch 1
    other_rank = _dm(synth, batch_size=8)
    other_rank.configure_ranks(1, 2)
    other_rank.setup("fit")
    assert _epoch_keys(other_rank) != e0
    other_seed = _dm(synth, seed=1)
    other_seed.setup("fit")
    assert _epoch_keys(other_seed) != e0


# sha256 of the training keys (batches joined, each ended by ';'), ranks 0 and 1 of 2, two epochs, 5 batches of 4 clips
# per epoch and rank: recorded with the stream of commit 9352fb9, before the loader took its epoch at the first batch
# and rotated its workers on a resume; an uninterrupted read must stay the same clips in the same order
STREAM_ORDER = {0: "c8d37a7dc274f752", 2: "85b1a8c9376cd912", 3: "423617e10c9a1494"}


@pytest.mark.parametrize("workers", sorted(STREAM_ORDER))
def test_an_uninterrupted_read_keeps_its_recorded_order(synth, workers):
    digest = hashlib.sha256()
    for rank in (0, 1):
        dm = _dm(synth, num_workers=workers, epoch_size=20)
        dm.configure_ranks(rank, 2)
        dm.setup("fit")
        for _ in range(2):
            for batch in dm.train_dataloader():
                digest.update((" ".join(batch["key"]) + ";").encode())
    assert digest.hexdigest()[:16] == STREAM_ORDER[workers]


@pytest.mark.parametrize(("workers", "trained"), [(0, 4), (2, 4), (2, 3), (3, 2)])
def test_mid_epoch_resume_continues_the_stream_exactly(synth, workers, trained):
    """Train on k batches, save the state, resume in a new module: the rest of the epoch is bit-identical, also
    when the next batch is due from another worker than the first (the DataLoader asks its workers in turn from
    worker 0: a resume after 3 batches of 2 workers delivered worker 1's batch and worker 0's out of turn)."""
    full = _dm(synth, num_workers=workers, epoch_size=24)
    full.setup("fit")
    reference = list(full.train_dataloader())  # 6 batches
    assert len(reference) == 6

    first = _dm(synth, num_workers=workers, epoch_size=24)
    first.setup("fit")
    it = iter(first.train_dataloader())
    for _ in range(trained):  # the loader runs ahead (prefetch); only batches "trained on" count
        first.on_before_batch_transfer(next(it), 0)
    next(it)  # fetched but never trained on: must be delivered again after the resume
    state = first.state_dict()
    del it

    resumed = _dm(synth, num_workers=workers, epoch_size=24)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    rest = list(resumed.train_dataloader())
    assert [b["key"] for b in rest] == [b["key"] for b in reference[trained:]]
    for got, want in zip(rest, reference[trained:]):
        assert torch.equal(got["video"], want["video"])  # same crops and temporal starts
    assert resumed.state_dict()["epoch"] == 1  # the next epoch is a fresh one
    assert _epoch_keys(resumed) == _epoch_keys(full)  # and equal to the uninterrupted run's second epoch


def test_resume_with_another_worker_count_starts_a_fresh_epoch(synth, caplog):
    first = _dm(synth, num_workers=0, epoch_size=24)
    first.setup("fit")
    it = iter(first.train_dataloader())
    first.on_before_batch_transfer(next(it), 0)
    state = first.state_dict()
    resumed = _dm(synth, num_workers=2, epoch_size=24)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    with caplog.at_level("WARNING", logger="mardini.data"):
        keys = _epoch_keys(resumed)
    assert "not continuing epoch 0" in caplog.text and len(keys) == 24


def _batches(loader) -> list[tuple[list[str], torch.Tensor]]:
    return [(b["key"], b["video"]) for b in loader]


def test_num_workers_0_and_1_read_one_stream_and_2_another(synth):
    """What README's Seeds and data/README.md promise: the main process reads as worker 0 of 1, so num_workers 0 and 1
    give the same training clips, crops and order (a resume from one to the other continues its epoch) and the same
    validation batches; 2 workers read the training clips of other seeds, and validate the same clips in other batches
    (each clip drawing by its key: the same val/loss, tests/test_validation_batching.py)."""
    read = {}
    for workers in (0, 1, 2):
        dm = _dm(synth, num_workers=workers, epoch_size=24)
        dm.setup("fit")
        read[workers] = _batches(dm.train_dataloader()), [b["key"] for b in dm.val_dataloader()]
    (train0, val0), (train1, val1), (train2, val2) = read[0], read[1], read[2]
    assert [k for k, _ in train0] == [k for k, _ in train1]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(train0, train1))  # same crops and temporal starts
    assert val0 == val1
    assert [k for k, _ in train2] != [k for k, _ in train0]
    assert sorted(k for b in val2 for k in b) == sorted(k for b in val0 for k in b) and val2 != val0
    first = _dm(synth, num_workers=0, epoch_size=24)  # one worker count: a resume from 0 to 1 continues the epoch
    first.setup("fit")
    it = iter(first.train_dataloader())
    for _ in range(2):
        first.on_before_batch_transfer(next(it), 0)
    resumed = _dm(synth, num_workers=1, epoch_size=24)
    resumed.load_state_dict(first.state_dict())
    resumed.setup("fit")
    assert [k for k, _ in _batches(resumed.train_dataloader())] == [k for k, _ in train0[2:]]


def test_train_epoch_length_with_workers(synth):
    dm = _dm(synth, num_workers=2, epoch_size=20)  # 20 // 4 = 5 batches, split 3 + 2 over the workers
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5 and all(b["video"].shape[0] == 4 for b in batches)


def _collect_garbage(worker_id: int) -> None:
    gc.collect()  # what a worker's collector does once enough objects are allocated, here at once


def test_a_forked_loader_worker_does_not_free_the_main_process_s_garbage(synth):
    """A forked worker inherits the garbage the main process has not collected yet, and frees it when its own
    collector runs: garbage holding a running video decoder hung it for ever at start (FFmpeg waits for the decoder's
    threads, which the fork did not copy). StreamLoader collects the garbage before it starts workers."""
    container = av.open(io.BytesIO(encode_mp4(moving_frames(8, 32, 48), 8)))
    next(container.decode(video=0))  # the decoder's threads run
    gc.disable()  # the garbage below stays until a collection
    try:
        cycle = [container]
        cycle.append(cycle)
        del cycle, container
        stream = ClipStream(list_shards(str(synth / "val")), frames=4, fps=8, resolution=8, batch_size=2, train=False)
        loader = StreamLoader(stream, batch_size=None, num_workers=1, multiprocessing_context="fork",
                              worker_init_fn=_collect_garbage, timeout=60)  # a hang fails after 60 s
        assert len(next(iter(loader))["key"]) == 2
    finally:
        gc.enable()


def test_training_readers_share_the_shards_evenly_or_all_read_all():
    def stream(n):
        return ClipStream([f"s{i}.tar" for i in range(n)], frames=2, fps=None, resolution=8, batch_size=2, train=True)

    shares = [stream(4).my_shards(w, 2) for w in range(2)]
    assert sorted(shares[0] + shares[1]) == stream(4).shards and not set(shares[0]) & set(shares[1])
    # 3 shards on 2 workers: disjoint shares of 2 and 1 would draw the lone shard half of the time
    assert stream(3).my_shards(0, 2) == stream(3).my_shards(1, 2) == stream(3).shards
    assert stream(3).my_shards(0, 1) == stream(3).shards  # one reader: all of them


def test_random_crop_and_start_vary_center_does_not(synth):
    rand = ClipStream(list_shards(str(synth / "val")), frames=2, fps=None, resolution=8, batch_size=16, train=False)
    rand.crop = "random"
    rand.train = True  # decode path of the training stream on a finite list, for a direct comparison
    g = torch.Generator().manual_seed(0)
    with closing(_shard_samples({"url": rand.shards[0]}, wds.reraise_exception)) as samples:  # closes the shard
        raw = next(samples)
    starts = {float(rand.decode_pixels(raw, g)["video"].sum()) for _ in range(10)}
    assert len(starts) > 1
    rand.crop = "center"
    assert len({float(rand.decode_pixels(raw, g)["video"].sum()) for _ in range(5)}) == 1


# --------------------------------------------------------------------------------------------------
# Errors that say what to do
# --------------------------------------------------------------------------------------------------


def test_the_paper_s_720_clips_split_over_256_ranks(synth):
    """Stage 06's global batch on 256 GPUs: 208 ranks x 3 + 48 x 2 clips, not the divisibility error."""
    sizes = []
    for rank in range(256):
        dm = _dm(synth, batch_size=720)
        dm.configure_ranks(rank, 256)
        sizes.append(dm.per_rank_batch_size)
    assert sizes == [3] * 208 + [2] * 48 and sum(sizes) == 720


# even splits: test_batch_contract, tests/test_ddp.py
@pytest.mark.parametrize(("batch", "world"), [(3, 2), (5, 2), (7, 3), (10, 4), (6, 4)])
def test_uneven_global_batch_every_rank_same_batches_per_epoch(synth, batch, world):
    """Per-rank batches differ by one clip at most and sum to the global batch; every rank runs the same number of
    batches per epoch (a rank that stopped early would leave the others waiting at a gradient sync) and the same
    validation batch."""
    sizes, lengths = [], []
    for rank in range(world):
        dm = _dm(synth, batch_size=batch, epoch_size=17)
        dm.configure_ranks(rank, world)
        dm.setup("fit")
        sizes.append(dm.per_rank_batch_size)
        lengths.append(len(dm.train_set))
        assert dm.val_set.batch_size == -(-batch // world)
        if rank == world - 1:  # the smallest batch: its stream delivers that many clips per batch
            assert next(iter(dm.train_dataloader()))["video"].shape[0] == sizes[-1]
    assert sum(sizes) == batch and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first batch % world ranks get one clip more
    assert len(set(lengths)) == 1 and lengths[0] == 17 // -(-batch // world)


def test_global_batch_smaller_than_the_world_size_is_refused(synth):
    dm = _dm(synth, batch_size=3)
    with pytest.raises(ValueError, match="GLOBAL batch and is smaller than the world size 4.*batch_size >= 4"):
        dm.configure_ranks(0, 4)
    dm.configure_ranks(1, 3)
    assert dm.per_rank_batch_size == 1


def test_empty_pattern_and_bad_settings(synth, tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        _dm(synth, train_shards=str(tmp_path / "nothing-{000..003}.tar")).setup("fit")
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        _dm(synth, train_shards=str(tmp_path)).setup("fit")  # an empty directory
    with pytest.raises(ValueError, match="data.crop"):
        _dm(synth, crop="middle")


def test_brace_and_glob_patterns(synth):
    assert len(list_shards(str(synth / "val" / "val-{000000..000003}.tar"))) == 4
    assert len(list_shards(str(synth / "val" / "*.tar"))) == 8
    assert len(list_shards(f"{synth / 'val'}::{synth / 'train'}")) == 12


# --------------------------------------------------------------------------------------------------
# Bad samples are skipped and counted
# --------------------------------------------------------------------------------------------------


def test_bad_samples_are_skipped_and_counted(synth, tmp_path):
    good = S.render_clip(1, frames=12, height=16, width=16)[0]
    meta = json.dumps({"fps": 16.0, "frames": 12}).encode()
    with atomic_tar(tmp_path / "mixed-000000.tar") as sink:
        sink.write({"__key__": "bad-mp4", "video.mp4": b"\x00\x01 not an mp4", "json": meta})
        sink.write({"__key__": "bad-json", "video.npy": npy_bytes(good), "json": b"{oops"})
        sink.write({"__key__": "bad-shape", "video.npy": npy_bytes(good[..., :2].copy()), "json": meta})
        sink.write({"__key__": "short", "video.npy": npy_bytes(good[:3]), "json": meta})
        sink.write({"__key__": "no-video", "json": meta})
        for i in range(5):
            sink.write({"__key__": f"good-{i}", "video.npy": npy_bytes(good), "json": meta})
        sink.write({"__key__": "bad-late", "video.npy": b"junk", "json": meta})
        sink.write({"__key__": "good-5", "video.npy": npy_bytes(good), "json": meta})
    (tmp_path / "truncated-000001.tar").write_bytes((tmp_path / "mixed-000000.tar").read_bytes()[:3000])
    dm = _dm(synth, val_shards=str(tmp_path), batch_size=2)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"good-{i}" for i in range(6)]
    # 6 bad samples in the first shard; the truncated one gives a sample cut short + the tar read error;
    # the skips after the last good sample still reach the last batch
    assert sum(int(b["skipped"]) for b in batches) == 6 + 2
    assert dm.skipped == 8 and dm.state_dict()["skipped"] == 8
    # 2 shards, 3 workers: each scans both and meets the tar error; still each skip counted once
    dm = _dm(synth, val_shards=str(tmp_path), batch_size=2, num_workers=3)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sorted(k for b in batches for k in b["key"]) == [f"good-{i}" for i in range(6)]
    assert sum(int(b["skipped"]) for b in batches) == 8 and dm.skipped == 8


def test_training_stops_when_nothing_is_usable(synth, tmp_path):
    meta = json.dumps({"fps": 16.0, "frames": 12}).encode()
    with atomic_tar(tmp_path / "bad-000000.tar") as sink:
        for i in range(4):
            sink.write({"__key__": f"b{i}", "video.npy": b"junk", "json": meta})
    stream = ClipStream([str(tmp_path / "bad-000000.tar")], frames=2, fps=None, resolution=8, batch_size=2,
                        train=True, max_consecutive_bad=20)
    with pytest.raises(ValueError, match="bad samples in a row"):
        next(iter(stream))


def test_first_clips_reads_the_validation_order_and_names_an_unreadable_set(synth, tmp_path):
    from mardini.data.datamodule import first_clips

    video = first_clips(str(synth / "val"), 3, frames=4, resolution=8, fps=8)  # (n', T, 3, H, W)
    dm = _dm(synth, val_clips=3)
    dm.setup("fit")
    expected = torch.cat([b["video"] for b in dm.val_dataloader()])  # the same clips, in the same order
    assert video.shape[1:] == (4, 3, 8, 8) and torch.equal(video, expected[: video.shape[0]])
    meta = json.dumps({"fps": 16.0, "frames": 12}).encode()
    with atomic_tar(tmp_path / "bad-000000.tar") as sink:
        for i in range(2):
            sink.write({"__key__": f"b{i}", "video.npy": b"junk", "json": meta})
    with pytest.raises(ValueError, match="no clip of .* could be read"):
        first_clips(str(tmp_path / "bad-000000.tar"), 2, frames=2, resolution=8, fps=None)


# --------------------------------------------------------------------------------------------------
# Inside Lightning: epochs advance the stream, the state goes into checkpoints
# --------------------------------------------------------------------------------------------------


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.keys: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.keys.append(batch["key"])
        return (batch["video"].mean() - self.w) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val", batch["video"].mean(), batch_size=batch["video"].shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_epochs_and_checkpoint_state(synth, tmp_path):
    dm = _dm(synth, epoch_size=8)
    model = _Tiny()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=2)
    trainer.fit(model, datamodule=dm)
    assert len(model.keys) == 4 and model.keys[:2] != model.keys[2:]  # 2 batches per epoch, new stream per epoch
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path or next(tmp_path.rglob("*.ckpt")),
                      weights_only=False)
    assert ckpt["VideoDataModule"]["epoch"] == 2 and ckpt["VideoDataModule"]["seed"] == 0
    # what the training shards' manifest records (the synthetic set's clip count...): what the run trained on
    from mardini.data.synthetic_shards import manifest_settings

    assert ckpt["VideoDataModule"]["train_data"] == manifest_settings(synth / "train")
    assert ckpt["VideoDataModule"]["train_data"]["clips"] > 0


class _Killed(Exception):
    """The process dies right after a save (a SLURM preemption: kill -9 after ``hpc_ckpt_1.ckpt``)."""


class _SaveAt(L.Callback):
    """Saves ``path`` at ``step``: at the train batch's end (``last.ckpt``) or at the end of the validation that
    follows it (the preemption save, ``PreemptionSave``); then stops (``kill``) or goes on."""

    def __init__(self, step: int, path: Path, where: str = "batch", kill: bool = False) -> None:
        self.step, self.path, self.where, self.kill = step, path, where, kill

    def _save(self, trainer) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)
            if self.kill:
                raise _Killed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "batch":
            self._save(trainer)

    def on_validation_end(self, trainer, pl_module):
        if self.where == "validation":
            self._save(trainer)


@pytest.mark.parametrize("where", ["validation", "batch"])
def test_a_resume_from_an_epoch_s_end_reads_the_next_data_epoch(synth, tmp_path, where):
    """3-batch epochs validated at their end; saved at step 3 (the end of epoch 0) in that validation or at the last
    batch's end, killed, resumed to step 7: the same clips at every step as one uninterrupted run, the same stream
    state and the same Lightning counters. Lightning iterates the restored, finished epoch 0 without reading it: that
    iterator must not take a data epoch (it did, and the resumed run skipped one)."""

    def fit(*callbacks, ckpt_path=None):
        model = _Tiny()
        trainer = L.Trainer(max_steps=7, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False, limit_val_batches=1,
                            num_sanity_val_steps=0, callbacks=list(callbacks))
        trainer.fit(model, datamodule=_dm(synth, epoch_size=12), ckpt_path=ckpt_path)
        return model

    full = fit(_SaveAt(7, tmp_path / "full.ckpt"))
    with pytest.raises(_Killed):
        fit(_SaveAt(3, tmp_path / "saved.ckpt", where, kill=True))
    resumed = fit(_SaveAt(7, tmp_path / "resumed.ckpt"), ckpt_path=tmp_path / "saved.ckpt")
    assert resumed.keys == full.keys[3:]
    want, got = (torch.load(tmp_path / f"{run}.ckpt", weights_only=False) for run in ("full", "resumed"))
    assert got["VideoDataModule"] == want["VideoDataModule"]  # epoch 3, in_epoch 2 (it was 4 and 3)
    assert got["epoch"] == want["epoch"]
    assert got["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] == \
        want["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]


# --------------------------------------------------------------------------------------------------
# Setup checks the shards' first clip against the stage (frames, fps, resolution)
# --------------------------------------------------------------------------------------------------


def test_setup_names_clips_too_short_for_the_stage(synth):
    # 12-frame clips at 16 fps; 7 frames at 8 fps is stride 2, a span of 13 source frames
    for stage in ("fit", "validate"):
        with pytest.raises(ValueError, match=r"span of 13 source frames .* holds 12 frames at 16 fps") as err:
            _dm(synth, frames=7, fps=8).setup(stage)
        message = str(err.value)
        assert "data.frames <= 6" in message and "--clip-frames 13" in message and "data.fps: 16" in message
    with pytest.raises(ValueError, match=r"data.val_shards: the stage needs 13 frames"):
        _dm(synth, train_shards=None, frames=13, fps=None).setup("validate")
    _dm(synth, frames=6, fps=8).setup("fit")  # span 11: fits


def test_setup_warns_once_on_upscaled_or_slow_clips(synth, monkeypatch):
    import warnings

    from mardini.data import setup_warnings

    monkeypatch.setattr(setup_warnings, "WARNED", set())
    with pytest.warns(UserWarning, match=r"16x16 \(WxH\), smaller than data.resolution=32x32.*upscaled 2x.*"
                      r"--short-side 32"):
        _dm(synth, resolution=32).setup("fit")
    with pytest.warns(UserWarning, match=r"12 frames at 16 fps, slower than data.fps=24.*--max-fps 24"):
        _dm(synth, fps=24, frames=4).setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dm(synth, resolution=32).setup("fit")  # once per process
        _dm(synth, resolution=16, fps=16).setup("fit")  # fits: no warning


def test_too_many_bad_samples_say_what_to_change(synth):
    stream = ClipStream(list_shards(str(synth / "train")), frames=20, fps=None, resolution=8, batch_size=2,
                        train=True, max_consecutive_bad=10)
    with pytest.raises(ValueError, match=r"10 bad samples in a row .* Mostly 'too few frames': .*--clip-frames"):
        next(iter(stream))


def test_setup_refuses_only_when_no_probed_shard_fits(tmp_path, monkeypatch):
    """Shards of mixed clip lengths (videos of mixed rates): one short first clip does not decide for the set."""
    import shutil

    from mardini.data import setup_warnings
    from mardini.data.synthetic_shards import write_synthetic_split

    monkeypatch.setattr(setup_warnings, "WARNED", set())
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, frames in enumerate((6, 12)):  # the first shard's clips too short for 4 frames at 8 fps (span 7)
        write_synthetic_split(tmp_path / f"src{i}", "train", 2, 2, frames=frames, height=8, width=8, fps=16.0,
                              progress=False)
        shutil.copy(next((tmp_path / f"src{i}" / "train").glob("*.tar")), mixed / f"train-00000{i}.tar")
    with pytest.warns(UserWarning, match=r"holds 6 frames at 16 fps.*others fit, so the loader skips"):
        _dm(tmp_path, train_shards=str(mixed), val_shards=None).setup("fit")
    only_short = tmp_path / "short"
    only_short.mkdir()
    shutil.copy(mixed / "train-000000.tar", only_short / "train-000000.tar")
    shutil.copy(mixed / "train-000000.tar", only_short / "train-000001.tar")
    with pytest.raises(ValueError, match=r"holds 6 frames at 16 fps \(so is the first clip of every shard probed, 2\)"):
        _dm(tmp_path, train_shards=str(only_short), val_shards=None).setup("fit")


def test_every_argument_has_a_row_in_the_data_readme_table():
    """data/README.md's DataModule table documents every ``VideoDataModule.__init__`` argument."""
    import inspect
    import re

    text = (Path(__file__).resolve().parents[1] / "data" / "README.md").read_text()
    table = text.split("## The DataModule", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    rows = set(re.findall(r"^\| `(\w+)` \|", "|" + table, flags=re.M))
    arguments = set(inspect.signature(VideoDataModule.__init__).parameters) - {"self"}
    assert rows, "no table found under '## The DataModule'"
    assert arguments - rows == set(), f"arguments without a row: {sorted(arguments - rows)}"
    assert rows - arguments == set(), f"rows of no argument: {sorted(rows - arguments)}"


@pytest.mark.parametrize("train", [False, True], ids=["split-read-to-its-end", "train-stream-abandoned"])
def test_the_stream_closes_the_shard_files_it_opens(synth, train):
    """A finite split read to its end and a training stream dropped after one batch close every shard file they
    opened. Before, webdataset left each one to the garbage collector: ``ResourceWarning: unclosed file
    <_io.BufferedReader name='.../val-000000.tar'>`` per shard read."""
    import warnings

    split = "train" if train else "val"
    stream = ClipStream(list_shards(str(synth / split)), frames=4, fps=8, resolution=8, batch_size=2, train=train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        batches = iter(stream)
        assert next(batches)["video"].shape == (2, 4, 3, 8, 8)
        if not train:
            assert sum(1 for _ in batches) > 0
        del batches
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []

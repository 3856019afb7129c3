"""A resume whose data changed since its checkpoint (shards added, removed or re-made, data.* settings, another
validation split) says what changed and what it does: the training stream starts its next epoch where its shards
changed, and val/loss is said to be no longer comparable where the validation split changed."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import webdataset as wds

from mardini.data.datamodule import VideoDataModule
from mardini.data.resumed_data import shard_sizes
from mardini.data.sharding import atomic_tar, list_shards
from mardini.data.testing import tiny_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("synth"))  # train: 4 shards of 6 clips; val: 8 of 2


@pytest.fixture
def data(synth, tmp_path) -> Path:
    """A copy of the set the test may change between a stop and a resume."""
    shutil.copytree(synth, tmp_path / "data")
    return tmp_path / "data"


def _dm(root: Path, **kw) -> VideoDataModule:
    args = dict(train_shards=str(root / "train"), val_shards=str(root / "val"), frames=4, fps=8, resolution=8,
                batch_size=4, num_workers=0, shuffle_buffer=8, epoch_size=16, val_clips=None)
    return VideoDataModule(**{**args, **kw})


def _stopped(root: Path, batches: int = 2, **kw) -> dict:
    """The stream state of a run stopped after training ``batches`` batches of epoch 0."""
    dm = _dm(root, **kw)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(batches):
        dm.on_before_batch_transfer(next(it), 0)
    return dm.state_dict()


def _resumed(root: Path, state: dict, **kw) -> tuple[VideoDataModule, list[str]]:
    """A module resuming ``state`` over ``root`` and the resume warnings its setup gave."""
    dm = _dm(root, **kw)
    dm.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    return dm, [str(w.message) for w in caught if "resuming" in str(w.message) or "data.seed" in str(w.message)]


def _epoch_keys(dm: VideoDataModule) -> list[str]:
    return [k for b in dm.train_dataloader() for k in b["key"]]


def _rewrite_with_fewer_clips(shard: Path, keep: int) -> None:
    """Re-make ``shard`` with its first ``keep`` samples (a corrupt shard re-made: the same name, other bytes)."""
    samples = [s for _, s in zip(range(keep), wds.WebDataset(str(shard), shardshuffle=False))]
    shard.unlink()
    with atomic_tar(shard) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k in ("__key__", "video.npy", "json")})


def test_an_unchanged_resume_continues_mid_epoch_without_a_word(data):
    state = _stopped(data)
    dm, said = _resumed(data, state)
    assert said == []
    assert len(_epoch_keys(dm)) == 8  # the rest of epoch 0: 2 of its 4 batches
    assert dm.state_dict()["epoch"] == 1


@pytest.mark.parametrize("change", ["added", "removed", "rewritten"])
def test_a_resume_over_other_training_shards_starts_the_next_epoch_and_says_so(data, change):
    """The recorded position counts raw samples of the old shard list; replayed over another one it skipped or
    re-read clips without a word (a re-made shard of more clips moved every later sample). Now the stream starts the
    checkpoint's next epoch on the new shards, and one warning names the change."""
    state = _stopped(data)
    if change == "added":
        shutil.copy(data / "train" / "train-000000.tar", data / "train" / "train-000009.tar")
    elif change == "removed":
        (data / "train" / "train-000003.tar").unlink()
    else:
        _rewrite_with_fewer_clips(data / "train" / "train-000001.tar", keep=3)
    dm, said = _resumed(data, state)
    assert len(said) == 1 and f"data.train_shards: 1 {change}" in said[0], said
    assert "starts epoch 1 on the new ones" in said[0]
    fresh = _dm(data)
    fresh.load_state_dict({"seed": 0, "epoch": 1})
    fresh.setup("fit")
    assert _epoch_keys(dm) == _epoch_keys(fresh)  # the whole of epoch 1 over the new shards
    assert dm.state_dict()["epoch"] == 2


def test_a_resume_names_changed_data_settings_and_the_seed_it_keeps(data):
    state = _stopped(data)
    dm, said = _resumed(data, state, resolution=16, batch_size=2, seed=5)
    assert any("resolution 8 -> 16" in s and "batch_size 4 -> 2" in s for s in said), said
    assert any("data.seed 5 is not applied" in s and "seed 0" in s for s in said), said
    assert dm.state.resume is not None  # the same shards: the position still applies


@pytest.mark.parametrize(("change", "named"), [
    ("val_clips", "val_clips None -> 4"),
    ("added", "data.val_shards: 1 added"),
    ("frames", "frames 4 -> 3"),
])
def test_a_resume_with_another_validation_split_says_val_loss_is_no_longer_comparable(data, change, named):
    state = _stopped(data)
    kw = {"val_clips": 4} if change == "val_clips" else {"frames": 3} if change == "frames" else {}
    if change == "added":
        shutil.copy(data / "val" / "val-000000.tar", data / "val" / "val-000009.tar")
    _, said = _resumed(data, state, **kw)
    val = [s for s in said if "another validation split" in s]
    assert len(val) == 1 and named in val[0] and "not comparable" in val[0], said


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (batch["video"].mean() - self.w) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val", batch["video"].mean(), batch_size=batch["video"].shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


_TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                enable_model_summary=False, num_sanity_val_steps=0)


def _trainer(steps: int, limit_val_batches: int = 1) -> L.Trainer:
    return L.Trainer(max_steps=steps, limit_val_batches=limit_val_batches, **_TRAINER)


def test_inside_lightning_a_fit_says_so_and_validate_does_not(data, tmp_path):
    """Lightning restores the datamodule after its setup: the comparison runs there, once, for a fit only."""
    trainer = _trainer(2)
    trainer.fit(_Tiny(), datamodule=_dm(data))
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    shutil.copy(data / "train" / "train-000000.tar", data / "train" / "train-000009.tar")
    with pytest.warns(UserWarning, match=r"data.train_shards: 1 added .* starts epoch 1") as caught:
        _trainer(3).fit(_Tiny(), datamodule=_dm(data, val_clips=2), ckpt_path=tmp_path / "stopped.ckpt")
    said = [str(w.message) for w in caught if "than the checkpoint's" in str(w.message)]
    assert len(said) == 2 and "val_clips None -> 2" in said[1], said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(3).validate(_Tiny(), datamodule=_dm(data, val_clips=2), ckpt_path=tmp_path / "stopped.ckpt")
    assert not [w for w in caught if "than the checkpoint's" in str(w.message)]


def test_under_ddp_every_rank_compares_the_record_beside_its_own_position(data, monkeypatch):
    """A DDP checkpoint holds each rank's position under ``ranks`` (each rank loads its own) and one data record
    beside them: every rank must compare it and start the next epoch alike."""
    stopped = _stopped(data)
    own = {k: v for k, v in stopped.items() if k not in ("train_data", "data")}
    state = {**stopped, "ranks": [own, own]}
    monkeypatch.setattr("mardini.data.datamodule._distributed_world", lambda: (1, 2))
    shutil.copy(data / "train" / "train-000000.tar", data / "train" / "train-000009.tar")
    dm, said = _resumed(data, state)
    assert len(said) == 1 and "data.train_shards: 1 added" in said[0] and dm.state.resume is None


def test_under_ddp_a_shard_change_one_rank_sees_restarts_every_rank(data, monkeypatch):
    """Each rank compares the checkpoint's record (rank 0's files) with the files it sees: where only another rank
    saw other shards (its node's copy re-made), that rank started the next epoch while rank 0 went on mid-epoch, so
    the ranks read different epochs from then on. Now the ranks share their finding (one all-gather) and all start
    the next epoch; rank 0 says why."""
    state = _stopped(data)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, value, group=None: out.__setitem__(
        slice(None), [value, True if isinstance(value, bool) else _rank_1_sizes(value)]))
    # rank 1 found its shards changed; rank 0's are as recorded
    dm, said = _resumed(data, state)
    assert dm.state.resume is None, "rank 0 went on mid-epoch while rank 1 started the next epoch"
    assert len(said) == 1 and "on rank(s) [1]" in said[0] and "starts epoch 1" in said[0]


def _val_keys(root: Path, batches: int | None = None, **kw) -> list[str]:
    """The keys of the clips a validation of the first ``batches`` batches (None: all) reads of ``root``."""
    dm = _dm(root, **kw)
    dm.setup("validate")
    return [k for _, b in zip(range(batches or 10**6), dm.val_dataloader()) for k in b["key"]]


@pytest.mark.parametrize(("stopped", "resumed", "named"), [
    ({"val_clips": 6}, {"val_clips": 6, "num_workers": 2}, "loader workers 1 -> 2 per rank"),
    ({"val_clips": 6}, {"val_clips": 6, "num_workers": 1}, None),  # 0 and 1 both read as one worker
    ({}, {"num_workers": 2}, None),  # no cap: every clip validated, whatever the workers
    ({}, {"val_batch_size": 2}, None),  # no limit_val_batches: the batch regroups the same clips
])
def test_a_resume_names_the_reading_changes_that_pick_other_validation_clips_and_only_those(data, stopped, resumed,
                                                                                            named):
    """``data.val_clips`` is a cap per rank split over its loader workers, so under it another worker count validates
    other clips (6: one worker the split's first 6, two the first 3 of each one's shards); before, a resume under
    other workers said nothing of the validation split. Without a cap the workers and the validation batch regroup
    the same clips, each once: not said."""
    before, after = sorted(_val_keys(data, **stopped)), sorted(_val_keys(data, **resumed))
    assert (before != after) == (named is not None)  # what the comparison must say, read from the loaders
    state = _stopped(data, **stopped)
    _, said = _resumed(data, state, **resumed)
    val = [s for s in said if "another validation split" in s]
    if named is None:
        assert val == [], said
    else:
        assert len(val) == 1 and named in val[0] and "under data.val_clips" in val[0], said


def test_inside_lightning_a_resume_names_another_limit_val_batches_and_under_it_another_validation_batch(data,
                                                                                                       tmp_path):
    """``trainer.limit_val_batches`` caps the batches each rank validates, so another limit, or under one another
    validation batch (``data.val_batch_size``), validates other clips (1 batch of 4: 4 clips; of 2: 2). Before, a
    resume compared neither and said nothing."""
    assert len(_val_keys(data, 1)) == 4 and _val_keys(data, 1, val_batch_size=2) == _val_keys(data, 1)[:2]
    trainer = _trainer(2)
    trainer.fit(_Tiny(), datamodule=_dm(data))
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    for limit, kw, named in ((2, {}, "trainer.limit_val_batches 1 -> 2"),
                             (1, {"val_batch_size": 2}, "validation batch 4 -> 2 clips per rank")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _trainer(3, limit).fit(_Tiny(), datamodule=_dm(data, **kw), ckpt_path=tmp_path / "stopped.ckpt")
        val = [str(w.message) for w in caught if "another validation split" in str(w.message)]
        assert len(val) == 1 and named in val[0], val


def _stream_keys(root: Path, epoch: int, clips: int) -> list[str]:
    """The first ``clips`` clips of the training stream's epoch ``epoch``, whatever the batch size (one per batch)."""
    dm = _dm(root, batch_size=1, epoch_size=clips)
    dm.load_state_dict({"seed": 0, "epoch": epoch})
    dm.setup("fit")
    return _epoch_keys(dm)


@pytest.mark.parametrize(("old", "new", "trained", "rest", "said"), [
    (4, 2, 1, 14, "this epoch trains 18 clips per rank instead of the 16 of an uninterrupted epoch (2 clips more"),
    (2, 4, 3, 4, "this epoch trains 10 clips per rank instead of the 16 of an uninterrupted epoch (6 clips fewer: "
                 "the last 6 of its stream never read)"),
    (2, 4, 5, 0, "the epoch ends there, 10 clips instead of the 16 of an uninterrupted epoch (the last 6 clips of "
                 "its stream never read), and epoch 1 starts whole"),
])
def test_a_batch_size_changed_mid_epoch_goes_on_from_the_next_clip_and_says_how_long_the_epoch_comes_out(
        data, old, new, trained, rest, said):
    """The position counts batches (as Lightning does): after 1 batch of 4 of a 16-clip epoch, batch_size 2 makes the
    epoch's rest 7 of its 8 batches, 14 clips (18 in all); after 3 batches of 2, batch_size 4 leaves 1 of 4 (10 in
    all). The stream goes on from the clip after the last one trained either way (none twice, none skipped before
    it). Before, only "batch_size 4 -> 2" was said; and after 5 batches of 2, which already reach the 4 an epoch has
    at batch_size 4, the stream started epoch 1 inside epoch 0. Now epoch 0 ends there and epoch 1 comes whole."""
    state = _stopped(data, batches=trained, batch_size=old)
    dm, warned = _resumed(data, state, batch_size=new)
    note = [s for s in warned if "mid-way under another batch size" in s]
    assert len(note) == 1 and said in note[0], warned
    stream = _stream_keys(data, 0, 32)
    assert _epoch_keys(dm) == stream[trained * old : trained * old + rest]  # this epoch's rest, from the next clip
    assert _epoch_keys(dm) == _stream_keys(data, 1, 16)  # then epoch 1, whole at the new size


def _rank_module(root: Path, rank: int, **kw) -> VideoDataModule:
    """A module as rank ``rank`` of 2 sets it up (no process group: each rank's part alone)."""
    dm = _dm(root, **kw)
    dm.configure_ranks(rank, 2)
    return dm


def test_a_batch_size_change_that_leaves_one_rank_its_batch_ends_the_epoch_on_every_rank(data):
    """data.batch_size 4 -> 5 on 2 ranks: rank 0's batch 2 -> 3 (an epoch of 16 clips: 8 -> 5 batches), rank 1's
    stays 2. After 6 trained batches the epoch is over at the new size on both ranks (they step together). Before,
    only the rank whose own batch changed marked it ended: rank 0 gave Lightning no batch of epoch 0 while rank 1
    started epoch 1 inside it (5 batches), the ranks one epoch apart (under DDP, collectives that never meet)."""
    passes = []
    for rank in (0, 1):
        stopped = _rank_module(data, rank, batch_size=4)
        stopped.setup("fit")
        it = iter(stopped.train_dataloader())
        for _ in range(6):
            stopped.on_before_batch_transfer(next(it), 0)
        dm = _rank_module(data, rank, batch_size=5)
        dm.load_state_dict(stopped.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dm.setup("fit")
        passes.append([len(list(dm.train_dataloader())), len(list(dm.train_dataloader()))])
    assert passes == [[0, 5], [0, 5]]  # epoch 0 ends at once on both, epoch 1 comes whole on both


class _Recording(_Tiny):
    """:class:`_Tiny` recording ``(epoch, keys)`` of every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, list[str]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, list(batch["key"])))
        return super().training_step(batch, batch_idx)


def test_inside_lightning_an_epoch_a_larger_batch_ends_is_over_and_the_next_comes_whole(data, tmp_path):
    """Stopped at a batch's end (as StepCheckpoint and Lightning's every-N saves are) after 5 batches of 2 of a
    16-clip epoch, resumed at batch_size 4 (4 batches an epoch): Lightning's epoch 0 ends at once and its epoch 1
    trains the stream's epoch 1 whole. Before, the stream started epoch 1 inside Lightning's epoch 0 (whose count, 5,
    was past the 4), which trained all of it: Lightning's epoch 0 took 26 clips, and its epochs ran one behind."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    every = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    L.Trainer(**{**_TRAINER, "max_steps": 6, "callbacks": [every], "enable_checkpointing": True}).fit(_Tiny(), datamodule=_dm(data, batch_size=2))
    module = _Recording()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(**{**_TRAINER, "max_steps": 9}).fit(module, datamodule=_dm(data, batch_size=4),
                                                      ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt")
    assert [epoch for epoch, _ in module.seen] == [1, 1, 1, 1]
    assert [k for _, keys in module.seen for k in keys] == _stream_keys(data, 1, 16)


def _rank_1_sizes(rank_0: dict[str, int | None]) -> dict[str, int | None]:
    """What rank 1 of 2 sends to setup's all-gather of the shard sizes where rank 0 sends ``rank_0``: its slice's."""
    return shard_sizes(list_shards(str(Path(next(iter(rank_0))).parent))[1::2])


def test_under_ddp_each_rank_stats_its_own_slice_of_the_shards_and_one_all_gather_assembles_the_list(data,
                                                                                                   monkeypatch):
    """Every rank stat-ed every shard at setup (ranks x shards metadata reads on a shared file system). Now rank r of
    W stats shards r, r + W, ... and one all-gather per split assembles the list, the same as one process's."""
    from mardini.data import resumed_data

    stat, statted = resumed_data.shard_sizes, []
    monkeypatch.setattr(resumed_data, "shard_sizes", lambda shards: (statted.append(list(shards)), stat(shards))[1])
    monkeypatch.setattr("mardini.data.datamodule.shard_sizes", resumed_data.shard_sizes, raising=False)  # old code's
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, value, group=None: out.__setitem__(
        slice(None), [stat(list_shards(str(Path(next(iter(value))).parent))[0::2]), value]))  # rank 0 sends its own
    dm = _dm(data)
    dm.setup("fit")
    train, val = list_shards(str(data / "train")), list_shards(str(data / "val"))
    assert statted == [train[1::2], val[1::2]]  # rank 1's slices alone
    assert dm.shard_sizes == {"train": stat(train), "val": stat(val)}
    assert list(dm.shard_sizes["train"]) == train


def test_a_checkpoint_of_many_shards_records_their_count_and_digest_and_a_resume_says_they_differ(data, monkeypatch):
    """Each checkpoint held both splits' path -> bytes (1-2 MB for 10k shards). Above FULL_LIST_MAX shards it holds
    their count and a digest now; an unchanged resume goes on mid-epoch, a changed one says how many shards became
    how many."""
    monkeypatch.setattr("mardini.data.resumed_data.FULL_LIST_MAX", 3, raising=False)  # train: 4 shards, val: 8
    state = _stopped(data)
    record = state["data"]["train_shards"]
    assert set(record) == {"count", "sha256", "sizes"} and record["count"] == 4 and record["sizes"] is None
    assert state["data"]["val_shards"]["sizes"] is None
    dm, said = _resumed(data, state)
    assert said == [] and dm.state.resume is not None
    shutil.copy(data / "train" / "train-000000.tar", data / "train" / "train-000009.tar")
    dm, said = _resumed(data, state)
    assert len(said) == 1 and "data.train_shards: 4 shards -> 5 shards, contents differ" in said[0], said
    assert "starts epoch 1 on the new ones" in said[0] and dm.state.resume is None


def test_a_checkpoint_holding_the_full_shard_lists_still_names_the_shards_that_changed(data, monkeypatch):
    """Checkpoints before the compact record hold path -> bytes; whatever their length, a resume names the change."""
    monkeypatch.setattr("mardini.data.resumed_data.FULL_LIST_MAX", 3, raising=False)
    state = _stopped(data)
    train = list_shards(str(data / "train"))
    state["data"] = {**state["data"], "train_shards": shard_sizes(train)}  # as an older checkpoint holds it
    _rewrite_with_fewer_clips(data / "train" / "train-000001.tar", keep=3)
    _, said = _resumed(data, state)
    assert len(said) == 1 and f"data.train_shards: 1 rewritten ({train[1]}; {train[1]}:" in said[0], said

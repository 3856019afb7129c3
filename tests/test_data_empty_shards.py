"""Empty shards: the resampled training stream reopened a shard that gives no sample for ever (100 % CPU, no step)."""

from __future__ import annotations

import io
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import pytest
from webdataset import tariterators

from mardini.data.datamodule import VideoDataModule
from mardini.data.stream import ClipStream, StreamLoader
from mardini.data.testing import tiny_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("synth"))


class Spinning(BaseException):
    """Raised by the bounded shard opener: no handler of the stream swallows it."""


@pytest.fixture
def opens(monkeypatch) -> list[str]:
    """The shards the stream opens, in order; a thousand opens stop it (the stream spun before the fix)."""
    opened: list[str] = []
    opener = tariterators.gopen  # the module whose gopen() webdataset's url_opener calls
    real = opener.gopen

    def bounded(url, *args, **kwargs):
        opened.append(url)
        if len(opened) > 1000:
            raise Spinning(f"{len(opened)} shard opens and no sample nor error")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(opener, "gopen", bounded)
    return opened


def _empty(path: Path, kind: str) -> str:
    """A shard that gives no sample: ``no-member`` (``tar cf x.tar -T /dev/null``), ``no-sample`` (a member whose name
    has no extension, which webdataset passes over)."""
    with tarfile.open(path, "w") as tar:
        if kind == "no-sample":
            info = tarfile.TarInfo("README")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"hi\n"))
    return str(path)


def _stream(shards: list[str], **kw) -> ClipStream:
    return ClipStream(shards, frames=4, fps=8, resolution=8, batch_size=2, train=True, shuffle_buffer=0, **kw)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("kind", ["no-member", "no-sample"])
def test_a_training_stream_of_empty_shards_raises_naming_them(tmp_path, opens, kind, workers):
    shards = [_empty(tmp_path / f"empty-{i}.tar", kind) for i in range(3)]
    # a forked worker (the default start method); the loader's timeout turns a hang into a failure. It hung at start
    # in the whole suite, freeing a video decoder left in garbage by an earlier test without the decoder's threads
    # (test_data_datamodule.py::test_a_forked_loader_worker_does_not_free_the_main_process_s_garbage)
    extra = dict(timeout=120) if workers else {}
    loader = StreamLoader(_stream(shards), batch_size=None, num_workers=workers, **extra)
    # (from a worker, PyTorch re-raises it with the worker's traceback before the message: not anchored)
    with pytest.raises(ValueError, match=r"data.train_shards: all 3 shards give no sample \(.*empty-0.tar, "
                       r".*empty-1.tar, .*empty-2.tar: empty tar archives, or members not named key.extension\); "
                       r"rebuild them \(data/README.md\) or leave them out of data.train_shards\n?$"):
        next(iter(loader))
    if workers == 0:  # each shard read a few times at most (the resampling draws them until it has met all three)
        assert sorted(set(opens)) == shards and len(opens) < 30


def test_a_reader_whose_share_is_empty_raises_and_an_empty_shard_among_good_ones_trains(synth, tmp_path, opens):
    good = sorted(str(p) for p in (synth / "train").glob("*.tar"))[:2]
    empty = _empty(tmp_path / "empty.tar", "no-sample")
    # 2 ranks, 2 shards: a shard each; rank 0's is the empty one
    with pytest.raises(ValueError, match=r"^data.train_shards read by rank 0, loader worker 0: the shard gives no "
                       r"sample \(.*empty.tar: .*leave it out of data.train_shards$"):
        next(iter(_stream([empty, good[0]], rank=0, world_size=2)))
    assert len(next(iter(_stream([empty, good[0]], rank=1, world_size=2)))["key"]) == 2
    # one reader of all three: the empty shard is read now and then, and the clips keep coming
    batches = list(islice(iter(_stream([empty, *good])), 20))
    assert len(batches) == 20 and opens.count(empty) > 1


def test_setup_refuses_a_split_of_empty_shards_and_leaves_empty_ones_out(synth, tmp_path):
    from mardini.data import setup_warnings

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    _empty(empty_dir / "a.tar", "no-member")
    (empty_dir / "b.tar").touch()  # a zero-byte file
    args = dict(frames=4, fps=8, resolution=8, batch_size=2, num_workers=0, epoch_size=4)
    with pytest.raises(ValueError, match=r"^data.train_shards: all 2 shards are empty \(no tar member: .*a.tar, "
                       r".*b.tar\); rebuild them \(data/README.md\) or give data.train_shards shards that hold clips$"):
        VideoDataModule(train_shards=str(empty_dir), val_shards=None, **args).setup("fit")
    with pytest.raises(ValueError, match=r"^data.val_shards: all 2 shards are empty .* or set data.val_shards: null "
                       "to train without validation$"):
        VideoDataModule(train_shards=str(synth / "train"), val_shards=str(empty_dir), **args).setup("validate")

    mixed = tmp_path / "mixed"
    shutil.copytree(synth / "train", mixed)
    _empty(mixed / "train-000000.tar", "no-member")  # replaces the first shard
    setup_warnings.WARNED.clear()
    with pytest.warns(UserWarning, match=r"data.train_shards: 1 of 4 shards are empty \(no tar member: "
                      r".*train-000000.tar\) and are left out"):
        dm = VideoDataModule(train_shards=str(mixed), val_shards=None, **args)
        dm.setup("fit")
    assert [Path(s).name for s in dm.train_set.shards] == [f"train-00000{i}.tar" for i in (1, 2, 3)]
    assert len(next(iter(dm.train_dataloader()))["key"]) == 2


def test_the_setup_check_reads_one_header_and_leaves_what_it_cannot_read_to_the_loader(synth, tmp_path):
    from mardini.data.datamodule import holds_no_member

    assert not holds_no_member(str(sorted((synth / "train").glob("*.tar"))[0]))
    assert holds_no_member(_empty(tmp_path / "a.tar", "no-member"))
    assert not holds_no_member(_empty(tmp_path / "b.tar", "no-sample"))  # a member: the stream finds out
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    assert not holds_no_member(str(tmp_path / "junk.tar"))  # counted as a corrupt shard by the loader
    assert not holds_no_member(str(tmp_path / "missing.tar")) and not holds_no_member("https://example.com/a.tar")
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz"):
        pass
    assert holds_no_member(str(tmp_path / "c.tar.gz"))

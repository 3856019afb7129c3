"""Slow: shard the real development clips of DATA.md (fetched by data/fetch_real_videos.sh) and stream them."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from mardini.data.datamodule import VideoDataModule
from mardini.data.video_shards import ShardSettings, videos_to_shards

VIDEOS = Path(__file__).resolve().parents[1] / "data" / "videos"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (VIDEOS / "mecavideo").is_dir() or not any((VIDEOS / "mecavideo").iterdir()),
                    reason="real clips not fetched: run `bash data/fetch_real_videos.sh` (needs the Debian registry)")
def test_real_clips_shard_and_stream(tmp_path):
    # max_fps decimates the 187 fps vp9 clip at shard time, so 5 frames at 8 fps fit in every 16-frame clip
    settings = ShardSettings(clip_frames=16, max_fps=25, short_side=64, max_clips_per_video=4, shard_max_count=4)
    s = videos_to_shards(VIDEOS / "mecavideo", tmp_path, settings, workers=2, progress=False)
    assert s.files >= 7 and not s.skipped and not s.partial, s.text()  # mpeg4, h264, vp9, theora ... all decode
    assert s.clips >= s.files and s.shards == -(-s.clips // 4)
    timing: dict[str, set] = {}
    for shard in tmp_path.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for meta in (json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")):
                timing.setdefault(meta["source"], set()).add(meta["timing"])
    # balle1-vp9.avi drops 5 frames after its first: read by timestamp; the rest, packed B-frames included, by index
    assert timing.pop("balle1-vp9.avi") == {"pts"} and s.timestamped == 1
    assert set().union(*timing.values()) == {"index"} and {"Force_constante.avi", "Principe_inertie.avi"} <= set(timing)
    dm = VideoDataModule(str(tmp_path), str(tmp_path), frames=5, fps=8, resolution=32, batch_size=4,
                         num_workers=2, val_clips=None)
    dm.setup("fit")
    n = sum(b["video"].shape[0] for b in dm.val_dataloader())
    assert n == s.clips - dm.skipped and dm.skipped == 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 5, 3, 32, 32)


@pytest.mark.skipif(not (VIDEOS / "bbb" / "bbb.mp4").is_file(),
                    reason="Big Buck Bunny not fetched: run `bash data/fetch_real_videos.sh --bbb`")
def test_big_buck_bunny_720p(tmp_path):
    settings = ShardSettings(clip_frames=24, max_fps=None, short_side=128, max_clips_per_video=6, shard_max_count=3)
    s = videos_to_shards(VIDEOS / "bbb", tmp_path, settings, workers=1, progress=False)
    assert s.clips == 6 and s.shards == 2 and not s.skipped

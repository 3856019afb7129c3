"""The synthetic set: determinism, ground truth, and its shard writer (deterministic, resumable, disjoint splits)."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mardini.data import synthetic as S
from mardini.data.synthetic_shards import clip_seed, write_synthetic_split

ROOT = Path(__file__).resolve().parents[1]


def _load_cli(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_clip_other_seed_other_clip():
    a, ma = S.render_clip(7, frames=6, height=24, width=40)
    b, mb = S.render_clip(7, frames=6, height=24, width=40)
    c, _ = S.render_clip(8, frames=6, height=24, width=40)
    assert a.dtype == np.uint8 and a.shape == (6, 24, 40, 3)
    assert np.array_equal(a, b) and ma == mb
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("frames,height,width", [(1, 8, 8), (5, 17, 31), (3, 48, 20)])
def test_any_size(frames, height, width):
    video, meta = S.render_clip(3, frames=frames, height=height, width=width)
    assert video.shape == (frames, height, width, 3)
    assert np.asarray(meta["positions"]).shape == (frames, len(meta["objects"]), 2)


def test_top_object_colour_is_at_its_stored_position():
    checked = 0
    for seed in range(12):
        video, meta = S.render_clip(seed, frames=8, height=48, width=64)
        pos = np.asarray(meta["positions"])  # (T, K, 2)
        top = meta["objects"][-1]  # drawn last = nearest
        rgb = np.rint(np.asarray(top["rgb"]) * 255)
        for t in range(8):
            x, y = pos[t, -1]
            px = video[t, int(y * 48), int(x * 64)].astype(float)
            assert np.abs(px - rgb).max() <= 2, (seed, t, px, rgb)
            checked += 1
    assert checked == 96


def test_background_is_not_flat_and_objects_move_and_stay_inside():
    video, meta = S.render_clip(5, frames=40, height=32, width=32, speed=(0.03, 0.04))
    pos = np.asarray(meta["positions"])  # (T, K, 2)
    radii = np.array([o["radius"] for o in meta["objects"]])
    assert (pos >= radii[None, :, None] - 1e-6).all() and (pos <= 1 - radii[None, :, None] + 1e-6).all()
    step = np.linalg.norm(np.diff(pos, axis=0), axis=-1)  # (T-1, K)
    speed = np.linalg.norm(np.asarray([o["velocity"] for o in meta["objects"]]), axis=-1)  # (K,)
    assert (step <= speed[None] + 1e-6).all() and (step > 0).any()
    corner_pixels = video[0, [0, 0, -1, -1], [0, -1, 0, -1]].astype(int)
    assert np.ptp(corner_pixels, axis=0).max() > 3  # a gradient, not one flat colour
    assert len({o["color"] for o in meta["objects"]}) == len(meta["objects"])  # distinct colours


def test_bounce_reflects_at_the_walls():
    p = S.bounce(np.array([[0.5, 0.5]]), np.array([[0.3, 0.0]]), np.array([[0.1, 0.1]]), np.array([[0.9, 0.9]]),
                 np.arange(4, dtype=float))
    assert np.allclose(p[:, 0, 0], [0.5, 0.8, 0.7, 0.4])  # 0.5 -> 0.8 -> hits 0.9, back to 0.7 -> 0.4


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="objects"):
        S.render_clip(0, objects=(0, 3))
    with pytest.raises(ValueError, match="height"):
        S.render_clip(0, height=2)


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------


def _members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_writer_is_deterministic_and_splits_are_disjoint(tmp_path):
    for root in ("a", "b"):
        write_synthetic_split(tmp_path / root, "train", 5, 2, frames=3, height=8, width=8, progress=False)
        write_synthetic_split(tmp_path / root, "val", 3, 2, frames=3, height=8, width=8, progress=False)
    shards = sorted((tmp_path / "a" / "train").glob("*.tar"))
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for p in shards:
        assert p.read_bytes() == (tmp_path / "b" / "train" / p.name).read_bytes()
    assert sorted(_members(shards[0])) == ["train-0000000.json", "train-0000000.video.npy",
                                           "train-0000001.json", "train-0000001.video.npy"]
    seeds = {}
    for split in ("train", "val"):
        for p in (tmp_path / "a" / split).glob("*.tar"):
            with tarfile.open(p) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(m).read())
                        seeds.setdefault(split, set()).add(meta["seed"])
                        assert meta["split"] == split and meta["frames"] == 3 and meta["fps"] == 16.0
    assert len(seeds["train"]) == 5 and len(seeds["val"]) == 3 and not seeds["train"] & seeds["val"]
    assert clip_seed("val", 0) != clip_seed("train", 0)


def test_writer_resumes_without_rewriting_finished_shards(tmp_path):
    kw = dict(frames=2, height=8, width=8, progress=False)
    write_synthetic_split(tmp_path, "train", 6, 2, **kw)
    folder = tmp_path / "train"
    first = folder / "train-000000.tar"
    first.write_bytes(first.read_bytes())  # same bytes, new mtime marker below
    marker = first.stat().st_mtime_ns
    (folder / "train-000002.tar").unlink()  # an interrupted run
    out = write_synthetic_split(tmp_path, "train", 6, 2, **kw)
    assert out["written"] == 1 and out["kept"] == 2
    assert first.stat().st_mtime_ns == marker
    assert (folder / "train-000002.tar").exists()
    with pytest.raises(ValueError, match=r"other settings \(clips 6 -> 7, height 8 -> 16\); remove it"):
        write_synthetic_split(tmp_path, "train", 7, 2, **{**kw, "height": 16})  # what differs, not the old settings


def test_cli_refuses_a_folder_of_other_settings_in_one_line(tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    write_synthetic_split(tmp_path, "train", 2, 2, frames=2, height=8, width=8, progress=False)
    monkeypatch.setattr("sys.argv", ["make_synthetic.py", "--out", str(tmp_path), "--train-clips", "3",
                                     "--train-per-shard", "2", "--frames", "2", "--height", "8", "--width", "8"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "data" / "make_synthetic.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"make_synthetic.py: error: {tmp_path / 'train'} holds a synthetic split made with other "
                          "settings (clips 2 -> 3); remove it or choose another output folder")


def test_cli_writes_both_splits(tmp_path):
    cli = _load_cli("make_synthetic")
    out = cli.main(["--out", str(tmp_path), "--train-clips", "4", "--val-clips", "2", "--train-per-shard", "2",
                    "--val-per-shard", "1", "--frames", "2", "--height", "8", "--width", "8", "--workers", "1",
                    "--no-progress"])
    assert [s["shards"] for s in out] == [2, 2]
    assert len(list((tmp_path / "val").glob("*.tar"))) == 2

"""The latent cache: a batch read from cached latents equals the latents computed on the fly from pixels."""

from __future__ import annotations

import re

import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from mardini.autoencoders import SpaceToDepthAutoencoder
from mardini.data.datamodule import VideoDataModule
from mardini.data.latent_cache import cache_latents, encode_pair, load_autoencoder
from mardini.data.testing import tiny_synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("synth"), train=8, val=8)


def _cli():
    spec = importlib.util.spec_from_file_location("cache_latents", ROOT / "data" / "cache_latents.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dm(shards: Path, latents: bool, frames: int = 4) -> VideoDataModule:
    dm = VideoDataModule(str(shards), str(shards), frames=frames, fps=8, resolution=16, batch_size=4, num_workers=0,
                         val_clips=None, latents=latents)
    dm.setup("validate")
    return dm


def test_cached_batch_equals_on_the_fly(synth, tmp_path):
    out = _cli().main([str(synth / "val"), str(tmp_path), "--frames", "4", "--fps", "8", "--resolution", "16",
                       "--planner-resolution", "8", "--dtype", "float32", "--autoencoder-kwargs",
                       '{"downsample": 2}', "--no-progress"])
    assert out["clips"] == 8 and out["written"] == 4  # one latent shard per input shard
    ae = SpaceToDepthAutoencoder(2)
    pixels, cached = _dm(synth / "val", False), _dm(tmp_path, True)
    n = 0
    for p, c in zip(pixels.val_dataloader(), cached.val_dataloader(), strict=True):
        assert p["key"] == c["key"]
        z_high, z_low = encode_pair(ae, p["video"], 8)  # what the Lightning module does on the fly
        assert c["z_high"].shape == (4, 4, 12, 8, 8) and c["z_low"].shape == (4, 4, 12, 4, 4)
        assert torch.allclose(c["z_high"], z_high, atol=1e-6) and torch.allclose(c["z_low"], z_low, atol=1e-6)
        assert torch.equal(c["fps"], p["fps"])
        assert torch.allclose(c["positions"], p["positions"], atol=1e-5, equal_nan=True)
        n += 4
    assert n == 8
    again = _cli().main([str(synth / "val"), str(tmp_path), "--frames", "4", "--fps", "8", "--resolution", "16",
                         "--planner-resolution", "8", "--dtype", "float32", "--autoencoder-kwargs",
                         '{"downsample": 2}', "--no-progress"])
    assert again["kept"] == 4 and again["written"] == 0  # resumable


def test_float16_cache_and_shorter_windows(synth, tmp_path):
    _cli().main([str(synth / "val"), str(tmp_path), "--frames", "5", "--fps", "8", "--resolution", "16",
                 "--planner-resolution", "8", "--no-progress"])
    pixels = VideoDataModule(str(synth / "val"), str(synth / "val"), frames=5, fps=8, resolution=16, batch_size=4,
                             num_workers=0, val_clips=None)
    pixels.setup("validate")
    p = next(iter(pixels.val_dataloader()))
    c = next(iter(_dm(tmp_path, True, frames=5).val_dataloader()))
    assert torch.allclose(c["z_high"], SpaceToDepthAutoencoder(2).encode(p["video"]), atol=1e-2)  # float16
    short = next(iter(_dm(tmp_path, True, frames=3).val_dataloader()))
    assert torch.equal(short["z_high"], c["z_high"][:, 1:4])  # centred sub-window of the cached 5


def test_latent_settings_must_match_the_cache(synth, tmp_path):
    _cli().main([str(synth / "val"), str(tmp_path), "--frames", "4", "--resolution", "16",
                 "--planner-resolution", "8", "--no-progress"])
    with pytest.raises(ValueError, match="cached at \\[16, 16\\]"):
        VideoDataModule(str(tmp_path), None, frames=4, resolution=32, latents=True, num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="hold 4 frames"):
        VideoDataModule(str(tmp_path), None, frames=6, resolution=16, latents=True, num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="not a latent shard"):
        VideoDataModule(str(synth / "val"), None, frames=4, resolution=16, latents=True, num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="FrameAutoencoder"):
        load_autoencoder("torch.nn.Linear")


def _cache(src: str, out: Path, frames: str = "4", fps: str = "8") -> dict:
    return _cli().main([src, str(out), "--frames", frames, "--fps", fps, "--resolution", "16",
                        "--planner-resolution", "8", "--no-progress"])


def test_a_rerun_with_other_settings_or_clashing_names_is_refused(synth, tmp_path):
    _cache(str(synth / "val"), tmp_path / "cache")
    with pytest.raises(ValueError, match="other settings \\(frames 4 -> 2\\)"):  # kept shards would mix settings
        _cache(str(synth / "val"), tmp_path / "cache", frames="2")
    shutil.copytree(synth / "val", tmp_path / "copy" / "val")  # same shard names in another folder
    with pytest.raises(ValueError, match="would both be cached as"):
        _cache(f"{synth / 'val'}::{tmp_path / 'copy' / 'val'}", tmp_path / "both")


def test_a_resume_with_another_chunk_size_is_no_other_setting(synth, tmp_path):
    """chunk_size bounds memory, not the latents: a resume on a smaller GPU keeps the shards cached so far (it was
    refused: 'holds latents cached with other settings (autoencoder {... 'chunk_size': 64 ...} -> {...})')."""
    first = sorted((synth / "val").glob("*.tar"))[:2]
    _cache("::".join(map(str, first)), tmp_path / "cache")  # interrupted: 2 of 4
    again = _cli().main([str(synth / "val"), str(tmp_path / "cache"), "--frames", "4", "--fps", "8", "--resolution",
                         "16", "--planner-resolution", "8", "--autoencoder-kwargs", '{"chunk_size": 2}',
                         "--no-progress"])
    assert again["kept"] == 2 and again["written"] == 2
    with pytest.raises(ValueError, match="other settings \\(autoencoder .*'scale': 1.0.* -> .*'scale': 2.0"):
        _cli().main([str(synth / "val"), str(tmp_path / "cache"), "--frames", "4", "--fps", "8", "--resolution", "16",
                     "--planner-resolution", "8", "--autoencoder-kwargs", '{"scale": 2.0}', "--no-progress"])


def test_a_shard_without_a_usable_clip_is_not_cached(synth, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth / "val", src)
    bad = src / "val-999999.tar"
    with tarfile.open(bad, "w") as tar:  # a sample whose video is not an array
        for name, data in (("bad-0.json", b'{"fps": 8.0, "frames": 12}'), ("bad-0.video.npy", b"not npy")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.warns(UserWarning, match="1 input shard\\(s\\) gave no usable clip"):
        out = _cache(str(src), tmp_path / "cache")
    assert out["empty"] == [str(bad)] and out["written"] == 4 and out["clips"] == 8
    assert out["skipped"] == 1  # counted although the shard gave no clip to carry it
    assert not (tmp_path / "cache" / bad.name).exists()  # no empty shard for a loader worker to stall on


def test_the_fps_check_reads_the_rate_the_cache_asked_for(tmp_path):
    from mardini.data.datamodule import check_latent_shards
    from mardini.data.sharding import atomic_tar, json_bytes

    shard = tmp_path / "z.tar"
    meta = {"fps": 6.25, "latent_cache": {"resolution": [16, 16], "frames": 4, "fps": 8.0}}  # a 25-fps source
    with atomic_tar(shard) as sink:
        sink.write({"__key__": "a", "json": json_bytes(meta)})
    check_latent_shards(str(shard), 4, 8.0, 16)  # cached with --fps 8, read with data.fps 8: accepted
    with pytest.raises(ValueError, match="re-cache with --fps 12.0 into a new folder, or set data.fps: 8.0"):
        check_latent_shards(str(shard), 4, 12.0, 16)
    with pytest.raises(ValueError, match="data.fps asks null; re-cache with no --fps .* or set data.fps: 8.0"):
        check_latent_shards(str(shard), 4, None, 16)  # native rate asked, the cache holds 8-fps clips
    native = tmp_path / "native.tar"
    with atomic_tar(native) as sink:
        native_meta = {**meta, "latent_cache": {**meta["latent_cache"], "fps": None}}
        sink.write({"__key__": "a", "json": json_bytes(native_meta)})
    check_latent_shards(str(native), 4, None, 16)  # both native: accepted
    with pytest.raises(ValueError, match="cached with fps null .* or set data.fps: null"):
        check_latent_shards(str(native), 4, 8.0, 16)


def test_first_clips_reads_the_validation_loader_only(synth):
    from mardini.data.datamodule import first_clips

    assert first_clips(str(synth / "val"), 10001, 4, 16, 8).shape[0] == 8  # more than an epoch_size: all 8 clips


def test_a_stage_refuses_a_cache_of_other_latents(synth, tmp_path):
    from mardini.lit import GenerationModule

    _cache(str(synth / "val"), tmp_path / "plain")  # the default autoencoder: no shift, no scale
    shard = str(sorted((tmp_path / "plain").glob("*.tar"))[0])
    GenerationModule(size="tiny", frames=4).check_latent_autoencoder(shard)  # the same latents: accepted
    normalised = GenerationModule(size="tiny", frames=4, autoencoder=SpaceToDepthAutoencoder(2, shift=-0.4, scale=2.58))
    with pytest.raises(ValueError, match="differ: \\['scale', 'shift'\\].*re-cache"):
        normalised.check_latent_autoencoder(shard)


def _save_tiny_vae(folder: Path, seed: int) -> str:
    """A 4-channel 2x diffusers AutoencoderKL with random weights of ``seed`` at ``folder``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)  # diffusers initialises weights from the global RNG
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(folder)
    return str(folder)


def test_a_cache_records_its_vae_s_weights_not_only_its_path(synth, tmp_path):
    """Another VAE behind the cache's path was accepted (the spec names only the path) and the same VAE behind
    another path refused ("differ: ['path']"); the cache's fingerprint of the weights and config decides now."""
    pytest.importorskip("diffusers")
    from mardini.autoencoders import DiffusersAutoencoder
    from mardini.lit import GenerationModule

    vae, moved = _save_tiny_vae(tmp_path / "vae", 0), tmp_path / "moved"
    shutil.copytree(vae, moved)  # the same VAE on another mount
    args = dict(frames=4, fps=8, resolution=16, planner_resolution=8, progress=False)
    cache_latents(str(synth / "val"), tmp_path / "cache", DiffusersAutoencoder(vae), **args)
    shard = str(sorted((tmp_path / "cache").glob("*.tar"))[0])

    def stage(path: str) -> GenerationModule:
        return GenerationModule(size="tiny", frames=4, autoencoder=DiffusersAutoencoder(path))

    stage(vae).check_latent_autoencoder(shard)
    stage(str(moved)).check_latent_autoencoder(shard)  # the same weights elsewhere: accepted
    cache_latents(str(synth / "val"), tmp_path / "cache", DiffusersAutoencoder(moved), **args)  # resumes there too
    shutil.rmtree(vae)
    _save_tiny_vae(tmp_path / "vae", 1)  # other weights at the cache's path
    with pytest.raises(ValueError, match="other weights or config .*Point model.init_args.autoencoder at the VAE"):
        stage(vae).check_latent_autoencoder(shard)
    with pytest.raises(ValueError, match="other settings \\(autoencoder_fingerprint 'sha256:"):
        cache_latents(str(synth / "val"), tmp_path / "cache", DiffusersAutoencoder(vae), **args)


def test_a_pattern_joining_two_caches_is_checked_in_each(synth, tmp_path):
    """Only the first shard of a pattern was checked, so ``A::B`` trained on B's latents of another VAE (or
    another frame rate) unnoticed; the first shard of each folder is checked now."""
    pytest.importorskip("diffusers")
    from types import SimpleNamespace

    from mardini.autoencoders import DiffusersAutoencoder
    from mardini.lit import GenerationModule

    args = dict(frames=4, fps=8, resolution=16, planner_resolution=8, progress=False)
    for name, seed in (("a", 0), ("b", 1)):
        vae = DiffusersAutoencoder(_save_tiny_vae(tmp_path / f"vae_{name}", seed))
        cache_latents(str(synth / "val"), tmp_path / name, vae, **args)
    stage = GenerationModule(size="tiny", frames=4, autoencoder=DiffusersAutoencoder(tmp_path / "vae_a"))
    stage.check_latent_caches(SimpleNamespace(train_shards=str(tmp_path / "a"), val_shards=None))  # accepted
    for joined in (f"{tmp_path / 'a'}::{tmp_path / 'b'}", f"{tmp_path}/{{a,b}}/*.tar"):
        with pytest.raises(ValueError, match=f"the latent cache {tmp_path / 'b'}.*other weights or config"):
            stage.check_latent_caches(SimpleNamespace(train_shards=joined, val_shards=None))
    _cache(str(synth / "val"), tmp_path / "a_fps8")
    _cache(str(synth / "val"), tmp_path / "b_fps12", fps="12")
    with pytest.raises(ValueError, match=f"latents in {tmp_path / 'b_fps12'}.* were cached with fps 12"):
        _dm(f"{tmp_path / 'a_fps8'}::{tmp_path / 'b_fps12'}", True)


def test_a_stage_checks_the_validation_cache_too(synth, tmp_path):
    from types import SimpleNamespace

    from mardini.lit import GenerationModule

    _cache(str(synth / "val"), tmp_path / "plain")  # the default autoencoder: no shift, no scale
    plain = GenerationModule(size="tiny", frames=4)
    normalised = GenerationModule(size="tiny", frames=4, autoencoder=SpaceToDepthAutoencoder(2, shift=-0.4, scale=2.58))
    normalised_dir = tmp_path / "normalised"
    for name in ("train", "val"):
        (normalised_dir / name).mkdir(parents=True)
    for tar in (tmp_path / "plain").glob("*.tar"):  # a cache whose shards record the normalised autoencoder
        with tarfile.open(tar) as shard:
            members = [(m, shard.extractfile(m).read()) for m in shard.getmembers()]
        for name in ("train", "val"):
            with tarfile.open(normalised_dir / name / tar.name, "w") as out:
                for m, data in members:
                    if m.name.endswith(".json"):
                        meta = json.loads(data)
                        meta["latent_cache"]["autoencoder"] = normalised.autoencoder.spec()
                        data = json.dumps(meta).encode()
                        m.size = len(data)
                    out.addfile(m, io.BytesIO(data))
    good, other = str(tmp_path / "plain"), str(normalised_dir / "val")
    plain.check_latent_caches(SimpleNamespace(train_shards=good, val_shards=good))  # both plain: accepted
    normalised.check_latent_caches(SimpleNamespace(train_shards=other, val_shards=None))  # no validation: accepted
    with pytest.raises(ValueError, match=f"the latent cache {other}.*differ: \\['scale', 'shift'\\]"):
        plain.check_latent_caches(SimpleNamespace(train_shards=good, val_shards=other))


def test_a_planner_stage_refuses_a_cache_of_another_planner_resolution(synth, tmp_path):
    from mardini.data.datamodule import first_json
    from mardini.lit import MarDiniModule, PlanningModule

    _cache(str(synth / "val"), tmp_path / "plain")
    shard = str(sorted((tmp_path / "plain").glob("*.tar"))[0])
    low = first_json(shard)["latent_cache"]["planner_resolution"][0]
    PlanningModule(size="tiny", frames=4, planner_resolution=low).check_latent_autoencoder(shard)  # accepted
    for cls in (PlanningModule, MarDiniModule):
        with pytest.raises(ValueError, match=f"planner copies at \\[{low}, {low}\\].*--planner-resolution {low // 2}"):
            cls(size="tiny", frames=4, planner_resolution=low // 2).check_latent_autoencoder(shard)


def test_a_16_9_cache_records_its_planner_copy_and_is_checked_by_it(synth, tmp_path):
    """Of 8x16 frames, --planner-resolution 4 makes 4x8 copies (the short side, the aspect ratio kept), as the
    model's planner_resolution 4 does; the cache recorded [4, 4] alone, and the same copies cached as
    --planner-resolution 4x8 were refused ('holds planner copies at [4, 8], model.planner_resolution is 4')."""
    from mardini.data.datamodule import first_json
    from mardini.lit import PlanningModule

    for name, low in (("short", "4"), ("hxw", "4x8")):
        _cli().main([str(synth / "val"), str(tmp_path / name), "--frames", "4", "--fps", "8", "--resolution", "8x16",
                     "--planner-resolution", low, "--no-progress"])
        shard = str(sorted((tmp_path / name).glob("*.tar"))[0])
        assert first_json(shard)["latent_cache"]["planner_copy"] == [4, 8]
        PlanningModule(size="tiny", frames=4, planner_resolution=4).check_latent_autoencoder(shard)  # accepted
        with pytest.raises(ValueError, match=r"planner copies at \[4, 8\] of its 8x16 frames, "
                                             r"model.planner_resolution=8 makes them at \[8, 16\]"):
            PlanningModule(size="tiny", frames=4, planner_resolution=8).check_latent_autoencoder(shard)
    manifest = tmp_path / "short" / "manifest.json"  # a folder cached before planner_copy was recorded resumes
    old = json.loads(manifest.read_text())
    del old["settings"]["planner_copy"]
    manifest.write_text(json.dumps(old))
    assert _cli().main([str(synth / "val"), str(tmp_path / "short"), "--frames", "4", "--fps", "8", "--resolution",
                        "8x16", "--planner-resolution", "4", "--no-progress"])["kept"] == 4


def test_latent_specs_compare_classes_not_spellings():
    from mardini.lit.checkpoints import latent_spec_differences

    ours = SpaceToDepthAutoencoder(2).spec()  # mardini.autoencoders.pixel.SpaceToDepthAutoencoder, every argument
    assert latent_spec_differences({"class_path": "mardini.autoencoders.SpaceToDepthAutoencoder"}, ours) == []
    assert latent_spec_differences({"class_path": "mardini.autoencoders.DiffusersAutoencoder"}, ours) == ["class"]
    assert latent_spec_differences({**ours, "init_args": {**ours["init_args"], "chunk_size": 1}}, ours) == []


def test_a_spec_names_a_class_outside_the_autoencoders_it_is_never_imported(monkeypatch):
    import importlib

    from mardini.lit.checkpoints import latent_spec_differences

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    ours = SpaceToDepthAutoencoder(2).spec()
    assert latent_spec_differences({"class_path": "json.JSONDecoder"}, ours) == ["class"]
    assert "json" not in imported  # a checkpoint or cache file names it: compared by path, not imported


def test_a_run_that_caches_no_clip_fails_with_the_reasons_and_leaves_no_manifest(synth, tmp_path):
    """Clips asked for 40 frames of the synthetic 12-frame clips: every sample is too short; the run must not 'succeed' with nothing."""
    out = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"all 8 samples were skipped \(8 x too few frames; e\.g\. .*"
                                         r"fewer --frames or a higher --fps"):
        _cache(str(synth / "val"), out, frames="40")
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))  # nothing for training to find
    assert _cache(str(synth / "val"), out)["clips"] == 8  # the fixed settings into the same folder are not refused


def test_cli_user_errors_exit_2_in_one_line(synth, tmp_path, capsys, monkeypatch):
    from mardini.autoencoders import pixel_stats
    from mardini.data.testing import moving_frames, write_video

    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    base = ["--frames", "4", "--resolution", "16", "--planner-resolution", "8", "--no-progress"]
    assert _cli().cli([str(synth / "val"), str(tmp_path / "a"), *base, "--frames", "40"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cache_latents.py: error: no clip of") and "too few frames" in err and "Traceback" not in err

    write_video(tmp_path / "videos" / "a.mp4", moving_frames(6, 16, 16), 8)  # videos where shards are expected
    assert _cli().cli([str(tmp_path / "videos"), str(tmp_path / "b"), *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cache_latents.py: error:") and "these are videos" in err and "videos_to_shards.py" in err
    assert pixel_stats.cli(["--shards", str(tmp_path / "videos"), "--clips", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixel_stats: error:") and "videos_to_shards.py" in err

    vae = ["--autoencoder", "mardini.autoencoders.DiffusersAutoencoder", "--autoencoder-kwargs",
           json.dumps({"path": str(tmp_path / "no-vae")})]
    assert _cli().cli([str(synth / "val"), str(tmp_path / "c"), *base, *vae]) == 2
    assert capsys.readouterr().err.startswith("cache_latents.py: error: no AutoencoderKL")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    assert _cli().cli([str(synth / "val"), str(tmp_path / "d"), *base, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cache_latents.py: error: device cuda asked for, but torch finds no CUDA GPU") and "use --device cpu" in err
    assert not (tmp_path / "d").exists()


def test_another_process_caching_the_same_shard_meanwhile_is_no_error(synth, tmp_path, monkeypatch):
    """Two processes into one folder: while this one encodes the first shard, another caches that shard (here: a
    nested run). Both wrote the same temp file name and the later rename failed ('[Errno 2] No such file or
    directory: .../val-000000.tar.tmp -> .../val-000000.tar'); now each writes its own temp file, and the shard the
    other finished first is kept."""
    import mardini.data.latent_cache as latent_cache

    out = tmp_path / "cache"
    real, nested = latent_cache._encode_shard, []

    def encode_while_another_process_caches(stream, *args):
        real(stream, *args)
        if not nested:  # the first shard: the other process caches it meanwhile (and only it)
            nested.append(None)
            nested[0] = _cache(stream.shards[0], out)

    monkeypatch.setattr(latent_cache, "_encode_shard", encode_while_another_process_caches)
    summary = _cache(str(synth / "val"), out)
    assert nested[0]["written"] == 1 and nested[0]["clips"] == 2  # the other process's shard
    assert summary["kept"] == 1 and summary["written"] == 3 and summary["clips"] == 6  # this one's: the rest
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *(f"val-{i:06d}.tar" for i in range(4))]
    assert sum(1 for _ in _dm(out, True).val_dataloader()) == 2  # 8 whole clips in batches of 4


def test_parts_split_the_shards_between_processes(synth, tmp_path, capsys, monkeypatch):
    """--part I/N caches input shards I, I+N, ...: N processes into one folder cache each shard once."""
    whole, parts = _cache(str(synth / "val"), tmp_path / "whole"), []
    for part in ("0/3", "1/3", "2/3"):
        parts.append(_cli().main([str(synth / "val"), str(tmp_path / "parts"), "--frames", "4", "--fps", "8",
                                  "--resolution", "16", "--planner-resolution", "8", "--no-progress",
                                  "--part", part]))
    assert [p["written"] for p in parts] == [2, 1, 1] and sum(p["clips"] for p in parts) == whole["clips"] == 8
    assert "(part 1/3 of 4 input shards)" in capsys.readouterr().out
    for shard in sorted((tmp_path / "whole").glob("*.tar")):
        assert (tmp_path / "parts" / shard.name).read_bytes() == shard.read_bytes()
    monkeypatch.setenv("SLURM_PROCID", "4")
    monkeypatch.setenv("SLURM_NTASKS", "5")  # more tasks than shards: this one has none
    idle = _cli().main([str(synth / "val"), str(tmp_path / "parts"), "--part", "slurm", "--no-progress"])
    assert idle["shards"] == 0 and idle["written"] == idle["clips"] == 0
    assert "part 4/5 has no input shard (4 input shards over 5 parts)" in capsys.readouterr().out


@pytest.mark.parametrize(("part", "message"), [
    ("2/2", "--part 2/2 is impossible: it must be I/N with 0 <= I < N"),
    ("one/two", "--part one/two is impossible: it must be I/N with 0 <= I < N"),
    ("slurm", "--part slurm takes SLURM_PROCID and SLURM_NTASKS, and they are not set"),
])
def test_an_impossible_part_is_one_line(synth, tmp_path, capsys, monkeypatch, part, message):
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    assert _cli().cli([str(synth / "val"), str(tmp_path / "a"), "--part", part, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cache_latents.py: error: {message}") and not (tmp_path / "a").exists()


def test_a_planner_resolution_larger_than_the_frames_is_refused_before_anything_loads(synth, tmp_path, capsys,
                                                                                      monkeypatch):
    """--planner-resolution 32 over --resolution 16 cached a z_low twice the size of z_high (exit 0), which a stage
    training on pixels refuses; now the command refuses it right after parsing, and so does cache_latents()."""
    from mardini.data.latent_cache import cache_latents

    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    cli = _cli()
    loaded, real = [], cli.load_autoencoder
    monkeypatch.setattr(cli, "load_autoencoder", lambda *a: loaded.append(a) or real(*a))
    args = [str(synth / "val"), str(tmp_path / "a"), "--frames", "4", "--resolution", "16", "--no-progress"]
    assert cli.cli([*args, "--planner-resolution", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cache_latents.py: error: --planner-resolution=32 is larger than --resolution=16: the "
                          "planner sees a low-resolution copy of the 16x16 frames") and "at most 16" in err
    assert len(err.strip().splitlines()) == 2  # the message and where it was raised
    assert not loaded and not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="planner_resolution=24 is larger than resolution=16"):
        cache_latents(str(synth / "val"), tmp_path / "b", SpaceToDepthAutoencoder(2), 4, 8, 16, 24, progress=False)
    assert not (tmp_path / "b").exists()
    from mardini.data.latent_cache import check_sizes

    check_sizes((16, 24), 16)  # the short side: a 16x24 copy, as large as the frames
    with pytest.raises(ValueError, match=r"a 20x30 one would upscale them; use a planner_resolution of at most 16"):
        check_sizes((16, 24), 20)
    with pytest.raises(ValueError, match=r"at most 16x24, or raise resolution"):
        check_sizes((16, 24), (8, 32))


@pytest.mark.parametrize(("flags", "message"), [
    (["--resolution", "16", "--planner-resolution", "7"], "--planner-resolution=7 makes a 7x7 planner copy of the "
     "16x16 frames, not divisible by the autoencoder's downsampling factor 2; use e.g. 6 or 8"),
    (["--resolution", "15", "--planner-resolution", "8"], "--resolution=15 is not divisible by the autoencoder's "
     "downsampling factor 2: its frames would not encode; use a multiple of 2, e.g. 14 or 16"),
    (["--resolution", "16x24", "--planner-resolution", "9"], "--planner-resolution=9 makes a 9x14 planner copy of "
     "the 16x24 frames, not divisible by the autoencoder's downsampling factor 2; use e.g. 8 or 12"),
])
def test_sizes_the_autoencoder_cannot_encode_name_the_flag_before_the_progress_bar(synth, tmp_path, capsys,
                                                                                    monkeypatch, flags, message):
    """The flag, not the video, was the problem, but the error came from the encoder after the progress bar started:
    'frame size 7x7 is not divisible by the autoencoder's downsampling factor 2; resize or crop the video'."""
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    assert _cli().cli([str(synth / "val"), str(tmp_path / "a"), "--frames", "4", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cache_latents.py: error: {message}\n") and "latent cache" not in err  # no progress bar
    assert not (tmp_path / "a").exists()


def test_cache_latents_checks_its_sizes_against_the_autoencoder_s_factor(synth, tmp_path):
    from mardini.data.latent_cache import cache_latents

    with pytest.raises(ValueError, match=r"^planner_resolution=12 makes a 12x12 planner copy of the 16x16 frames, "
                                         r"not divisible by the autoencoder's downsampling factor 8; use e.g. 8 or 16"):
        cache_latents(str(synth / "val"), tmp_path / "a", SpaceToDepthAutoencoder(8), 4, 8, 16, 12, progress=False)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ("{bad", "--autoencoder-kwargs {bad is not JSON (Expecting property name enclosed in double quotes: line 1 "
     "column 2 (char 1)): give a JSON object of the autoencoder's constructor arguments, e.g. --autoencoder-kwargs "
     "'{\"shift\": -0.40, \"scale\": 2.58}'"),
    ("[2]", "--autoencoder-kwargs [2] is not a JSON object: give the autoencoder's constructor arguments by name"),
    ('{"shift": "a"}', "mardini.autoencoders.SpaceToDepthAutoencoder with --autoencoder-kwargs {\"shift\": \"a\"}: "
     "could not convert string to float: 'a' (give --autoencoder-kwargs the constructor's arguments"),
    ('{"factor": 2}', "mardini.autoencoders.SpaceToDepthAutoencoder with --autoencoder-kwargs {\"factor\": 2}: "
     "SpaceToDepthAutoencoder.__init__() got an unexpected keyword argument 'factor'"),
])
def test_bad_autoencoder_kwargs_name_the_flag_in_one_line(synth, tmp_path, capsys, monkeypatch, kwargs, message):
    """Before: json's own message ('Expecting property name ...', raised at json/decoder.py), the constructor's
    ('could not convert string to float: ...' raised at autoencoders/pixel.py), or a TypeError traceback."""
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    argv = [str(synth / "val"), str(tmp_path / "a"), "--autoencoder", "mardini.autoencoders.SpaceToDepthAutoencoder",
            "--autoencoder-kwargs", kwargs, "--frames", "4", "--resolution", "16", "--planner-resolution", "8",
            "--no-progress"]
    assert _cli().cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cache_latents.py: error: {message}") and len(err.strip().splitlines()) == 2
    assert not (tmp_path / "a").exists()


def _rewrite_clip_json(tar: Path, edit) -> None:
    """Rewrite every clip's json in the shard ``tar`` with ``edit(meta)`` (a fixture of another code's cache)."""
    with tarfile.open(tar) as shard:
        members = [(m, shard.extractfile(m).read()) for m in shard.getmembers()]
    with tarfile.open(tar, "w") as out:
        for m, data in members:
            if m.name.endswith(".json"):
                meta = json.loads(data)
                edit(meta)
                data = json.dumps(meta).encode()
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))


def test_a_cache_records_its_format_and_code_and_a_newer_format_is_refused(synth, tmp_path):
    """A cache records format_version and the code (package version, git commit) in manifest.json and each clip's
    latent_cache; one without them (format 0, cached before) reads and resumes as before, and one a newer code cached
    in another format is refused by a re-run and by the DataModule, naming the format and the code (the code read
    its shards without a word whatever had changed in them)."""
    import mardini
    from mardini.data.datamodule import first_json
    from mardini.data.latent_cache import CACHE_FORMAT

    out = tmp_path / "cache"
    _cache(str(synth / "val"), out)
    manifest_file = out / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["format_version"] == CACHE_FORMAT == 1 and manifest["code"]["version"] == mardini.__version__
    assert set(manifest["code"]) - {"source"} == {"version", "git_commit", "git_dirty"}  # source: no git commit
    shards = sorted(out.glob("*.tar"))
    cached = first_json(str(shards[0]))["latent_cache"]
    assert cached["format_version"] == 1 and cached["code"] == manifest["code"]
    old = {k: v for k, v in manifest.items() if k not in ("format_version", "code")}  # an older code's cache
    manifest_file.write_text(json.dumps(old))
    for tar in shards:
        _rewrite_clip_json(tar, lambda meta: [meta["latent_cache"].pop(k) for k in ("format_version", "code")])
    assert _cache(str(synth / "val"), out)["kept"] == 4  # resumed as it was
    _dm(out, latents=True)  # and read
    newer = {"format_version": 2, "code": {"version": "0.2.0", "git_commit": "ab" * 20}}
    manifest_file.write_text(json.dumps({**old, **newer}))
    said = (r"was cached in latent-cache format 2, this code \(mardini 0\.1\.0\) reads formats 0 to 1: newer code "
            r"cached it \(mardini 0\.2\.0, commit abababababab\); update this checkout \(git pull\)")
    with pytest.raises(ValueError, match=f"the latent cache {out} {said}"):
        _cache(str(synth / "val"), out)
    _rewrite_clip_json(shards[0], lambda meta: meta["latent_cache"].update(newer))
    with pytest.raises(ValueError, match=f"the latent cache {shards[0]} {said}"):
        _dm(out, latents=True)


@pytest.mark.parametrize("recorded", ["1", 1.0, True, None, [1]])
def test_a_cache_format_that_is_not_a_whole_number_is_refused_with_a_message(recorded):
    """An edited or foreign manifest whose format_version is no int is one ValueError naming it (it was a TypeError
    from comparing it, or, for True / 1.0, taken as format 1)."""
    from mardini.data.latent_cache import check_cache_format

    with pytest.raises(ValueError, match=rf"the cache records latent-cache format {re.escape(repr(recorded))}, not a "
                                         r"whole number.*re-cache it into a new folder"):
        check_cache_format({"format_version": recorded}, "the cache")

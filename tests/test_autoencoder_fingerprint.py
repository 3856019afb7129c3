"""Checkpoints record their autoencoder's fingerprint: a stage started from one (init_from, a resume) refuses a VAE
of other weights behind the recorded path and accepts the same VAE at another path; sampling warns."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from pipeline_helpers import make_checkpoint, one_thread  # noqa: F401 (fixture)
from test_data_latent_cache import _save_tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory, one_thread):
    """``(vae folder, its copy at another path, a generation checkpoint trained with the VAE)``."""
    pytest.importorskip("diffusers")
    from mardini.autoencoders import DiffusersAutoencoder

    root = tmp_path_factory.mktemp("fingerprint")
    vae, moved = _save_tiny_vae(root / "vae", 0), root / "moved"
    shutil.copytree(vae, moved)
    ckpt = make_checkpoint(root / "generation.ckpt", "generation", frames=4, size=16,
                           model_args={"autoencoder": DiffusersAutoencoder(vae)})
    return vae, str(moved), ckpt


def _stage(vae: str, **kwargs):
    from mardini.autoencoders import DiffusersAutoencoder
    from mardini.lit import GenerationModule

    return GenerationModule(size="tiny", frames=4, autoencoder=DiffusersAutoencoder(vae), **kwargs)


def test_a_checkpoint_records_its_vae_s_weights_not_only_its_path(vae_ckpt):
    """init_from refused the same VAE at another path ("differ: ['path']") and accepted other weights behind the
    recorded path, which sampling decoded with silently; the checkpoint's fingerprint decides now."""
    from mardini.autoencoders import DiffusersAutoencoder
    from mardini.pipeline import MarDiniPipeline

    vae, moved, ckpt = vae_ckpt
    meta = torch.load(ckpt, map_location="cpu", weights_only=False)["mardini"]
    assert meta["autoencoder_fingerprint"] == DiffusersAutoencoder(moved).fingerprint()
    _stage(moved, init_from=str(ckpt))  # the same weights elsewhere: accepted
    _stage(moved)._check_resumable(torch.load(ckpt, map_location="cpu", weights_only=False), str(ckpt))  # resumes
    shutil.rmtree(vae)
    _save_tiny_vae(vae, 1)  # other weights at the checkpoint's path
    with pytest.raises(ValueError, match=f"{ckpt} was trained with an autoencoder of other weights or config "
                                         f"\\(fingerprint {meta['autoencoder_fingerprint']}, from {vae} "):
        _stage(vae, init_from=str(ckpt))
    with pytest.raises(ValueError, match="other weights or config .*To go on, resume with the settings"):
        _stage(vae)._check_resumable(torch.load(ckpt, map_location="cpu", weights_only=False), str(ckpt))
    with pytest.warns(UserWarning, match="other weights or config .*Put the VAE the checkpoint was trained with"):
        MarDiniPipeline.from_checkpoint(ckpt)


def test_the_fingerprint_is_computed_once_per_autoencoder(monkeypatch):
    from mardini.autoencoders import FrameAutoencoder, SpaceToDepthAutoencoder

    calls = []
    digest = FrameAutoencoder._digest
    monkeypatch.setattr(FrameAutoencoder, "_digest", lambda self: calls.append(self) or digest(self))
    ae = SpaceToDepthAutoencoder(2)
    assert ae.fingerprint() == ae.fingerprint() and len(calls) == 1
    assert not ae.state_dict()  # the tiny configs' autoencoder: no weight to read, the digest is of its class alone


def test_a_half_precision_vae_is_another_autoencoder_for_a_cache_and_a_checkpoint(tmp_path):
    """A VAE whose weights are exact in bfloat16 had one fingerprint and one spec in bfloat16 and in float32 (the
    weights were digested as float32), so a cache it encoded in bfloat16 (latents about 1e-3 away) was accepted by
    a float32 stage; and dtype="bfloat16" (what --autoencoder-kwargs gives) loaded float32 weights, silently."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from mardini.autoencoders import DiffusersAutoencoder, build_autoencoder
    from mardini.data.latent_cache import cache_latents
    from mardini.data.testing import tiny_synthetic

    vae = str(tmp_path / "vae16")
    AutoencoderKL.from_pretrained(_save_tiny_vae(tmp_path / "vae", 0)).to(torch.bfloat16).float().save_pretrained(vae)
    full, half = DiffusersAutoencoder(vae), DiffusersAutoencoder(vae, dtype=torch.bfloat16)
    x = torch.rand(1, 2, 3, 16, 16) * 2 - 1  # (B, T, 3, H, W)
    assert not torch.equal(full.encode(x), half.encode(x))  # other latents
    assert full.fingerprint() != half.fingerprint() and "dtype" not in full.spec()["init_args"]
    again = build_autoencoder(half.spec())  # what sampling rebuilds from a checkpoint
    assert again.vae.dtype == torch.bfloat16 and again.fingerprint() == half.fingerprint()
    with pytest.raises(ValueError, match="dtype must be one of \\['bfloat16', 'float16', 'float32'\\]"):
        DiffusersAutoencoder(vae, dtype="half")
    synth = tiny_synthetic(tmp_path / "synth", train=2, val=2)
    cache_latents(str(synth / "val"), tmp_path / "cache", half, frames=4, fps=8, resolution=16, planner_resolution=8,
                  progress=False)
    shard = str(sorted((tmp_path / "cache").glob("*.tar"))[0])
    with pytest.raises(ValueError, match="other weights or config"):
        _stage(vae).check_latent_autoencoder(shard)


def test_a_bfloat16_cache_written_before_the_dtype_was_recorded_is_taken_as_bfloat16(tmp_path, monkeypatch):
    """A cache a bfloat16 VAE encoded before caches recorded the dtype has no "dtype" in its spec and the fingerprint
    of the weights' values alone; a bfloat16 stage, whose fingerprint digests the dtype too, refused it ("encoded by
    an autoencoder of other weights or config"). Its fingerprint shows the bfloat16 weights: it is accepted now, with
    a warning, and a float32 stage of the same VAE still refuses it. A cache without a fingerprint warns that it
    predates them and is compared by the VAE's path only."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from mardini.autoencoders import DiffusersAutoencoder
    from mardini.data import shard_checks
    from mardini.data.latent_cache import cache_latents
    from mardini.data.testing import tiny_synthetic
    from mardini.lit import GenerationModule

    vae, rounded = _save_tiny_vae(tmp_path / "vae", 0), str(tmp_path / "rounded")
    AutoencoderKL.from_pretrained(vae).to(torch.bfloat16).float().save_pretrained(rounded)
    half = DiffusersAutoencoder(vae, dtype=torch.bfloat16)
    half._spec_args.pop("dtype")  # what the cache recorded then: no dtype, and the bfloat16 weights' values as float32
    half.__dict__["_fingerprint"] = DiffusersAutoencoder(rounded).fingerprint()
    synth = tiny_synthetic(tmp_path / "synth", train=2, val=2)
    cache_latents(str(synth / "val"), tmp_path / "cache", half, frames=4, fps=8, resolution=16, planner_resolution=8,
                  progress=False)
    shard = str(sorted((tmp_path / "cache").glob("*.tar"))[0])
    stage = GenerationModule(size="tiny", frames=4, autoencoder=DiffusersAutoencoder(vae, dtype="bfloat16"))
    with pytest.warns(UserWarning, match="written before caches and checkpoints recorded the VAE's dtype.* taken as "
                                         "encoded in bfloat16"):
        stage.check_latent_autoencoder(shard)
    with pytest.raises(ValueError, match="other weights or config"):
        _stage(vae).check_latent_autoencoder(shard)  # float32: other latents
    unstamped = {**shard_checks.first_json(shard)["latent_cache"], "autoencoder_fingerprint": None}
    monkeypatch.setattr(shard_checks, "first_json", lambda path: {"latent_cache": unstamped})
    with pytest.warns(UserWarning, match=f"latent cache {shard} predates autoencoder fingerprints .*VAE's path "
                                         f"\\({vae}\\).*re-cache it with data/cache_latents.py"):
        stage.check_latent_autoencoder(shard)


def test_a_checkpoint_without_a_fingerprint_warns_that_it_is_compared_by_the_vae_s_path_only():
    """A checkpoint saved before fingerprints were recorded was compared by its VAE's path, silently."""
    from mardini.lit.checkpoints import check_same_latents

    spec = {"class_path": "mardini.autoencoders.diffusers_kl.DiffusersAutoencoder", "init_args": {"path": "/vae"}}
    with pytest.warns(UserWarning, match="old.ckpt predates autoencoder fingerprints .*path \\(/vae\\).*resume, or "
                                         "start the next stage from this one"):
        check_same_latents({"autoencoder_spec": spec}, spec, "old.ckpt", fingerprint=lambda: "sha256:0")
    pixels = {"class_path": "mardini.autoencoders.pixel.SpaceToDepthAutoencoder", "init_args": {"downsample": 2}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no weights at a path: nothing to warn about
        check_same_latents({"autoencoder_spec": pixels}, pixels, "old.ckpt", fingerprint=lambda: "sha256:0")


def test_a_bfloat16_checkpoint_saved_before_the_dtype_was_recorded_is_taken_as_bfloat16(vae_ckpt, tmp_path):
    """A checkpoint trained with a bfloat16 VAE before checkpoints recorded the dtype has no "dtype" in its spec and
    the fingerprint of the weights' values alone; a bfloat16 stage refused it (init_from and a resume: "was trained
    with an autoencoder of other weights or config"). Accepted now with a warning, as such a latent cache is; a
    float32 stage of the same VAE still refuses it."""
    from diffusers import AutoencoderKL

    from mardini.autoencoders import DiffusersAutoencoder
    from mardini.lit import GenerationModule

    _, vae, ckpt = vae_ckpt  # the copy of the checkpoint's VAE (the first test changes the one at its path)
    rounded = str(tmp_path / "rounded")
    AutoencoderKL.from_pretrained(vae).to(torch.bfloat16).float().save_pretrained(rounded)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["mardini"]["autoencoder_fingerprint"] = DiffusersAutoencoder(rounded).fingerprint()  # the old record
    assert "dtype" not in state["mardini"]["autoencoder_spec"]["init_args"]
    old = tmp_path / "old_bf16.ckpt"
    torch.save(state, old)
    half = lambda **kw: GenerationModule(  # noqa: E731
        size="tiny", frames=4, autoencoder=DiffusersAutoencoder(vae, dtype="bfloat16"), **kw)
    taken = f"{old} was written before caches and checkpoints recorded the VAE's dtype.* taken as encoded in bfloat16"
    with pytest.warns(UserWarning, match=taken):
        half(init_from=str(old))
    with pytest.warns(UserWarning, match=taken):
        half()._check_resumable(torch.load(old, map_location="cpu", weights_only=False), str(old))
    with pytest.raises(ValueError, match="other weights or config"):
        _stage(vae, init_from=str(old))  # float32: other latents


def test_sampling_a_checkpoint_without_a_fingerprint_warns_that_its_vae_is_not_checked(vae_ckpt, tmp_path):
    """Training warns on a checkpoint saved before fingerprints were recorded; sampling one loaded the VAE at its
    recorded path silently. It warns now, once, naming that path as what is not checked."""
    from mardini.pipeline import MarDiniPipeline

    vae, _, ckpt = vae_ckpt
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    del state["mardini"]["autoencoder_fingerprint"]
    old = tmp_path / "unfingerprinted.ckpt"
    torch.save(state, old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MarDiniPipeline.from_checkpoint(old)
    said = [str(w.message) for w in caught if "predates autoencoder fingerprints" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith(f"{old} predates autoencoder fingerprints") and f"recorded path ({vae}) is not checked" \
        in said[0], said[0]

"""Autoencoders: exact space-to-depth round trip and the diffusers AutoencoderKL adapter (tiny random VAE)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mardini.autoencoders import SpaceToDepthAutoencoder


def _video(b=2, t=3, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 3, h, w, generator=g) * 2 - 1  # (B, T, 3, H, W) in [-1, 1]


# --------------------------------------------------------------------------------------------------
# Space-to-depth (embedded default)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("f", [1, 2, 4])
def test_space_to_depth_exact_round_trip(f):
    ae = SpaceToDepthAutoencoder(downsample=f, scale=2.0, chunk_size=2)
    x = _video()
    z = ae.encode(x)
    assert z.shape == (2, 3, 3 * f * f, 8 // f, 12 // f) and ae.latent_channels == 3 * f * f
    torch.testing.assert_close(z[0, 1], 2.0 * F.pixel_unshuffle(x[0, 1], f), rtol=0, atol=0)  # scale applied
    assert torch.equal(ae.decode(z), x)


def test_space_to_depth_shift_and_scale_round_trip_and_travel_in_the_spec():
    from mardini.autoencoders.base import build_autoencoder

    ae = SpaceToDepthAutoencoder(downsample=2, scale=2.5, shift=-0.4)
    x = _video()
    z = ae.encode(x)
    torch.testing.assert_close(z[1, 2], 2.5 * (F.pixel_unshuffle(x[1, 2], 2) + 0.4))  # (pixels - shift) * scale
    torch.testing.assert_close(ae.decode(z), x)
    again = build_autoencoder(ae.spec())  # what a checkpoint stores
    assert (again.shift, again.scale) == (-0.4, 2.5)
    with pytest.raises(ValueError, match="scale must be > 0"):
        SpaceToDepthAutoencoder(scale=0.0)


def test_pixel_stats_normalise_the_latents_of_the_clips_they_were_measured_on(tmp_path):
    from mardini.autoencoders.pixel_stats import main
    from mardini.data.datamodule import first_clips
    from mardini.data.testing import tiny_synthetic

    root = tiny_synthetic(tmp_path / "synth")
    stats = main(["--shards", str(root / "train"), "--clips", "6", "--frames", "4", "--resolution", "8"])
    assert stats["clips"] == 6 and stats["shift"] == stats["mean"] and stats["mean"] < -0.05  # dark backgrounds
    video = first_clips(str(root / "train"), 6, frames=4, resolution=8, fps=8.0)  # (6, 4, 3, 8, 8): the same clips
    z = SpaceToDepthAutoencoder(2, scale=stats["scale"], shift=stats["shift"]).encode(video)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std(unbiased=False)) - 1) < 1e-4
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        main(["--shards", str(tmp_path / "nothing-*.tar"), "--clips", "2"])


def test_space_to_depth_shape_errors():
    ae = SpaceToDepthAutoencoder(downsample=4)
    with pytest.raises(ValueError, match="divisible"):
        ae.encode(_video(h=10))
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        ae.encode(_video()[:, :, :2])
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        ae.encode(_video()[0])
    with pytest.raises(ValueError, match="latents of shape"):
        ae.decode(torch.zeros(1, 2, 5, 2, 2))
    with pytest.raises(ValueError, match="downsample"):
        SpaceToDepthAutoencoder(downsample=0)


# --------------------------------------------------------------------------------------------------
# diffusers AutoencoderKL adapter
# --------------------------------------------------------------------------------------------------

SCALE, SHIFT = 0.7, 0.2


def _save_tiny_vae(folder, shift_factor=SHIFT):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)  # diffusers initialises weights from the global RNG
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=16, scaling_factor=SCALE, shift_factor=shift_factor,
    )
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("tiny_vae")
    return folder, _save_tiny_vae(folder)


def test_diffusers_adapter_shapes_and_normalisation(tiny_vae):
    from mardini.autoencoders import DiffusersAutoencoder

    folder, vae = tiny_vae
    ae = DiffusersAutoencoder(folder, chunk_size=4)
    assert (ae.latent_channels, ae.downsample, ae.scale, ae.shift) == (4, 2, SCALE, SHIFT)
    x = _video(h=8, w=12)
    z = ae.encode(x)
    assert z.shape == (2, 3, 4, 4, 6)
    with torch.no_grad():
        raw = vae.encode(x.flatten(0, 1)).latent_dist.mean  # (B*T, 4, 4, 6), the posterior mean
        torch.testing.assert_close(z.flatten(0, 1), (raw - SHIFT) * SCALE, atol=1e-5, rtol=1e-5)
        y = ae.decode(z)
        assert y.shape == x.shape and y.abs().max() <= 1
        ref = vae.decode(z.flatten(0, 1) / SCALE + SHIFT).sample.clamp(-1, 1)  # (B*T, 3, 8, 12)
        torch.testing.assert_close(y.flatten(0, 1), ref, atol=1e-5, rtol=1e-5)


def test_diffusers_adapter_chunking_is_invisible(tiny_vae):
    from mardini.autoencoders import DiffusersAutoencoder

    folder, _ = tiny_vae
    x = _video(t=5)
    one, whole = DiffusersAutoencoder(folder, chunk_size=1), DiffusersAutoencoder(folder, chunk_size=64)
    z = whole.encode(x)
    torch.testing.assert_close(one.encode(x), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.decode(z), whole.decode(z), atol=1e-5, rtol=1e-5)


def test_diffusers_adapter_posterior_sampling_is_seeded(tiny_vae):
    from mardini.autoencoders import DiffusersAutoencoder

    folder, _ = tiny_vae
    x = _video()
    mean = DiffusersAutoencoder(folder).encode(x)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return DiffusersAutoencoder(folder, sample_posterior=True, generator=g).encode(x)

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, mean)
    with pytest.raises(ValueError, match="generator"):
        DiffusersAutoencoder(folder, sample_posterior=True)


def test_diffusers_adapter_frozen_and_shift_none(tiny_vae, tmp_path):
    from mardini.autoencoders import DiffusersAutoencoder

    folder, _ = tiny_vae
    ae = DiffusersAutoencoder(folder).train()
    assert not ae.vae.training and not any(p.requires_grad for p in ae.parameters())
    _save_tiny_vae(tmp_path / "no_shift", shift_factor=None)
    assert DiffusersAutoencoder(tmp_path / "no_shift").shift == 0.0


def test_diffusers_adapter_missing_path(tmp_path):
    pytest.importorskip("diffusers")
    from mardini.autoencoders import DiffusersAutoencoder

    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        DiffusersAutoencoder(tmp_path / "nowhere")


def test_package_import_does_not_import_diffusers():
    code = "import sys, mardini.autoencoders as a; assert 'diffusers' not in sys.modules; print(a.__all__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _printed_autoencoder(out: str) -> dict:
    """The ``model.init_args.autoencoder`` line pixel_stats printed, parsed as YAML: ``{class_path, init_args}``."""
    import yaml

    line = next(ln for ln in out.splitlines() if ln.startswith("model.init_args.autoencoder: "))
    return yaml.safe_load(line.split(": ", 1)[1])


def test_diffusers_adapter_shift_and_scale_overrides_travel_in_the_spec(tiny_vae):
    from mardini.autoencoders import DiffusersAutoencoder, build_autoencoder
    from mardini.lit.checkpoints import latent_spec_differences

    folder, vae = tiny_vae
    ae = DiffusersAutoencoder(folder, shift=-0.5, scale=2.0)
    assert (ae.shift, ae.scale) == (-0.5, 2.0)
    x = _video(h=8, w=12)
    with torch.no_grad():
        raw = vae.encode(x.flatten(0, 1)).latent_dist.mean  # (B*T, 4, 4, 6)
    torch.testing.assert_close(ae.encode(x).flatten(0, 1), (raw + 0.5) * 2.0, atol=1e-5, rtol=1e-5)
    again = build_autoencoder(ae.spec())  # what a checkpoint or a latent cache stores
    assert (again.shift, again.scale) == (-0.5, 2.0)
    config = DiffusersAutoencoder(folder)
    assert config.spec()["init_args"]["shift"] == SHIFT and config.spec()["init_args"]["scale"] == SCALE
    assert latent_spec_differences(config.spec(), ae.spec()) == ["scale", "shift"]  # a stage refuses the other
    for bad in ({"scale": 0.0}, {"scale": float("nan")}, {"shift": float("inf")}):
        with pytest.raises(ValueError, match="must be a finite number"):
            DiffusersAutoencoder(folder, **bad)


def test_a_diffusers_spec_without_shift_and_scale_is_compared_by_its_vae_config_s_factors(tiny_vae, tmp_path):
    """A checkpoint or latent cache written before the spec recorded shift / scale normalised with its VAE config's
    factors: the same latents as a spec recording those, other latents than a spec recording others."""
    from mardini.autoencoders import DiffusersAutoencoder
    from mardini.lit.checkpoints import check_same_latents, latent_spec_differences

    folder, _ = tiny_vae
    old = {"class_path": "mardini.autoencoders.DiffusersAutoencoder",
           "init_args": {"path": str(folder), "subfolder": None, "chunk_size": 16}}
    config = DiffusersAutoencoder(folder).spec()  # records the config's SHIFT, SCALE
    other = DiffusersAutoencoder(folder, shift=0.06, scale=0.42).spec()
    assert latent_spec_differences(old, config) == latent_spec_differences(config, old) == []
    assert latent_spec_differences(old, other) == latent_spec_differences(other, old) == ["scale", "shift"]
    assert latent_spec_differences(old, DiffusersAutoencoder(folder, scale=0.42).spec()) == ["scale"]
    with pytest.raises(ValueError, match=r"differ: \['scale', 'shift'\]"):
        check_same_latents({"autoencoder_spec": old}, other, "old.ckpt")
    moved = lambda spec: {**spec, "init_args": {**spec["init_args"], "path": str(tmp_path / "moved")}}  # noqa: E731
    gone = moved(old)  # its VAE config cannot be read: recorded none vs the model's, a difference
    assert latent_spec_differences(gone, moved(config)) == ["scale", "shift"]
    assert latent_spec_differences(old, old) == [] and latent_spec_differences(gone, old) == ["path"]  # old vs old


def test_pixel_stats_measure_an_autoencoders_latents_and_print_its_config(tiny_vae, tmp_path, capsys):
    """--diffusers PATH: the shift / scale printed normalise the VAE's latents of the clips they were measured on."""
    from mardini.autoencoders.pixel_stats import main
    from mardini.data.datamodule import first_clips
    from mardini.data.testing import tiny_synthetic

    folder, _ = tiny_vae
    root = tiny_synthetic(tmp_path / "synth")
    args = ["--shards", str(root / "train"), "--clips", "6", "--frames", "4", "--resolution", "8"]
    stats = main([*args, "--diffusers", str(folder), "--batch-size", "4"])
    assert stats["clips"] == 6 and stats["shift"] == stats["mean"]
    printed = _printed_autoencoder(capsys.readouterr().out)
    assert printed["class_path"] == "mardini.autoencoders.diffusers_kl.DiffusersAutoencoder"
    assert printed["init_args"]["path"] == str(folder)
    from mardini.autoencoders import build_autoencoder

    ae = build_autoencoder(printed)  # the printed line, as a config would build it
    video = first_clips(str(root / "train"), 6, frames=4, resolution=8, fps=8.0)  # (6, 4, 3, 8, 8): the same clips
    z = ae.encode(video)  # (6, 4, 4, 4, 4)
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std(unbiased=False)) - 1) < 1e-3


def test_pixel_stats_keep_the_space_to_depth_downsample_in_the_printed_config(tmp_path, capsys):
    from mardini.autoencoders import build_autoencoder
    from mardini.autoencoders.pixel_stats import main
    from mardini.data.testing import tiny_synthetic

    root = tiny_synthetic(tmp_path / "synth")
    args = ["--shards", str(root / "train"), "--clips", "4", "--frames", "4", "--resolution", "8"]
    default = main(args)
    assert _printed_autoencoder(capsys.readouterr().out)["init_args"]["downsample"] == 2
    four = main([*args, "--autoencoder-kwargs", '{"downsample": 4}'])
    printed = _printed_autoencoder(capsys.readouterr().out)
    assert printed["init_args"]["downsample"] == 4 and build_autoencoder(printed).downsample == 4
    assert four == default  # the same pixels, rearranged otherwise


@pytest.mark.parametrize("kwargs, words", [
    ('{"downsampel": 4}', ["--autoencoder-kwargs", "unexpected keyword argument 'downsampel'"]),
    ('{"downsample": 3}', ["--resolution=8", "downsampling factor 3", "multiple of 3"]),
])
def test_pixel_stats_name_the_flag_of_a_wrong_autoencoder_argument_before_reading_clips(tmp_path, capsys, kwargs,
                                                                                        words):
    from mardini.autoencoders.pixel_stats import cli

    missing = tmp_path / "no-shards"  # refused before the shards are read: the argument is the first error
    args = ["--shards", str(missing), "--resolution", "8", "--autoencoder-kwargs", kwargs]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixel_stats: error:") and all(w in err for w in words), err

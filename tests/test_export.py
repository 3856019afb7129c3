"""Releasing a model (``python -m mardini.export``): the folder samples bit-identically to its checkpoint, EMA or
raw, and holds no path of the machine, optimiser state or run settings; a VAE's path is recorded by name."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from safetensors import safe_open

from mardini.export import export_pretrained, main, released_autoencoder_spec
from mardini.masking import interpolation_mask
from mardini.pipeline import MarDiniPipeline
from mardini.pipeline.pretrained import autoencoder_spec, load_pretrained
from pipeline_helpers import SIDE, WINDOW, ckpts, one_thread  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _samples(pipe: MarDiniPipeline, guidance: float = 1.0) -> torch.Tensor:
    video = torch.rand(2, WINDOW, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = interpolation_mask(WINDOW)[None].expand(2, -1)  # (2, T)
    return pipe.generate(video, mask, steps=3, guidance_scale=guidance, seed=5, progress=False)


@pytest.mark.parametrize("ema", [True, False])
def test_a_release_samples_exactly_as_its_checkpoint(ckpts, tmp_path, ema):
    out = tmp_path / "release"
    main([str(ckpts["joint"]), str(out)] + ([] if ema else ["--raw"]))
    released, original = MarDiniPipeline.from_pretrained(out), MarDiniPipeline.from_checkpoint(ckpts["joint"], ema=ema)
    assert torch.equal(_samples(released, 2.0), _samples(original, 2.0))
    other = MarDiniPipeline.from_checkpoint(ckpts["joint"], ema=not ema)  # the weights chosen matter
    assert not torch.equal(_samples(released, 2.0), _samples(other, 2.0))
    assert (released.window, released.resolution, released.planner_resolution) == (WINDOW, (SIDE, SIDE), 16)
    assert released.info["ema"] is ema
    with pytest.raises(ValueError, match=f"holds the {'ema' if ema else 'raw'} weights"):
        MarDiniPipeline.from_checkpoint(out, ema=not ema)  # sample.py --no-ema (or not) asked the other weights
    with pytest.raises(ValueError, match="records its window"):
        MarDiniPipeline.from_checkpoint(out, ema=ema, window=WINDOW)


def test_from_checkpoint_reads_a_release_folder_and_a_generation_model(ckpts, tmp_path):
    export_pretrained(ckpts["generation"], tmp_path / "gen")
    released = MarDiniPipeline.from_checkpoint(tmp_path / "gen")
    assert released.planner is None and released.kind == "generation"
    assert torch.equal(_samples(released), _samples(MarDiniPipeline.from_checkpoint(ckpts["generation"])))


def _strings(obj) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(obj, dict):
        return [*obj, *(s for v in obj.values() for s in _strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_a_release_holds_no_machine_paths_no_optimiser_and_only_the_sampling_networks(ckpts, tmp_path):
    out = tmp_path / "release"
    config = export_pretrained(ckpts["joint"], out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").stat().st_mode == (out / "config.json").stat().st_mode  # not 0600
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    strings = _strings(json.loads((out / "config.json").read_text(encoding="utf-8"))) + _strings(meta)
    assert not [s for s in strings if s.startswith("/") or str(tmp_path) in s or s == socket.gethostname()]
    assert not {"optimizer_states", "callbacks", "datamodule_hyper_parameters", "command"} & set(strings)
    assert {k.split(".")[0] for k in keys} == {"generator", "planner"}
    assert not any(k.startswith("planner.head.") for k in keys)  # the training-only head is left out
    assert config["weights"] == "ema" and config["kind"] == "joint" and config["window"] == WINDOW


def test_a_release_is_not_written_over_and_another_format_is_refused(ckpts, tmp_path):
    export_pretrained(ckpts["generation"], tmp_path)
    with pytest.raises(FileExistsError, match="already holds a release"):
        export_pretrained(ckpts["generation"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="export it again"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m mardini.export"):
        load_pretrained(tmp_path / "missing")


def test_a_vae_path_is_recorded_by_name_and_found_inside_the_release(tmp_path):
    spec = {"class_path": "mardini.autoencoders.diffusers_kl.DiffusersAutoencoder",
            "init_args": {"path": "/home/someone/models/sd-vae", "subfolder": None}}
    assert released_autoencoder_spec(spec, None)["init_args"]["path"] == "sd-vae"
    assert released_autoencoder_spec(spec, "vae")["init_args"]["path"] == "vae"
    config = {"autoencoder_spec": released_autoencoder_spec(spec, None)}
    assert autoencoder_spec(config, tmp_path, None)["init_args"]["path"] == "sd-vae"  # not there: as recorded
    (tmp_path / "sd-vae").mkdir()
    assert autoencoder_spec(config, tmp_path, None)["init_args"]["path"] == str(tmp_path / "sd-vae")
    assert autoencoder_spec(config, tmp_path, "/elsewhere")["init_args"]["path"] == "/elsewhere"


def test_a_moved_release_folder_samples_as_before(ckpts, tmp_path):
    """A release folder copied elsewhere samples as where it was written (nothing in it points back)."""
    export_pretrained(ckpts["joint"], tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    assert torch.equal(_samples(MarDiniPipeline.from_pretrained(tmp_path / "b")),
                       _samples(MarDiniPipeline.from_checkpoint(ckpts["joint"])))

"""``python -m mardini.sizing``: model-state bytes against a real module's, activations against direct measurements."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from mardini import sizing
from mardini.checkout import repo_path
from mardini.lit import MarDiniModule

TINY = repo_path("configs/tiny/05_joint_task.yaml")


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_model_state_bytes_are_those_a_tiny_joint_module_holds_after_one_adamw_step():
    init = yaml.safe_load(TINY.read_text(encoding="utf-8"))["model"]["init_args"]
    init = {k: v for k, v in init.items() if k not in ("init_from", "autoencoder")}
    module = MarDiniModule(**init)
    trained = [p for p in module.networks.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    sum(p.square().sum() for p in trained).backward()
    optimizer.step()
    held = (_tensor_bytes(trained) + _tensor_bytes(p.grad for p in trained)
            + _tensor_bytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step")
            + _tensor_bytes(module.ema.module.parameters()))
    params = sum(sizing.trained_parameters(sizing.read_shape(TINY)).values())
    assert params == sum(p.numel() for p in trained)
    assert sizing.state_bytes(params, "NO_SHARD", 1, 8) == held
    assert sizing.state_bytes(params, "FULL_SHARD", 256, 8) == held / 256
    assert sizing.state_bytes(params, "HYBRID_SHARD", 256, 8) == held / 8
    assert sizing.state_bytes(params, "SHARD_GRAD_OP", 256, 8) == held / 256
    block = sizing.largest_block(sizing.read_shape(TINY))
    assert block == sum(p.numel() for p in module.networks["generator"].blocks[0].parameters())  # 192 wide > 128
    assert sizing.bf16_weight_bytes(params, block, "NO_SHARD") == _tensor_bytes(p.bfloat16() for p in trained)
    assert sizing.bf16_weight_bytes(params, block, "FULL_SHARD") == 4 * block


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("network", ["planner", "generator"])
def test_activations_extrapolate_exactly_in_depth(network, checkpointing):
    shape = sizing.read_shape(TINY)
    pair = sizing.depth_pair(shape, 1, 1, network, checkpointing)
    assert sizing.measured(shape, 1, 1, 3, network, checkpointing) == sizing.at_depth(pair, 3, 1, 1) > pair[1] > pair[0]


@pytest.mark.parametrize("network", ["planner", "generator"])
def test_a_checkpointed_block_keeps_its_input_alone(network):
    shape = sizing.read_shape(TINY)
    plain, ckpt = (sizing.depth_pair(shape, 1, 1, network, c) for c in (False, True))
    cfg = sizing.build_trained(shape)[network].cfg
    tokens = shape.frames * (shape.latent_low if network == "planner" else shape.latent) ** 2 // cfg.patch_size ** 2
    assert ckpt[1] - ckpt[0] == tokens * cfg.dim * 4  # one fp32 (tokens, D) input per block
    assert plain[1] - plain[0] > 10 * (ckpt[1] - ckpt[0])


@pytest.mark.parametrize("network", ["planner", "generator"])
def test_activations_extrapolated_from_a_narrower_lower_resolution_forward_are_close_to_the_measured_ones(network):
    shape = sizing.read_shape(TINY)
    direct = sizing.measured(shape, 1, 1, 2, network)
    extrapolated = sizing.at_depth(sizing.depth_pair(shape, 2, 4, network, False), 2, 2, 4)
    print(f"{network}: measured {direct} bytes, extrapolated from width / 2, tokens / 4: {extrapolated}")
    assert abs(extrapolated - direct) <= 0.06 * direct  # 4.3 % (planner), 5.2 % (generator)


def test_the_command_prints_each_strategy_and_names_a_bad_divisor(capsys):
    text = sizing.main(["--config", str(TINY), "--world-size", "4", "--width-divisor", "2", "--tokens-divisor", "4"])
    assert "trained parameters: planner 341,168, generator 2,116,592 (total 2,457,760)" in text
    for strategy in sizing.STRATEGIES:
        assert strategy in text
    with pytest.raises(ValueError, match="--tokens-divisor 2 must be a square"):
        sizing.main(["--config", str(TINY), "--world-size", "4", "--tokens-divisor", "2"])
    with pytest.raises(ValueError, match="data.batch_size=8 is the GLOBAL batch and is smaller than the world size"):
        sizing.main(["--config", str(TINY)])  # the tiny stage's 8 clips on the default 256 GPUs


def test_both_networks_count_one_recomputed_block():
    acts = {"planner": {"plain": 10.0, "checkpointing": 4.0, "block": 3.0},
            "generator": {"plain": 20.0, "checkpointing": 7.0, "block": 5.0}}
    assert sizing.both_networks(acts) == (30.0, 1.0 + 2.0 + 5.0)


def test_peak_live_bytes_counts_what_is_held_at_once_and_leaves_the_kept_tensors_out():
    from mardini.sizing_autoencoder import peak_live_bytes

    x = torch.zeros(1000)  # 4000 bytes, kept

    def forward():
        a = x * 2
        b = a + 1
        del a  # freed: 4000 bytes held at most twice at once from here
        return b * 3

    assert peak_live_bytes(forward, [x]) == 8000
    assert peak_live_bytes(lambda: x.view(10, 100).sum(), [x]) == 4  # a view of a kept tensor is not new memory


def test_the_report_counts_the_frozen_vae_s_parameters_and_encode_temporaries(tmp_path):
    """The sizing left the frozen autoencoder out ("not counted: the frozen autoencoder"). Its parameters are those
    the stage's DiffusersAutoencoder holds, and its encode temporaries, extrapolated from a quarter of the pixels,
    are within 6 % of those of the real autoencoder's encode at the stage's resolution."""
    pytest.importorskip("diffusers")
    from test_data_latent_cache import _save_tiny_vae

    from mardini.autoencoders import DiffusersAutoencoder
    from mardini.sizing_autoencoder import autoencoder_size, peak_live_bytes

    vae = _save_tiny_vae(tmp_path / "vae", 0)
    spec = {"class_path": "mardini.autoencoders.diffusers_kl.DiffusersAutoencoder",
            "init_args": {"path": vae, "chunk_size": 4}}
    real = DiffusersAutoencoder(vae, chunk_size=4)
    x = torch.rand(4, 3, 32, 32) * 2 - 1  # (N, 3, H, W): one call's frames
    direct = peak_live_bytes(lambda: real.encode_frames(x), [*real.parameters(), *real.buffers(), x])
    size = autoencoder_size(spec, 32, 6, 4)  # 6 frames per GPU, 4 per call; measured at 16 px
    print(f"encode temporaries: measured {direct} bytes, extrapolated {size.encode_bytes}")
    assert size.params == sum(p.numel() for p in real.parameters()) and size.param_bytes == 4 * size.params
    assert size.frames_per_call == 4 and abs(size.encode_bytes - direct) <= 0.06 * direct
    shape = sizing.read_shape(TINY)
    text = "\n".join(sizing.autoencoder_lines(
        sizing.dataclasses.replace(shape, args={**shape.args, "autoencoder": spec}), 1, 4))
    assert f"frozen autoencoder (AutoencoderKL of {vae}/config.json), a full copy per GPU under every strategy: " \
           f"{size.params:,} parameters" in text and "encoding frames on the fly (no latent cache)" in text
    cached = "\n".join(sizing.autoencoder_lines(sizing.dataclasses.replace(shape, cached=True), 1, 4))
    assert "encodes nothing in training: the stage reads a latent cache" in cached


def _stage_without(tmp_path, key: str, value=...):
    """The tiny joint stage (its common.yaml merged in) as a config of its own, ``data.init_args.<key>`` left out
    (or set to ``value``)."""
    from mardini.configs_table import _load

    cfg = _load(TINY)
    del cfg["data"]["init_args"][key]
    if value is not ...:
        cfg["data"]["init_args"][key] = value
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_config_without_data_resolution_is_sized_at_the_data_module_s_default(tmp_path):
    """read_shape raised ``TypeError: int() argument must be ... not 'NoneType'`` on a config without
    data.init_args.resolution; the fit reads VideoDataModule's default there, and so does the sizing now."""
    from mardini.data.datamodule import VideoDataModule

    shape = sizing.read_shape(_stage_without(tmp_path, "resolution"))
    assert shape.resolution == VideoDataModule().resolution
    assert shape.latent == shape.resolution // 2  # tiny's space-to-depth downsample


@pytest.mark.parametrize(("value", "says"), [(None, "data.init_args.resolution is null; set it"),
                                             ([36, 64], "data.init_args.resolution [36, 64] is not one pixel side")])
def test_a_null_or_non_square_resolution_is_an_error_naming_the_key_and_the_fix(tmp_path, value, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        sizing.read_shape(_stage_without(tmp_path, "resolution", value))


def test_a_config_without_data_batch_size_is_sized_at_the_data_module_s_default(tmp_path):
    """read_shape read a missing data.init_args.batch_size as 1 clip, while the fit reads VideoDataModule's default
    there (8): the report sized a batch the fit never trains. It reads the default now, as for resolution."""
    from mardini.data.datamodule import VideoDataModule

    shape = sizing.read_shape(_stage_without(tmp_path, "batch_size"))
    assert shape.batch == VideoDataModule().batch_size

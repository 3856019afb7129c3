"""The EMA when a stage starts from an earlier stage's checkpoint: restarted by default, kept on request."""

from __future__ import annotations

import pytest
import torch

from mardini.lit import MarDiniModule
from mardini.testing import make_checkpoint


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ema") / "joint.ckpt", "joint", frames=5)  # raw != EMA


def _gap(module: MarDiniModule) -> float:
    """Largest difference between the EMA and the raw weights."""
    raw, ema = module.networks.state_dict(), module.ema.module.state_dict()
    return max((ema[k].float() - raw[k].float()).abs().max().item() for k in raw)


def _start(path, **kwargs) -> MarDiniModule:
    return MarDiniModule(size="tiny", frames=5, planner_resolution=16, init_from=str(path), ema_decay=0.99, **kwargs)


def test_by_default_the_first_update_restarts_the_ema_from_the_raw_weights(joint):
    module = _start(joint)
    assert _gap(module) > 0  # both were loaded
    module.update_ema()  # the stage's first update (step 0 -> timm's decay 0)
    assert _gap(module) == 0


def test_ema_keep_loaded_continues_the_loaded_ema_at_the_full_decay(joint):
    module = _start(joint, ema_keep_loaded=True)
    raw = {k: v.clone() for k, v in module.networks.state_dict().items()}
    loaded = {k: v.clone() for k, v in module.ema.module.state_dict().items()}
    module.update_ema()
    for k, v in module.ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.99 * loaded[k] + 0.01 * raw[k], atol=1e-6), k
    assert _gap(module) > 0


def test_ema_keep_loaded_without_a_loaded_ema_updates_by_step():
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16, ema_keep_loaded=True)
    with torch.no_grad():
        for p in module.networks.parameters():
            p.add_(0.5)
    module.update_ema()  # nothing was loaded: the usual first update copies the raw weights
    assert _gap(module) == 0


def test_ema_keep_loaded_keeps_only_the_loaded_networks_ema(tmp_path):
    gen = make_checkpoint(tmp_path / "generation.ckpt", "generation", frames=5)  # a generator only (raw != EMA)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16, generator_ckpt=str(gen), ema_decay=0.99,
                           ema_keep_loaded=True)
    raw = {k: v.clone() for k, v in module.networks.state_dict().items()}
    loaded = {k: v.clone() for k, v in module.ema.module.state_dict().items()}
    with torch.no_grad():
        for p in module.networks["planner"].parameters():
            p.add_(0.5)  # the planner's raw weights move away from its (never loaded) EMA
    planner_raw = {k: v.clone() for k, v in module.networks["planner"].state_dict().items()}
    module.update_ema()
    ema = module.ema.module
    for k, v in ema["generator"].state_dict().items():  # the loaded EMA goes on at the full decay
        if v.is_floating_point():
            assert torch.allclose(v, 0.99 * loaded[f"generator.{k}"] + 0.01 * raw[f"generator.{k}"], atol=1e-6), k
    for k, v in ema["planner"].state_dict().items():  # the other one by step: the first update copies the raw
        assert torch.equal(v, planner_raw[k]), k

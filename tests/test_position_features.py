"""``abs_pos``: fixed sin-cos (frame, row, column) features that let the tokens' values say where they are."""

from __future__ import annotations

import pytest
import torch

from mardini.models import build_generator, build_planner
from mardini.models.layers import position_features
from mardini.models.registry import GeneratorConfig, PlannerConfig
from pipeline_helpers import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_features_are_distinct_bounded_and_padded():
    feats = position_features((3, 4, 4), 128)  # 128 = 6 * 21 + 2 padding dims
    assert feats.shape == (48, 128)
    assert feats.abs().max() <= 1
    assert torch.equal(feats[:, 126:], torch.zeros(48, 2))
    assert torch.cdist(feats, feats).add(torch.eye(48) * 10).min() > 0.1  # every token its own code
    with pytest.raises(ValueError, match="dim >= 6"):
        position_features((1, 2, 2), 5)


def test_a_coarse_grid_token_is_nearest_to_the_fine_tokens_it_covers():
    """The planner's 4x4 grid and the generator's 8x8 grid over the same frame share one coordinate system."""
    coarse = position_features((1, 4, 4), 96).view(4, 4, 96)
    fine = position_features((1, 8, 8), 96).view(8, 8, 96)
    for i in range(4):
        for j in range(4):
            dist = (fine - coarse[i, j]).norm(dim=-1)  # (8, 8)
            covered = dist[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            outside = dist.clone()
            outside[2 * i:2 * i + 2, 2 * j:2 * j + 2] = float("inf")
            assert covered.max() < outside.min()


def _spread(x: torch.Tensor) -> float:
    """How much the output tokens differ from each other. ``x (..., N, D)``"""
    return float((x - x.mean(dim=-2, keepdim=True)).abs().max())


@pytest.mark.parametrize("abs_pos", [False, True])
def test_planner_tokens_of_a_uniform_clip_differ_only_with_abs_pos(abs_pos):
    """RoPE alone changes attention weights, never what is read: where every token a token can attend to is alike
    (a uniform clip, all frames given), every output token is the same. With ``abs_pos`` tokens know where they are."""
    torch.manual_seed(0)
    planner = build_planner("tiny", in_channels=12, abs_pos=abs_pos).double().eval()
    z = torch.ones(1, 3, 12, 4, 4, dtype=torch.float64)  # (B, T, C, h, w): a uniform clip
    mask = torch.zeros(1, 3, dtype=torch.bool)
    with torch.no_grad():
        plan = planner(z, mask)  # (1, 3, 16, 128)
    assert (_spread(plan.reshape(-1, plan.shape[-1])) > 1e-3) == abs_pos


@pytest.mark.parametrize("abs_pos", [False, True])
def test_generator_tokens_of_a_uniform_clip_differ_only_with_abs_pos(abs_pos):
    torch.manual_seed(0)
    gen = build_generator("tiny", in_channels=12, abs_pos=abs_pos, attention="st").double().eval()
    with torch.no_grad():  # perturb so adaLN-Zero layers do not hide any path
        for p in gen.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.ones(1, 3, 12, 4, 4, dtype=torch.float64)
    mask = torch.zeros(1, 3, dtype=torch.bool)
    with torch.no_grad():
        v = gen(z, torch.tensor([0.5], dtype=torch.float64), None, mask)  # (1, 3, 12, 4, 4)
    pixels = v.flatten(3).transpose(2, 3).reshape(-1, 12)  # every latent pixel's 12 channels
    assert (_spread(pixels) > 1e-3) == abs_pos


@pytest.mark.parametrize("cls", [PlannerConfig, GeneratorConfig])
def test_abs_pos_must_be_a_bool(cls):
    extra = {"plan_dim": 8} if cls is GeneratorConfig else {}
    with pytest.raises(ValueError, match="abs_pos must be true or false"):
        cls(dim=48, depth=1, heads=2, mlp_hidden=32, abs_pos="yes", **extra)

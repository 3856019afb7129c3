"""Planning model: masked frames are invisible, identity scopes, projection head, checkpointing."""

from __future__ import annotations

import pytest
import torch

from mardini.models import build_planner

MASK = torch.tensor([[False, True, True, False], [True, False, True, True]])  # (B, T), True = generate


def _planner(**kw):
    torch.manual_seed(0)
    return build_planner("tiny", **kw).double()


def _latents(seed=0, b=2, t=4, size=8):
    return torch.randn(b, t, 12, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_plan_shape_and_projection_head():
    planner = _planner(patch_size=2)
    z = _latents()
    plan = planner(z, MASK)
    assert plan.shape == (2, 4, 16, 128)  # N_low = (8/2)^2
    assert planner.project(plan, size=(8, 8)).shape == z.shape
    planner.drop_head()
    assert "head.weight" not in planner.state_dict()
    with pytest.raises(RuntimeError, match="dropped"):
        planner.project(plan, size=(8, 8))


@pytest.mark.parametrize("scope", ["frame", "token"])
def test_plan_ignores_masked_frame_content(scope):
    planner = _planner(identity_scope=scope)
    z = _latents(0)
    z2 = z.clone()
    z2[MASK] = _latents(1)[MASK] * 10
    z3 = z.clone()
    z3[MASK] = float("nan")
    plan = planner(z, MASK)
    torch.testing.assert_close(planner(z2, MASK), plan, rtol=0, atol=0)
    torch.testing.assert_close(planner(z3, MASK), plan, rtol=0, atol=0)
    z4 = z.clone()
    z4[~MASK] += 1.0  # reference content does matter, for every frame's plan
    assert not torch.allclose(planner(z4, MASK)[MASK], plan[MASK])


def test_reference_plan_sees_only_its_own_frame_with_frame_scope():
    planner = _planner(identity_scope="frame")
    z = _latents(0)
    plan = planner(z, MASK)
    z2 = z.clone()
    z2[0, 3] += 1.0  # another reference frame of clip 0
    plan2 = planner(z2, MASK)
    torch.testing.assert_close(plan2[0, 0], plan[0, 0], rtol=0, atol=0)  # reference frame 0 unchanged
    torch.testing.assert_close(plan2[1], plan[1], rtol=0, atol=0)  # the other clip unchanged
    assert not torch.allclose(plan2[0, 1], plan[0, 1])  # masked frames read all references
    z3 = z.clone()
    z3[0, 0, :, 0, 0] += 1.0  # one token of reference frame 0: its other tokens change too (scope = frame)
    assert not torch.allclose(planner(z3, MASK)[0, 0, 1:], plan[0, 0, 1:])


def test_reference_plan_token_scope_is_per_token():
    planner = _planner(identity_scope="token")
    z = _latents(0)
    plan = planner(z, MASK)
    z3 = z.clone()
    z3[0, 0, :, 0, 0] += 1.0  # only token 0 of reference frame 0 may change
    plan3 = planner(z3, MASK)
    torch.testing.assert_close(plan3[0, 0, 1:], plan[0, 0, 1:], rtol=0, atol=0)
    assert not torch.allclose(plan3[0, 0, 0], plan[0, 0, 0])


def test_checkpointing_matches_plain_forward_and_backward():
    z = _latents(0).float()
    outs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        planner = build_planner("tiny", checkpointing=ckpt)
        planner.project(planner(z, MASK), (8, 8)).square().mean().backward()
        outs.append([p.grad.clone() for p in planner.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    planner = _planner()
    with pytest.raises(ValueError, match="in_channels"):
        planner(torch.zeros(2, 4, 3, 8, 8, dtype=torch.float64), MASK)
    with pytest.raises(ValueError, match="mask must be a"):
        planner(_latents(), MASK.long())
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        _planner(patch_size=3)(_latents(), MASK)


def test_masked_frames_enter_the_blocks_as_the_mask_token():
    planner = _planner()
    with torch.no_grad():  # a non-zero embedding bias, so "replaced" differs from "added to zeros"
        planner.embed.bias.normal_(generator=torch.Generator().manual_seed(0))
    seen = {}

    def grab(module, args):  # returns None: inputs unchanged
        seen["x"] = args[0].detach()

    planner.blocks[0].register_forward_pre_hook(grab)
    planner(_latents(0), MASK)
    x = seen["x"].view(2, 4, 64, 128)  # (B, T, N, D)
    assert torch.equal(x[MASK], planner.mask_token.detach().expand_as(x[MASK]))
    assert not torch.equal(x[~MASK], planner.mask_token.detach().expand_as(x[~MASK]))

"""Generation model: reference frames are untouched by noisy frames, ST/T switch, plans, bf16 training step."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from mardini.models.generator import plan_grid
from mardini.models import build_generator, build_planner

MASK = torch.tensor([[False, True, True, False], [True, False, True, True]])  # (B, T), True = generate


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised layers (adaLN-Zero) do not hide any path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _generator(**kw):
    torch.manual_seed(0)
    return _randomize(build_generator("tiny", **kw).double())


def _inputs(seed=0, b=2, t=4, size=8, tokens=16):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, 12, size, size, generator=g, dtype=torch.float64)
    plan = torch.randn(b, t, tokens, 128, generator=g, dtype=torch.float64)
    return z, torch.rand(b, generator=g, dtype=torch.float64), plan


def test_output_shape_and_zero_init():
    gen = build_generator("tiny")
    z, t, plan = (x.float() for x in _inputs())
    v = gen(z, t, plan, MASK)
    assert v.shape == z.shape and torch.all(v == 0)  # adaLN-Zero: the final layer starts at zero
    assert gen(z, t, None, MASK).shape == z.shape


def test_the_null_plan_fits_frames_of_any_aspect_ratio():
    assert plan_grid(1, (8, 2)) == (1, 1) and plan_grid(1, (10, 4)) == (1, 1)  # one token per frame
    gen = build_generator("tiny")
    z = torch.randn(2, 4, 12, 16, 4)  # latents of tall frames: 8 x 2 tokens per frame at patch 2
    assert gen(z, torch.rand(2), None, MASK).shape == z.shape


@pytest.mark.parametrize("mode", ["st", "t"])
@pytest.mark.parametrize("cross", ["frame", "all"])
def test_reference_outputs_do_not_depend_on_noisy_frames_or_t(mode, cross):
    gen = _generator(attention=mode, cross_attention=cross)
    z, t, plan = _inputs(0)
    v = gen(z, t, plan, MASK)
    z2 = z.clone()
    z2[MASK] = _inputs(1)[0][MASK]
    v2 = gen(z2, t + 0.3, plan, MASK)
    torch.testing.assert_close(v2[~MASK], v[~MASK], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(v2[MASK], v[MASK])


def test_per_frame_t_shapes_agree_and_references_ignore_t():
    gen = _generator()
    z, t, plan = _inputs(0)
    v = gen(z, t, plan, MASK)
    t_bt = torch.where(MASK, t[:, None], torch.full_like(MASK, 0.7, dtype=t.dtype))  # refs' t is ignored
    torch.testing.assert_close(gen(z, t_bt, plan, MASK), v)


def test_set_attention_changes_interactions_not_parameters():
    gen = _generator()
    state = {k: x.clone() for k, x in gen.state_dict().items()}
    z, t, plan = _inputs(0)
    v_st = gen(z, t, plan, MASK)
    gen.set_attention("t")
    assert gen.cfg.attention == "t"
    assert gen.state_dict().keys() == state.keys()
    assert all(torch.equal(gen.state_dict()[k], x) for k, x in state.items())
    v_t = gen(z, t, plan, MASK)
    assert not torch.allclose(v_t[MASK], v_st[MASK])
    with pytest.raises(ValueError, match="'st' or 't'"):
        gen.set_attention("s")
    # with one token per frame, temporal-only and spatio-temporal attention are the same thing
    z1, t1, plan1 = _inputs(2, size=1, tokens=1)
    gen.set_attention("st")
    v1 = gen(z1, t1, plan1, MASK)
    gen.set_attention("t")
    torch.testing.assert_close(gen(z1, t1, plan1, MASK), v1)


@pytest.mark.parametrize("mode", ["st", "t"])
def test_temporal_layer_token_interactions(mode):
    """Which tokens reach generated token (frame 1, position 0) through the temporal layer."""
    gen = _generator()
    block = gen.blocks[0]
    b, t, n = 2, 4, 16
    x = torch.randn(b, t, n, 96, dtype=torch.float64, requires_grad=True)
    rope = gen.rope((t, 4, 4), x.device)
    out = block.temporal_attn(x, MASK, rope, mode)
    (grad,) = torch.autograd.grad(out[0, 1, 0].sum(), x, retain_graph=True)
    reach = grad.abs().sum(-1) > 0  # (B, T, N)
    assert not reach[1].any()  # never another clip
    assert reach[0, :, 0].all()  # same position, every frame
    other_positions = reach[0, :, 1:]
    assert other_positions.any() if mode == "st" else not other_positions.any()
    # reference token (frame 0, position 3) of clip 0 sees only itself, in both modes
    (grad_ref,) = torch.autograd.grad(out[0, 0, 3].sum(), x)
    reach_ref = grad_ref.abs().sum(-1) > 0
    assert reach_ref[0, 0, 3] and reach_ref.sum() == 1


@pytest.mark.parametrize("cross", ["frame", "all"])
def test_cross_attention_reads_own_frame_plan_or_all(cross):
    gen = _generator(cross_attention=cross)
    x = torch.randn(2, 4, 16, 96, dtype=torch.float64)
    plan = torch.randn(2, 4, 5, 128, dtype=torch.float64, requires_grad=True)
    out = gen.blocks[0].cross_attn(x, plan)
    (grad,) = torch.autograd.grad(out[0, 2].sum(), plan)
    reach = grad.abs().sum((-1, -2)) > 0  # (B, T)
    assert reach[0, 2] and not reach[1].any()
    assert reach[0].sum() == (1 if cross == "frame" else 4)


def test_null_plan_is_one_learned_vector_and_default():
    gen = _generator()
    z, t, _ = _inputs(0)
    null = gen.null_plan(2, 4, 4)
    assert null.shape == (2, 4, 4, 128) and torch.equal(null[1, 3, 3], gen.null_plan_token)
    torch.testing.assert_close(gen(z, t, None, MASK), gen(z, t, null, MASK))


def test_plan_reaches_generated_frames():
    gen = _generator()
    z, t, plan = _inputs(0)
    plan.requires_grad_(True)
    gen(z, t, plan, MASK)[MASK].square().sum().backward()
    assert plan.grad.abs().sum() > 0


def test_the_plan_enters_through_cross_attention_and_the_mlp_modulation_only():
    """PAPER.md §2.4: the timestep alone modulates the spatial attention (and the final layer); the plan reaches the
    generator through cross-attention and through the MLP's modulation, each on its own."""
    gen = _generator()
    z, t, plan = _inputs(0)
    seen: dict[str, list] = {}
    for name, mod in [("out", gen.mod_out)] + [(f"{k}{i}", getattr(b, f"mod_{k}")) for i, b in enumerate(gen.blocks)
                                              for k in "sm"]:
        mod.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0]))
    other = _inputs(1)[2]
    v, v_other = gen(z, t, plan, MASK), gen(z, t, other, MASK)
    for name, (a, b) in seen.items():  # conditioning vectors (B, T, 1, D) of the two plans
        assert torch.equal(a, b) != name.startswith("m"), name  # only the MLP's modulation reads the plan
    assert not torch.allclose(v[MASK], v_other[MASK])
    # cross-attention alone: the plan's tokens shuffled within each frame keep its mean (the modulation's input)
    shuffled = plan[:, :, torch.randperm(plan.shape[2], generator=torch.Generator().manual_seed(0))]
    assert not torch.allclose(gen(z, t, shuffled, MASK)[MASK], v[MASK])
    # the modulation alone: with every cross-attention output cut, another plan still changes the generated frames
    with torch.no_grad():
        for block in gen.blocks:
            block.cross.proj.weight.zero_()
            block.cross.proj.bias.zero_()
    assert not torch.allclose(gen(z, t, plan, MASK)[MASK], gen(z, t, other, MASK)[MASK])


def test_spatial_layers_are_per_frame_and_not_identity_masked():
    """Identity attention is in the temporal/ST layers only (PAPER.md §2.5): in the spatial layer a reference token
    reads every token of its own frame, and no token reads another frame."""
    gen = _generator()
    b, t, n = 2, 4, 16
    x = torch.randn(b, t, n, 96, dtype=torch.float64, requires_grad=True)
    c_t = gen.t_embed(torch.rand(b, t, dtype=torch.float64))[:, :, None]  # (B, T, 1, D)
    out = gen.blocks[0].spatial_attn(x, c_t, gen.rope((t, 4, 4), x.device))  # (B, T, N, D)
    for frame in (0, 1):  # clip 0: frame 0 is a reference, frame 1 generated (MASK)
        (grad,) = torch.autograd.grad(out[0, frame, 3].sum(), x, retain_graph=True)
        reach = grad.abs().sum(-1) > 0  # (B, T, N)
        assert reach[0, frame].all() and reach.sum() == n, frame


def test_bf16_autocast_joint_forward_backward_reaches_planner():
    torch.manual_seed(0)
    planner, gen = build_planner("tiny"), build_generator("tiny", checkpointing=True)
    _randomize(gen)
    g = torch.Generator().manual_seed(0)
    z_low = torch.randn(2, 4, 12, 8, 8, generator=g)
    z_high = torch.randn(2, 4, 12, 16, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = planner(z_low, MASK)  # (B, T, 64, 128)
        v = gen(z_high, torch.rand(2, generator=g), plan, MASK)
        assert v.dtype == torch.bfloat16
        loss = v.float()[MASK].square().mean()
    loss.backward()
    for name, net in (("planner", planner), ("generator", gen)):
        grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(x).all() for x in grads), name
    assert planner.blocks[0].attn.qkv_proj.weight.grad.abs().sum() > 0
    assert planner.head.weight.grad is None  # the warm-up head is not on the joint path


def test_checkpointing_matches_plain():
    z, t, plan = (x.float() for x in _inputs(0))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        gen = _randomize(build_generator("tiny", checkpointing=ckpt))
        gen(z, t, plan, MASK).square().mean().backward()
        grads.append([p.grad for p in gen.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_spatial_sizes_of_plan_and_latents_may_differ():
    gen = _generator(patch_size=2)
    z, t, plan = _inputs(0, size=8, tokens=9)  # 16 high-res tokens per frame, 9 plan tokens
    assert gen(z, t, plan, MASK).shape == z.shape


def test_bad_inputs():
    gen = _generator()
    z, t, plan = _inputs(0)
    with pytest.raises(ValueError, match="in_channels"):
        gen(z[:, :, :3], t, plan, MASK)
    with pytest.raises(ValueError, match="mask must be a"):
        gen(z, t, plan, MASK[:, :3])
    with pytest.raises(ValueError, match="t must have shape"):
        gen(z, t[:1], plan, MASK)
    with pytest.raises(ValueError, match="plan_dim must equal"):
        gen(z, t, plan[..., :64], MASK)
    with pytest.raises(ValueError, match="plan must be"):
        gen(z, t, rearrange(plan, "b t n c -> b (t n) c"), MASK)


# --------------------------------------------------------------------------------------------------
# Cross-attention positions: a generator token can find the plan token that covers its area
# --------------------------------------------------------------------------------------------------


def test_plan_grid_reads_the_aspect_ratio_and_rejects_others():
    assert plan_grid(16, (8, 8)) == (4, 4)
    assert plan_grid(8, (4, 8)) == (2, 4)
    assert plan_grid(1, (8, 8)) == (1, 1)  # the null plan
    with pytest.raises(ValueError, match="aspect ratio"):
        plan_grid(12, (8, 8))


@pytest.mark.parametrize("cross_attention", ["frame", "all"])
def test_cross_rope_makes_the_plan_a_map_not_a_bag(cross_attention):
    """With cross-attention RoPE, moving plan tokens around changes the output; without it, it cannot."""
    z, t, plan = _inputs(0)  # 8 x 8 generator tokens, 4 x 4 plan tokens per frame
    perm = torch.randperm(plan.shape[2], generator=torch.Generator().manual_seed(3))
    for cross_rope in (True, False):
        gen = _generator(cross_rope=cross_rope, cross_attention=cross_attention)
        v, v_perm = gen(z, t, plan, MASK), gen(z, t, plan[:, :, perm], MASK)
        if cross_rope:
            assert not torch.allclose(v[MASK], v_perm[MASK])
        else:  # no positions: attention over a permuted set of keys/values gives the same result
            torch.testing.assert_close(v, v_perm)


def test_cross_rope_key_positions_are_scaled_onto_the_generator_grid():
    gen = _generator()
    (q_sin, q_cos), (k_sin, k_cos) = gen.cross_rope(4, (8, 8), 16, torch.device("cpu"))  # plan 4 x 4
    assert q_sin.shape == (64, gen.cfg.head_dim) and k_sin.shape == (16, gen.cfg.head_dim)
    # plan token (row 1, col 2) covers generator rows 2-3, columns 4-5: it sits at their centre (2.5, 4.5)
    expected = gen.rope._build((1, 8, 8), torch.device("cpu"))  # integer positions, for the band layout
    freqs, b = gen.rope.freqs, gen.rope.bands
    angles = torch.cat([0.0 * freqs, 2.5 * freqs, 4.5 * freqs]).repeat_interleave(2)  # (6 * bands,)
    torch.testing.assert_close(k_sin[1 * 4 + 2, : 6 * b], angles.sin())
    torch.testing.assert_close(k_cos[1 * 4 + 2, : 6 * b], angles.cos())
    assert expected[0].shape == q_sin.shape
    assert _generator(cross_rope=False).cross_rope(4, (8, 8), 16, torch.device("cpu")) is None


@pytest.mark.parametrize("grid", ["centre", "corner"])
@pytest.mark.parametrize("ratio", [1, 2, 3, 4])
def test_cross_rope_each_generator_token_is_nearest_to_the_plan_token_covering_it(ratio, grid):
    """Identical content on both sides: RoPE alone must rank a generator token's own plan token first.

    With plan positions at the covered block's first cell (``corner``, ``i * ratio``), the last cells of a block are
    as near to (ratio 2) or nearer to (ratio 4: 512 -> 1024 px over a 256 px planner) the next block's plan token:
    some tokens rank another plan token first at every ratio above 1, none with ``centre``."""
    from mardini.models.generator import Generator
    from mardini.models.registry import generator_config
    from mardini.models.rope import apply_rope

    gen = Generator(generator_config("mardini-s/t", depth=1, dim=256, heads=4, mlp_hidden=256, plan_dim=64,
                                     cross_rope_grid=grid))
    side_p = 8
    side_g = side_p * ratio
    (q_tab, k_tab) = gen.cross_rope(1, (side_g, side_g), side_p * side_p, torch.device("cpu"))
    vec = torch.randn(gen.cfg.head_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = apply_rope(vec.expand(1, 1, side_g * side_g, -1).contiguous(), *(t.double() for t in q_tab))[0, 0]
    k = apply_rope(vec.expand(1, 1, side_p * side_p, -1).contiguous(), *(t.double() for t in k_tab))[0, 0]
    scores = q @ k.T  # (side_g^2, side_p^2)
    rows, cols = torch.meshgrid(torch.arange(side_g), torch.arange(side_g), indexing="ij")
    own = ((rows // ratio) * side_p + cols // ratio).flatten()  # (side_g^2,) the covering plan token
    own_score = scores.gather(1, own[:, None]).squeeze(1)  # (side_g^2,)
    others = scores.scatter(1, own[:, None], float("-inf")).max(dim=1).values  # (side_g^2,)
    astray = int((own_score <= others + 1e-9).sum())  # tokens that rank another plan token first
    assert astray == 0 if grid == "centre" or ratio == 1 else astray > 0, f"{astray} tokens prefer another"


def test_rope_tables_of_an_unscaled_grid_are_timms():
    """The centre placement only changes scaled (cross-attention key) tables; self-attention tables are timm's."""
    from timm.layers import build_rotary_pos_embed

    gen = _generator()
    sin, cos = gen.rope((3, 4, 5), torch.device("cpu"))
    b = gen.rope.bands
    t_sin, t_cos = build_rotary_pos_embed([3, 4, 5], bands=gen.rope.freqs, dim=4 * b, in_pixels=False)
    torch.testing.assert_close(sin[:, : 6 * b], t_sin)
    torch.testing.assert_close(cos[:, : 6 * b], t_cos)
    # a scale onto the same grid is no scale: the same tables
    s2, c2 = gen.rope._build((3, 4, 5), torch.device("cpu"), scale_to=(3, 4, 5))
    torch.testing.assert_close(s2, sin)
    torch.testing.assert_close(c2, cos)


def test_the_corner_placement_of_older_checkpoints_is_kept_on_request():
    """``cross_rope_grid: corner`` (checkpoints before the setting): plan token i at the covered block's first cell."""
    gen = _generator(cross_rope_grid="corner")
    (q_sin, q_cos), (k_sin, k_cos) = gen.cross_rope(4, (8, 8), 16, torch.device("cpu"))  # plan 4 x 4
    torch.testing.assert_close(k_sin[1 * 4 + 2], q_sin[2 * 8 + 4])  # plan (1, 2) at generator (2, 4)
    torch.testing.assert_close(k_cos[1 * 4 + 2], q_cos[2 * 8 + 4])
    centre = _generator().cross_rope(4, (8, 8), 16, torch.device("cpu"))[1][0]
    assert not torch.allclose(centre, k_sin)
    with pytest.raises(ValueError, match="cross_rope_grid must be 'centre' or 'corner'"):
        _generator(cross_rope_grid="middle")

"""Self-conditioning (``generator.self_cond``): the generator also reads the previous step's x0 estimate."""

from __future__ import annotations

import pytest
import torch

from mardini.diffusion.schedule import CosineSchedule
from mardini.lit import GenerationModule
from mardini.models import build_generator
from mardini.models.generator import ReferenceCache
from mardini.pipeline import MarDiniPipeline
from mardini.pipeline.denoise import make_denoise_fn
from pipeline_helpers import make_checkpoint, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = torch.tensor([[False, True, True, False, True], [True, False, True, True, False]])  # (B, T), True = generate


def _generator(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    gen = build_generator("tiny", in_channels=12, self_cond=True, **kw).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb so adaLN-Zero layers do not hide any path
        for p in gen.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return gen


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_estimate_reaches_generated_frames_only():
    gen = _generator()
    z, plan, t = _rand(2, 5, 12, 4, 4, seed=0), _rand(2, 5, 16, 128, seed=1), torch.full((2,), 0.6, dtype=torch.float64)
    with torch.no_grad():
        none = gen(z, t, plan, MASK)
        zeros = gen(z, t, plan, MASK, self_cond=torch.zeros_like(z))
        est = gen(z, t, plan, MASK, self_cond=_rand(2, 5, 12, 4, 4, seed=2))
    torch.testing.assert_close(none, zeros, rtol=0, atol=0)  # no estimate = zeros (the first step)
    ref = ~MASK
    torch.testing.assert_close(est[ref], none[ref], rtol=0, atol=1e-12)  # references read their own latents
    assert (est[MASK] - none[MASK]).abs().max() > 1e-3


def test_cached_steps_equal_full_forwards_with_estimates():
    gen = _generator(attention="st")
    z, plan = _rand(2, 5, 12, 4, 4, seed=0), _rand(2, 5, 16, 128, seed=1)
    cache = ReferenceCache()
    with torch.no_grad():
        for step, t in enumerate((1.0, 0.6, 0.2)):
            zs = torch.where(MASK[:, :, None, None, None], _rand(2, 5, 12, 4, 4, seed=10 + step), z)
            est = None if step == 0 else _rand(2, 5, 12, 4, 4, seed=20 + step)
            tt = torch.full((2,), t, dtype=torch.float64)
            torch.testing.assert_close(gen(zs, tt, plan, MASK, cache=cache, self_cond=est),
                                       gen(zs, tt, plan, MASK, self_cond=est), rtol=0, atol=1e-12)
    assert cache.calls == 2


def test_clear_errors():
    plain = build_generator("tiny", in_channels=12)
    z, t = torch.zeros(2, 5, 12, 4, 4), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="without self-conditioning"):
        plain(z, t, None, MASK, self_cond=z)
    gen = build_generator("tiny", in_channels=12, self_cond=True)
    with pytest.raises(ValueError, match="self_cond must have the latents' shape"):
        gen(z, t, None, MASK, self_cond=z[:, :2])
    with pytest.raises(ValueError, match="needs the schedule"):
        make_denoise_fn(gen, None, MASK)
    with pytest.raises(ValueError, match="self_cond=.yes. must be true or false"):
        build_generator("tiny", self_cond="yes")


def test_training_feeds_a_gradient_free_estimate_to_about_half_the_clips():
    module = GenerationModule(size="tiny", frames=5, generator={"self_cond": True}, lr=1e-3)
    net = module.networks["generator"]
    calls = []
    net.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        (args[0].clone(), args[1].clone(), kwargs.get("self_cond"), torch.is_grad_enabled(), out.detach())),
        with_kwargs=True)
    z = torch.randn(16, 5, 12, 8, 8)
    mask = MASK[:1].expand(16, -1)
    loss = module.diffusion_loss(z, None, mask, torch.Generator().manual_seed(0))  # (B,)
    (first_z, first_t, first_est, first_grad, first_v), (second_z, _, est, second_grad, _) = calls
    assert first_est is None and not first_grad  # the estimate's forward: no gradient, no estimate of its own
    assert second_grad and second_z.shape[0] == 16 and not est.requires_grad
    chosen = est.flatten(1).abs().amax(dim=1) > 0  # (B,) clips that received an estimate
    assert int(chosen.sum()) == first_z.shape[0] and 3 <= first_z.shape[0] <= 13  # half in expectation; others zeros
    torch.testing.assert_close(first_z, second_z[chosen], rtol=0, atol=0)  # the same noised clips
    expected = module.schedule.predict_x0_eps(first_z, first_v, first_t)[0]  # the first forward's x0 estimate
    torch.testing.assert_close(est[chosen], expected, rtol=0, atol=1e-6)
    loss.mean().backward()
    assert net.embed.weight.grad is not None


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, one_thread):
    path = make_checkpoint(tmp_path_factory.mktemp("sc") / "joint.ckpt", "joint", frames=5, size=16,
                           generator={"self_cond": True})
    return MarDiniPipeline.from_checkpoint(path)


def _generate(pipe, **kw):
    video = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.tensor([[False, True, True, True, False], [False, True, False, True, True]])
    return pipe.generate_latents(video, mask, steps=3, progress=False, **kw)[0]


def test_pipeline_feeds_each_step_the_previous_estimate(pipe):
    assert pipe.generator.cfg.self_cond
    seen = []
    handle = pipe.generator.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[0].clone(), args[1].clone(), kwargs.get("self_cond"), out)),
        with_kwargs=True)
    pipe.use_cache, pipe.batched_guidance = False, True
    _generate(pipe)
    handle.remove()
    assert len(seen) == 3 and seen[0][2] is None  # one window, three steps; the first has no estimate
    schedule = pipe.schedule if pipe.schedule is not None else CosineSchedule()
    for (z, t, _, v), (_, _, est, _) in zip(seen[:-1], seen[1:]):
        expected = schedule.predict_x0_eps(z.float(), v.float(), t.float())[0]
        torch.testing.assert_close(est.float(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_pipeline_fast_paths_stay_exact_with_self_conditioning(pipe, scale):
    pipe.use_cache, pipe.batched_guidance = True, True
    fast = _generate(pipe, guidance_scale=scale)
    pipe.use_cache, pipe.batched_guidance = False, False
    slow = _generate(pipe, guidance_scale=scale)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)

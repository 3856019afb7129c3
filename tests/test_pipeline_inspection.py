"""MarDiniPipeline's inspection API: ``plan``, ``decode`` and the per-step ``callback`` of ``generate``."""

from __future__ import annotations

import pytest
import torch

from mardini.pipeline import MarDiniPipeline
from pipeline_helpers import SIDE, WINDOW, ckpts, one_thread, pipe  # noqa: F401 (fixtures)

T, S = WINDOW, SIDE  # window and frame side of the test checkpoints
F_, T_ = False, True
MASK = torch.tensor([[F_, T_, T_, T_, F_], [F_, T_, F_, T_, T_], [F_, F_, T_, F_, F_]])  # (B, T): 3, 3, 1 generated

pytestmark = pytest.mark.usefixtures("one_thread")


def _video(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, T, 3, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (B, T, 3, H, W)


def test_plan_is_the_signal_generate_feeds_the_generator(pipe):
    video, mask = _video(2), MASK[:2]  # one group: both clips generate 3 frames
    fed = []
    pipe.generator.register_forward_pre_hook(lambda mod, args: fed.append(args[2].clone()))  # (z, t, plan, mask)
    pipe.generate(video, mask, steps=2, progress=False)
    plan = pipe.plan(video, mask)
    tokens = (pipe.planner_resolution // pipe.autoencoder.downsample // pipe.planner.cfg.patch_size) ** 2
    assert plan.shape == (2, T, tokens, fed[0].shape[-1]) and plan.dtype == torch.float32
    assert all(torch.equal(plan, f) for f in fed)  # every step reads the one plan
    scrambled = torch.where(mask[..., None, None, None], torch.full_like(video, 0.3), video)
    assert torch.equal(pipe.plan(scrambled, mask), plan)  # masked frames' content never reaches it
    other = mask.clone()
    other[0, 2] = False
    assert not torch.equal(pipe.plan(video, other)[0], plan[0])  # the mask does


def test_plan_needs_a_planner_and_a_valid_window(pipe, ckpts):
    with pytest.raises(ValueError, match="no planner, so there is no plan"):
        MarDiniPipeline.from_checkpoint(ckpts["generation"]).plan(_video(), MASK)
    with pytest.raises(ValueError, match="mask must be a"):
        pipe.plan(_video(), MASK[:2])


def test_the_callback_sees_every_step_of_the_whole_batch(pipe):
    video, calls = _video(), []
    z, _, m = pipe.generate_latents(video, MASK, steps=4, num_samples=2, eta=1.0, progress=False,
                                    callback=calls.append)
    assert [(c.index, c.steps) for c in calls] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [c.t for c in calls] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert all(c.latents.shape == c.estimate.shape == z.shape == (6, T, *z.shape[2:]) for c in calls)  # all clips
    assert all(torch.equal(c.mask, m) for c in calls)
    assert torch.equal(calls[-1].latents, z)  # the last step's state is the result
    given = pipe.autoencoder.encode(video).repeat_interleave(2, 0)  # (B*k, T, C, h, w)
    assert all(torch.equal(c.latents[~m], given[~m]) and torch.equal(c.estimate[~m], given[~m]) for c in calls)
    for row in (0, 4):  # a row of each group moves at every step
        assert all(not torch.equal(a.latents[row][m[row]], b.latents[row][m[row]]) for a, b in zip(calls, calls[1:]))
    assert torch.equal(pipe.generate_latents(video, MASK, steps=4, num_samples=2, eta=1.0, progress=False)[0], z)


def test_the_callback_s_estimate_is_the_step_s_clean_prediction(pipe):
    """Deterministic DDIM's last step (to t = 0) lands on its clean estimate, and a one-step run's estimate is the
    generator's x0 from pure noise: ``alpha z_1 - sigma v`` with alpha = 0, sigma = 1."""
    video, calls = _video(), []
    z, _, m = pipe.generate_latents(video, MASK, steps=3, progress=False, callback=calls.append)
    torch.testing.assert_close(calls[-1].estimate, z, rtol=0, atol=1e-5)
    assert not torch.allclose(calls[0].estimate[m], calls[0].latents[m], atol=1e-2)  # t = 2/3: still noisy
    v_seen = []
    pipe.generator.register_forward_hook(lambda mod, args, out: v_seen.append(out.clone()))
    one = []
    pipe.generate_latents(video[2:], MASK[2:], steps=1, progress=False, callback=one.append)
    alpha, sigma = pipe.schedule.alpha_sigma(torch.ones(1))
    assert float(alpha) < 1e-6  # so x0 = alpha z_1 - sigma v is -sigma v, whatever the start noise
    expected = -sigma * v_seen[0]  # (1, T, C, h, w)
    torch.testing.assert_close(one[0].estimate[MASK[2:]], expected[MASK[2:]], rtol=0, atol=1e-4)


def test_a_callback_that_changes_its_tensors_does_not_change_the_sampling(pipe):
    plain = pipe.generate(_video(), MASK, steps=3, progress=False)

    def vandal(step):
        step.latents.fill_(0.0)
        step.estimate.fill_(0.0)
        step.mask.fill_(False)

    assert torch.equal(plain, pipe.generate(_video(), MASK, steps=3, progress=False, callback=vandal))
    with pytest.raises(ValueError, match="callback must be a function of one DenoisingStep"):
        pipe.generate(_video(), MASK, steps=3, progress=False, callback="print")


def test_decode_gives_generate_s_frames_and_named_tasks_pass_the_callback(pipe):
    video = _video()
    out = pipe.generate(video, MASK, steps=3, progress=False)
    z, _, m = pipe.generate_latents(video, MASK, steps=3, progress=False)
    assert torch.equal(pipe.decode(z)[m], out[m])
    steps = []
    pipe.interpolate(video[:, 0], video[:, -1], steps=2, progress=False, callback=lambda s: steps.append(s.index))
    assert steps == [0, 1]
    steps.clear()
    pipe.long_video(video[:1, :2], total_frames=8, context=2, steps=2, progress=False,
                    callback=lambda s: steps.append(s.index))
    assert steps == [0, 1] * 2  # windows of 2 given + 3 new frames: 2 windows

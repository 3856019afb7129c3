"""MarDiniPipeline: exactness of the fast paths, given frames, seeds, the named tasks and clear errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mardini.masking import interpolation_mask
from mardini.pipeline import MarDiniPipeline, tasks
from pipeline_helpers import SIDE, WINDOW, ckpts, make_checkpoint, one_thread, pipe  # noqa: F401 (fixtures)

T, S = WINDOW, SIDE  # window and frame side of the test checkpoints
MASK = torch.tensor([[False, True, True, True, False], [False, True, False, True, True]])  # (B, T)
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _video(b: int = 2, t: int = T, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, t, 3, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (B, T, 3, H, W)


def _latents(pipe, scale, cache=True, batched=True, mask=MASK, **kw):
    pipe.use_cache, pipe.batched_guidance = cache, batched
    return pipe.generate_latents(_video(), mask, steps=STEPS, guidance_scale=scale, progress=False, **kw)[0]


# --------------------------------------------------------------------------------------------------
# Exactness of the fast paths
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, attention", [(1.0, "st"), (2.5, "st"), (2.5, "t")])
def test_cached_equals_uncached(pipe, scale, attention):
    pipe.generator.set_attention(attention)
    calls = []
    pipe.generator.embed.register_forward_hook(lambda m, i, o: calls.append(o.shape[1]))  # frames per call
    fast = _latents(pipe, scale, cache=True)
    assert min(calls) < T  # the cache really skipped the reference frames after the first step
    slow = _latents(pipe, scale, cache=False)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_batched_guidance_equals_two_calls(pipe):
    sizes = []
    pipe.generator.embed.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    batched = _latents(pipe, 2.5, batched=True)
    assert set(sizes) == {4}  # both clips (3 generated frames each) share a window: cond + null in ONE call
    naive = _latents(pipe, 2.5, cache=False, batched=False)
    torch.testing.assert_close(batched, naive, rtol=0, atol=1e-5)


def test_guidance_one_equals_no_guidance(pipe):
    sizes = []
    pipe.generator.embed.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    plain = _latents(pipe, 1.0)
    assert set(sizes) == {2}  # scale 1: the two clips only, no null branch
    both = _latents(pipe, 1.0, cache=False, batched=False)  # v_null + 1 * (v_cond - v_null), two calls
    torch.testing.assert_close(plain, both, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, _latents(pipe, 2.5), atol=1e-3)  # guidance does change the sample


def test_planner_once_per_window_and_timings(pipe):
    planner_calls = []
    pipe.planner.register_forward_hook(lambda m, i, o: planner_calls.append(o.shape[0]))
    pipe.generate(_video(), interpolation_mask(T)[None].expand(2, -1), steps=4, progress=False)
    assert planner_calls == [2]
    assert set(pipe.last_timings) == {"encode", "planner", "generator", "decode"}
    assert all(v >= 0 for v in pipe.last_timings.values())


# --------------------------------------------------------------------------------------------------
# Given frames, seeds
# --------------------------------------------------------------------------------------------------


def test_given_frames_come_back_bit_identical(pipe):
    video = _video()
    out = pipe.generate(video, MASK, steps=STEPS, guidance_scale=2.0, progress=False)
    assert out.shape == video.shape and out.dtype == torch.float32
    assert torch.equal(out[~MASK], video[~MASK])
    assert out[MASK].abs().max() <= 1 and not torch.equal(out[MASK], torch.zeros_like(out[MASK]))
    z, _, m = pipe.generate_latents(video, MASK, steps=STEPS, progress=False)
    assert torch.equal(z[~m], pipe.autoencoder.encode(video)[~m])
    # masked frames' content is ignored
    scrambled = torch.where(MASK[..., None, None, None], torch.full_like(video, 0.7), video)
    assert torch.equal(pipe.generate(scrambled, MASK, steps=STEPS, guidance_scale=2.0, progress=False), out)


def test_same_seed_same_video_and_batch_independence(pipe):
    video = _video()
    a = pipe.generate(video, MASK, steps=STEPS, seed=3, progress=False)
    assert torch.equal(a, pipe.generate(video, MASK, steps=STEPS, seed=3, progress=False))
    assert not torch.allclose(a, pipe.generate(video, MASK, steps=STEPS, seed=4, progress=False))
    alone = pipe.generate(video[1:], MASK[1:], steps=STEPS, seed=4, progress=False)  # clip 1 has seed 3 + 1
    torch.testing.assert_close(alone, a[1:], rtol=0, atol=1e-5)
    many = pipe.generate(video, MASK, steps=STEPS, seed=3, num_samples=2, progress=False)
    assert many.shape == (4, T, 3, S, S)
    torch.testing.assert_close(many[::2], a, rtol=0, atol=1e-5)  # sample 0 of each clip
    assert not torch.allclose(many[0], many[1])
    for other in (np.int64(3), torch.tensor(3)):  # any integer type: clip b gets seed + b
        assert torch.equal(a, pipe.generate(video, MASK, steps=STEPS, seed=other, progress=False))
    v = _video(1, 2)
    ref = pipe.long_video(v, total_frames=8, context=2, steps=2, seed=5, progress=False)
    assert torch.equal(ref, pipe.long_video(v, total_frames=8, context=2, steps=2, seed=np.int64(5), progress=False))


def test_generate_many_samples_a_batch_at_a_time_as_read_each_clip_seeded_by_its_place(pipe):
    videos = _video(2)  # (2, T, 3, S, S)
    wide = torch.rand(T, 3, S, S * 3 // 2, generator=torch.Generator().manual_seed(1)) * 2 - 1  # another shape
    clips, read = [(videos[0], MASK[0]), (videos[1], MASK[1]), (wide, MASK[0])], []

    def reading():
        for i, clip in enumerate(clips):
            read.append(i)
            yield clip

    kw = dict(steps=STEPS, num_samples=2, progress=False)
    many = pipe.generate_many(reading(), seed=7, batch=2, **kw)
    first = next(many)
    assert read == [0, 1] and first.shape == (2, T, 3, S, S)  # one batch read and sampled, not the rest
    rest = list(many)
    assert read == [0, 1, 2] and [r.shape[-1] for r in rest] == [S, S * 3 // 2]
    together = pipe.generate(videos, MASK, seed=7, **kw)  # (4, T, 3, S, S): clips 0 and 1, two samples each
    torch.testing.assert_close(torch.cat([first, rest[0]]), together, rtol=0, atol=1e-5)
    torch.testing.assert_close(rest[1], pipe.generate(wide[None], MASK[:1], seed=9, **kw), rtol=0, atol=1e-5)


def test_a_joint_checkpoint_samples_frames_of_another_aspect_ratio(pipe):
    from mardini.data.transforms import planner_size

    assert planner_size(32, 32, 16) == (16, 16) and planner_size(32, 48, 16) == (16, 24)  # short side, aspect kept
    assert planner_size(32, 48, (8, 8)) == (8, 8)
    wide = torch.rand(1, T, 3, S, S * 3 // 2, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (1, T, 3, S, 1.5 S)
    out = pipe.generate(wide, MASK[:1], steps=STEPS, guidance_scale=2.0, progress=False)
    assert out.shape == wide.shape and torch.isfinite(out).all()


def test_frames_with_a_short_side_below_the_planner_resolution_are_refused_in_sampling_and_training(pipe):
    """8x32 frames passed (their long side is >= 16) and the planner got an upscaled 16x64 copy."""
    from mardini.data.transforms import planner_size
    from mardini.lit import PlanningModule

    assert planner_size(8, 32, 16) == (16, 64)  # the copy keeps the aspect ratio at the short side: upscaled
    for h, w in ((8, 32), (32, 8)):
        with pytest.raises(ValueError, match=rf"frames of \({h}, {w}\) have a short side smaller than the planner's "
                                             r"resolution 16.*sample at the training resolution"):
            pipe.generate(torch.full((1, T, 3, h, w), -0.5), MASK[:1], steps=1, progress=False)
        module = PlanningModule(size="tiny", frames=T, planner_resolution=16)
        with pytest.raises(ValueError, match=rf"planner_resolution=16 is larger than .*\({h}, {w}\)"):
            module.latents_low({"video": torch.full((1, T, 3, h, w), -0.5)})


def test_a_size_the_networks_cannot_split_is_refused_with_the_nearest_that_works(pipe):
    step = pipe.autoencoder.downsample * pipe.generator.cfg.patch_size
    odd = S + step // 2  # not a multiple of the generator's token size
    video = torch.rand(1, T, 3, odd, S, generator=torch.Generator().manual_seed(2)) * 2 - 1  # (1, T, 3, odd, S)
    with pytest.raises(ValueError, match=rf"{odd}x{S} frames do not split into the generator's tokens.*multiples "
                                         rf"of {step}.*sample at (\d+)x{S}") as err:
        pipe.generate(video, MASK[:1], steps=STEPS, progress=False)
    near = pipe.nearest_size(odd, S)
    assert f"--resolution {near[0]}x{near[1]}" in str(err.value) and abs(near[0] - odd) == step // 2
    fitted = torch.nn.functional.interpolate(video[0], size=near)[None]  # (1, T, 3, *near)
    assert pipe.generate(fitted, MASK[:1], steps=STEPS, progress=False).shape == fitted.shape  # it does sample


def test_every_size_the_check_accepts_samples_and_every_one_it_refuses_fails(pipe, monkeypatch):
    """size_problem is exactly what sampling needs, the plan token grid's aspect ratio included (52x64 passed the
    old check and failed in the generator), so nearest_size suggests sizes that really sample."""
    step = pipe.autoencoder.downsample * pipe.generator.cfg.patch_size
    sides = range(S, 2 * S + 3 * step, step)
    accepted = [(h, w) for h in sides for w in sides if pipe.size_problem(h, w) is None]
    assert 0 < len(accepted) < len(sides) ** 2
    monkeypatch.setattr(pipe, "check_size", lambda h, w: None)  # let the refused sizes reach the networks
    mask = torch.tensor([[False, True]])
    for h in sides:
        for w in sides:
            video = torch.full((1, 2, 3, h, w), -0.5)
            if (h, w) in accepted:
                assert pipe.generate(video, mask, steps=1, progress=False).shape == video.shape, (h, w)
            else:
                with pytest.raises(Exception):
                    pipe.generate(video, mask, steps=1, progress=False)
    assert "plan token grid, not of the aspect ratio of the generator's 13x16" in pipe.size_problem(13 * step, 16 * step)
    near = pipe.nearest_size(12 * step, 16 * step)  # was 13x16 tokens, which failed to sample
    assert pipe.size_problem(*near) is None and near != (13 * step, 16 * step)
    assert pipe.generate(torch.full((1, 2, 3, *near), -0.5), mask, steps=1, progress=False).shape[-2:] == near


def test_seeds_of_the_wrong_type_or_range_are_named(pipe):
    """1.5 raised "'float' object is not iterable", "3" "got 1 seeds", 2**64 "Overflow when unpacking long long"."""
    v = _video()
    for seed, problem in [(1.5, "an int or a list of ints, one per clip, got 1.5"), ("3", "got '3'"),
                          ([0, 1.0], "got \\[0, 1.0\\]"), ([0], "one per clip \\(2\\), got 1 seeds"),
                          (2**64, "in \\[0, 2\\*\\*63\\)"), (-1, "in \\[0, 2\\*\\*63\\)"),
                          (2**63 - 1, "clip b uses seed \\+ b")]:
        with pytest.raises(ValueError, match=rf"seeds? must be .*{problem}"):
            pipe.generate(v, MASK, steps=1, seed=seed, progress=False)
    with pytest.raises(ValueError, match="an int or a list of ints"):
        pipe.long_video(v[:1, :1], total_frames=7, steps=1, seed=1.5, progress=False)
    out = pipe.generate(v, MASK, steps=1, seed=torch.tensor([3, 2**63 - 1]), progress=False)
    alone = pipe.generate(v[1:], MASK[1:], steps=1, seed=2**63 - 1, progress=False)[0]
    torch.testing.assert_close(out[1], alone, rtol=0, atol=1e-4)  # the same noise: the largest seed works
    long = pipe.long_video(v[:1, :1], total_frames=7, steps=1, seed=2**62, progress=False)
    assert long.shape[1] == 7


def test_ancestral_eta_is_seeded_per_clip_and_sample(pipe):
    """eta > 0 draws fresh noise each step, still from the clip's seed: reproducible, independent of the batch
    and of num_samples, and a different sample from deterministic DDIM."""
    video = _video()
    kw = dict(steps=STEPS, progress=False, eta=1.0)
    a = pipe.generate(video, MASK, seed=3, **kw)
    assert torch.equal(a, pipe.generate(video, MASK, seed=3, **kw))
    assert not torch.allclose(a, pipe.generate(video, MASK, steps=STEPS, seed=3, progress=False))  # eta 0
    alone = pipe.generate(video[1:], MASK[1:], seed=4, **kw)  # clip 1 has seed 3 + 1
    torch.testing.assert_close(alone, a[1:], rtol=0, atol=1e-5)
    many = pipe.generate(video, MASK, seed=3, num_samples=2, **kw)
    torch.testing.assert_close(many[::2], a, rtol=0, atol=1e-5)  # sample 0 of each clip
    assert not torch.allclose(many[0], many[1])
    assert torch.equal(a[~MASK], video[~MASK])  # given frames stay the input pixels
    for eta in (-0.5, float("inf"), float("nan"), "1", 1.5):  # inf gave an all-NaN video; above 1 too much noise
        with pytest.raises(ValueError, match=rf"^eta={eta!r} is impossible: DDIM's eta is in \[0, 1\]"):
            pipe.generate(video, MASK, steps=STEPS, eta=eta, progress=False)


# --------------------------------------------------------------------------------------------------
# Named tasks
# --------------------------------------------------------------------------------------------------


def test_named_tasks(pipe):
    v = _video(1, 3)
    kw = dict(steps=2, progress=False)
    out = pipe.interpolate(v[:, 0], v[:, 2], **kw)
    assert out.shape == (1, T, 3, S, S) and torch.equal(out[:, 0], v[:, 0]) and torch.equal(out[:, -1], v[:, 2])
    out = pipe.image_to_video(v[0, 1], index=2, guidance_scale=2.5, **kw)
    assert out.shape == (1, T, 3, S, S) and torch.equal(out[0, 2], v[0, 1])
    out = pipe.expand(v[:, :2], **kw)
    assert out.shape == (1, T, 3, S, S) and torch.equal(out[:, :2], v[:, :2])
    out = pipe.long_video(v[:, :2], total_frames=11, context=2, **kw)  # windows: 2 + 3, then 2 + 3 twice
    assert out.shape == (1, 11, 3, S, S) and torch.equal(out[:, :2], v[:, :2])
    for factor in (2, 4):
        out = pipe.slow_motion(v, factor=factor, **kw)
        assert out.shape == (1, 2 * factor + 1, 3, S, S)
        assert torch.equal(out[:, ::factor], v)


def test_image_to_video_guides_with_the_paper_s_scale_unless_told_otherwise(ckpts, monkeypatch):
    """pipe.image_to_video(image) sampled without guidance (generate's default 1.0), while sample.py and the
    evaluation guide image-to-video with the paper's 2.5; now the Python call does too (1 without a planner)."""
    scales = []
    generate = MarDiniPipeline.generate
    monkeypatch.setattr(MarDiniPipeline, "generate",
                        lambda self, *a, **kw: scales.append(kw.get("guidance_scale")) or generate(self, *a, **kw))
    image, kw = _video(1, 1)[:, 0], dict(steps=1, progress=False)
    joint, warmup = (MarDiniPipeline.from_checkpoint(ckpts[kind]) for kind in ("joint", "generation"))
    joint.image_to_video(image, **kw)
    joint.image_to_video(image, guidance_scale=1.0, **kw)
    warmup.image_to_video(image, **kw)  # the null plan cannot be guided
    assert scales == [2.5, 1.0, 1.0]


def test_named_tasks_name_their_own_window_keyword_and_the_task_that_fits(pipe):
    """window= to interpolate fell into generate ("unexpected keyword argument 'window'"), a window above the
    trained one told long_video's caller to use long_video, and a prefix filling expand's window named frame indices."""
    v, kw = _video(1, 3), dict(steps=1, progress=False)
    for task, call in (("interpolate", lambda: pipe.interpolate(v[:, 0], v[:, 2], window=T, **kw)),
                       ("image_to_video", lambda: pipe.image_to_video(v[:, 0], window=T, **kw)),
                       ("expand", lambda: pipe.expand(v[:, :2], window=T, **kw))):
        with pytest.raises(TypeError, match=rf"{task}\(\) takes frames= \(the window's length\), not window= "
                                            r"\(got window=5\)"):
            call()
    with pytest.raises(TypeError, match=r"long_video\(\) takes window= \(frames per window, not the output's "
                                        r"length\), not frames= \(got frames=5"):
        pipe.long_video(v[:, :2], total_frames=8, frames=T, **kw)
    with pytest.raises(TypeError, match=r"slow_motion\(\) takes window= .*not frames="):
        pipe.slow_motion(v, frames=T, **kw)
    for task, call in (("long_video", lambda: pipe.long_video(v[:, :2], total_frames=12, window=7, **kw)),
                       ("slow_motion", lambda: pipe.slow_motion(v, window=7, **kw))):
        with pytest.raises(ValueError, match=rf"window must be <= 5 \(the checkpoint's trained window\), got 7; {task} "
                                             "goes window by window"):
            call()
    with pytest.raises(ValueError, match=r"a prefix of 5 frames leaves nothing to generate in a window of 5 frames; "
                                         r"expand fills one window: .*use long_video"):
        pipe.expand(_video(1, T), **kw)


def test_one_window_tasks_asked_for_more_frames_name_the_call_that_goes_window_by_window(pipe):
    """interpolate(frames=7) with a 5-frame window said "use long_video / slow_motion", neither of which can."""
    v, kw = _video(1, 3), dict(steps=1, progress=False)
    with pytest.raises(ValueError, match=r"^interpolate fills one window: frames=7 is more than the checkpoint's trained "
                                         r"window of 5 frames; for 7 frames use generate_long\(video, "
                                         r"interpolation_mask\(7\)\) \(sample.py: generate --images FIRST LAST --keep "
                                         r"0,6\), which goes window by window$"):
        pipe.interpolate(v[:, 0], v[:, 2], frames=7, **kw)
    with pytest.raises(ValueError, match=r"^image_to_video fills one window: frames=8 .*generate_long\(video, "
                                         r"image_to_video_mask\(8, -1\)\) \(sample.py: generate --images IMAGE --keep 7 "
                                         r"--frames 8\)"):
        pipe.image_to_video(v[:, 0], frames=8, index=-1, **kw)
    with pytest.raises(ValueError, match=r"^expand fills one window: frames=6 .*long_video\(prefix, total_frames=6\) "
                                         r"\(sample.py: long_video --total 6\)"):
        pipe.expand(v[:, :2], frames=6, **kw)
    mask = interpolation_mask(7)  # what the interpolate message names does it
    out = pipe.generate_long(torch.cat([v[:, :1], v.new_zeros(1, 5, 3, S, S), v[:, 2:]], dim=1), mask, **kw)
    assert out.shape == (1, 7, 3, S, S) and torch.equal(out[:, 0], v[:, 0]) and torch.equal(out[:, -1], v[:, 2])


def test_a_slow_motion_window_too_short_names_the_window_asked_for(pipe):
    """window=2 said "the checkpoint's is 1" (the requested window made odd, not the checkpoint's 5)."""
    v = _video(1, 3)
    with pytest.raises(ValueError, match=r"^slow motion needs an odd window of at least 3 frames \(given frames at both "
                                         r"ends\); window=2, made odd, is 1: pass window >= 3, or leave it out for "
                                         r"the checkpoint's trained window of 5$"):
        pipe.slow_motion(v, 2, window=2, steps=1, progress=False)
    pipe.window = 2  # a checkpoint trained on 2 frames
    with pytest.raises(ValueError, match=r"the checkpoint's trained window of 2 frames, made odd, is 1: a checkpoint "
                                         r"trained on 3 or more frames$"):
        pipe.slow_motion(v, 2, steps=1, progress=False)


def test_counts_that_are_not_integers_are_named(pipe):
    """num_samples=1.5 failed in repeat_interleave, total_frames=12.5 in new_zeros, frames=4.5 was cut to 4."""
    v, kw = _video(1, 3), dict(steps=1, progress=False)
    for bad in (1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"num_samples must be an integer >= 1, got {bad!r}"):
            pipe.generate(_video(), MASK, num_samples=bad, **kw)
        with pytest.raises(ValueError, match=rf"num_samples must be an integer >= 1, got {bad!r}"):
            pipe.long_video(v[:, :2], total_frames=8, num_samples=bad, **kw)
    with pytest.raises(ValueError, match=r"total_frames must be an integer > the 2 given frames, got 12.5"):
        pipe.long_video(v[:, :2], total_frames=12.5, **kw)
    with pytest.raises(ValueError, match=r"context must be an integer in \[1, window - 1\] = \[1, 4\], got 1.5"):
        pipe.long_video(v[:, :2], total_frames=8, context=1.5, **kw)
    with pytest.raises(ValueError, match=r"frames must be an integer \(frames in a window\), got 4.5"):
        pipe.interpolate(v[:, 0], v[:, 2], frames=4.5, **kw)
    with pytest.raises(ValueError, match=r"window must be an integer \(frames in a window\), got 4.5"):
        pipe.slow_motion(v, window=4.5, **kw)
    with pytest.raises(ValueError, match=r"factor must be a power of 2 \(2, 4, 8, ...\), got 2.0"):
        pipe.slow_motion(v, factor=2.0, **kw)
    many = pipe.long_video(v[:, :2], total_frames=np.int64(6), num_samples=torch.tensor(2), **kw)
    assert many.shape == (2, 6, 3, S, S)  # integers of any kind are counts


def test_long_video_from_one_image(pipe):
    """A (3, H, W) image was refused although the docstring said one image is fine; (n, 3, H, W) is one clip."""
    image = _video(1, 1)[0, 0]  # (3, H, W)
    out = pipe.long_video(image, total_frames=7, steps=1, progress=False)
    assert out.shape == (1, 7, 3, S, S) and torch.equal(out[0, 0], image)
    assert torch.equal(out, pipe.long_video(image[None], total_frames=7, steps=1, progress=False))


def test_long_video_reuses_last_frames_as_references(pipe):
    v = _video(1, 2)
    seen = []
    orig = pipe.generate
    pipe.generate = lambda video, mask, **kw: (seen.append((video.clone(), mask.clone())), orig(video, mask, **kw))[1]
    out = pipe.long_video(v, total_frames=8, context=2, steps=2, progress=False)
    assert [m[0].tolist() for _, m in seen] == [[False, False, True, True, True]] * 2  # 2 + 3, then 2 + 3
    torch.testing.assert_close(seen[1][0][:, :2], out[:, 3:5])  # window 2 starts from window 1's last 2 frames


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_clear_errors(pipe, ckpts, tmp_path):
    v = _video()
    with pytest.raises(ValueError, match="give at least one reference frame"):
        pipe.generate(v, torch.ones(2, T, dtype=torch.bool), steps=1, progress=False)
    with pytest.raises(ValueError, match="leave at least one frame to generate"):
        pipe.generate(v, torch.zeros(2, T, dtype=torch.bool), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"trained window of 5 frames.*generate_long\(video, mask\) for any mask over "
                                         r"more frames \(sample.py generate does so when --keep or --frames go past "
                                         r"the window\), long_video or slow_motion"):
        pipe.generate(_video(1, 7), interpolation_mask(7)[None], steps=1, progress=False)
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        pipe.generate((v + 1) * 127.5, MASK, steps=1, progress=False)
    with pytest.raises(ValueError, match="power of 2"):
        pipe.slow_motion(v, factor=3)
    with pytest.raises(ValueError, match=r"no clips: got \(0, 5, 3, 16, 16\)"):  # was torch's max() RuntimeError
        pipe.generate(v[:0], MASK[:0], steps=1, progress=False)
    with pytest.raises(ValueError, match=r"got torch.float32 \(2, 5, 16, 16, 3\) \(channels last.*x.permute\(0, 1, 4, 2, 3\)"):
        pipe.generate(v.permute(0, 1, 3, 4, 2), MASK, steps=1, progress=False)  # was told to convert uint8 frames
    with pytest.raises(ValueError, match="got torch.uint8 .*x / 127.5 - 1"):
        pipe.generate(((v + 1) * 127.5).byte(), MASK, steps=1, progress=False)
    with pytest.raises(ValueError, match="dtype must be one of fp32, float32, bf16, .*got 'fp16'"):  # was a KeyError
        MarDiniPipeline(pipe.generator, pipe.autoencoder, pipe.planner, dtype="fp16")
    for scale in (float("nan"), float("inf"), -1.0, "2"):  # NaN gave an all-NaN video, -1 was accepted
        with pytest.raises(ValueError, match=r"guidance_scale must be a finite number >= 0.*got"):
            pipe.generate(v, MASK, steps=1, guidance_scale=scale, progress=False)
    planning = make_checkpoint(tmp_path / "planning.ckpt", "planning", frames=T, size=S)
    with pytest.raises(ValueError, match="'planning' warm-up checkpoint.*cannot sample"):
        MarDiniPipeline.from_checkpoint(planning)


def test_frames_in_0_1_warn_once_per_call(pipe):
    """[0, 1] frames (torchvision's ToTensor) passed the [-1, 1] check and gave a washed-out video silently."""
    v = _video()
    with pytest.warns(UserWarning, match=r"every given pixel is >= 0.*x \* 2 - 1") as caught:
        pipe.generate((v + 1) / 2, MASK, steps=1, progress=False)
    assert len(caught) == 1 and caught[0].filename == __file__  # it points at the call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate(v, MASK, steps=1, progress=False)


def test_frames_in_0_1_given_to_a_named_task_warn_at_the_user_s_call(pipe):
    """The warning of interpolate / long_video / slow_motion pointed at tasks.py (a fixed stacklevel)."""
    v, kw = (_video(1, 3) + 1) / 2, dict(steps=1, progress=False)  # (1, 3, 3, S, S) in [0, 1]
    for call in (lambda: pipe.interpolate(v[:, 0], v[:, 2], **kw), lambda: pipe.slow_motion(v, **kw),
                 lambda: pipe.long_video(v[:, :2], total_frames=6, **kw), lambda: tasks.expand(pipe, v[:, :2], **kw)):
        with pytest.warns(UserWarning, match=r"every given pixel is >= 0") as caught:
            call()
        assert {w.filename for w in caught} == {__file__}


def test_task_inputs_of_the_wrong_dtype_are_named(pipe):
    """uint8 images to interpolate were reported as "video must be a float (B, T, 3, H, W) tensor ..., got torch.uint8
    (2, 9, 3, 32, 32)", a tensor the user never made."""
    u8 = ((_video(2, 3) + 1) * 127.5).byte()  # (2, 3, 3, S, S)
    with pytest.raises(ValueError, match=r"^first must be a float image \(B, 3, H, W\) in \[-1, 1\], got torch.uint8 "
                                         r"\(uint8 frames: convert with x / 127.5 - 1\)$"):
        pipe.interpolate(u8[:, 0], u8[:, 2], steps=1, progress=False)
    with pytest.raises(ValueError, match=r"^image must be a float image .*got ndarray \(a torch tensor"):
        pipe.image_to_video(u8[:, 0].numpy(), steps=1, progress=False)
    for call in (lambda: pipe.expand(u8[:, :2]), lambda: pipe.long_video(u8[:, :2], total_frames=6)):
        with pytest.raises(ValueError, match=r"^prefix must be a float video \(B, n, 3, H, W\) in \[-1, 1\], "
                                             r"got torch.uint8"):
            call()
    with pytest.raises(ValueError, match=r"^video must be a float video \(B, n, 3, H, W\) .*got torch.int64$"):
        pipe.slow_motion(u8.long())


def test_generation_checkpoint_samples_plan_free_only(ckpts):
    pipe = MarDiniPipeline.from_checkpoint(ckpts["generation"])
    assert pipe.planner is None and pipe.kind == "generation"
    with pytest.raises(ValueError, match="no planner.*guidance_scale must be 1"):
        pipe.generate(_video(), MASK, steps=1, guidance_scale=2.5, progress=False)
    out = pipe.generate(_video(), MASK, steps=2, progress=False)
    assert torch.equal(out[~MASK], _video()[~MASK])


def test_ema_and_raw_weights_differ(ckpts):
    ema = MarDiniPipeline.from_checkpoint(ckpts["joint"])
    raw = MarDiniPipeline.from_checkpoint(ckpts["joint"], ema=False)
    assert not torch.equal(ema.generator.out.weight, raw.generator.out.weight)
    assert ema.info["ema"] and not raw.info["ema"]


# --------------------------------------------------------------------------------------------------
# What each window is sampled with (mutation-testing gaps)
# --------------------------------------------------------------------------------------------------


def _spy_generate(pipe):
    seen = []
    orig = pipe.generate

    def spy(video, mask, **kw):
        seen.append((mask.clone(), kw.get("seed")))
        return orig(video, mask, **kw)

    pipe.generate = spy
    return seen


def test_long_video_draws_new_noise_per_window_and_gives_the_last_context_frames(pipe):
    seen = _spy_generate(pipe)
    pipe.long_video(_video(1, 3), total_frames=11, context=2, steps=1, seed=5, progress=False)
    # every window, the first included, gives the last `context` frames so far and generates 3: frames 3-5, 6-8,
    # 9-11 (11 past the end: generated and dropped)
    assert [m[0].tolist() for m, _ in seen] == [[False, False, True, True, True]] * 3
    seeds = [s for _, s in seen]
    assert len({tuple(s) for s in seeds}) == len(seeds), seeds  # each window its own noise, not a repeated pattern


def test_long_video_s_last_window_is_full_so_a_longer_video_keeps_the_frames(pipe):
    """The last window was cut to the frames left (long_video(x, 12) and long_video(x, 20) differed in frames 9-11
    and in the windows' lengths); it is a full window whose frames past the end are dropped."""
    x = _video(2, 3)
    lengths, generate = [], pipe.generate
    pipe.generate = lambda video, mask, **kw: (lengths.append(video.shape[1]), generate(video, mask, **kw))[1]
    kw = dict(steps=2, eta=1.0, seed=3, progress=False)
    short, long = pipe.long_video(x, 12, **kw), pipe.long_video(x, 20, **kw)
    assert short.shape == (2, 12, 3, S, S) and long.shape == (2, 20, 3, S, S)
    assert torch.equal(short, long[:, :12])
    assert set(lengths) == {T}  # every window full length
    assert torch.equal(pipe.long_video(x, 4, **kw), short[:, :4])  # one window too


def test_the_planner_reads_the_sampling_mask(pipe):
    masks = []
    handle = pipe.planner.register_forward_pre_hook(lambda _m, args: masks.append(args[1].clone()))
    try:
        pipe.generate(_video(), MASK, steps=1, progress=False)
    finally:
        handle.remove()
    assert len(masks) == 1 and torch.equal(masks[0].cpu(), MASK)  # masked frames enter as [MASK], not as zeros


def test_sampling_uses_the_trained_schedule_shift(ckpts, tmp_path):
    from mardini.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "shift.ckpt", "generation", frames=T, size=S, model_args={"schedule_shift": 3.0})
    shifted = MarDiniPipeline.from_checkpoint(path)
    assert shifted.schedule.shift == 3.0
    plain = MarDiniPipeline.from_checkpoint(path)
    plain.schedule = type(plain.schedule)(shift=1.0)
    kw = dict(steps=STEPS, progress=False, seed=1)
    assert not torch.allclose(shifted.generate_latents(_video(), MASK, **kw)[0], plain.generate_latents(_video(), MASK, **kw)[0])


def test_sampling_a_big_size_on_the_cpu_warns_once_and_the_demo_s_size_does_not(pipe, monkeypatch):
    """A tiny model sampled at 144x256 on the CPU ran for many minutes with no word (evaluate.py shows no bar): past
    ``CPU_TOKENS_WARN`` generator tokens per window it warns once per size with the count, then gives the first
    step's time and the estimated total; the demo's 9 frames of 32x32 px stay silent, and the samples are the same."""
    import mardini.pipeline.pipeline as pipeline_module

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not pipe._warn_if_slow(9, 32, 32, 25)  # the demo's size: 9 x 16 x 16 = 2304 tokens at this pipe's patch 1
    with pytest.warns(UserWarning, match=r"9 frames of 144x256 px on the CPU: 82944 generator tokens per window"):
        assert pipe._warn_if_slow(9, 144, 256, 25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not pipe._warn_if_slow(9, 144, 256, 25)  # once per size
        quiet = pipe.generate(_video(), MASK, steps=2, progress=False)
    monkeypatch.setattr(pipeline_module, "CPU_TOKENS_WARN", pipe.generator_tokens(T, S, S) - 1)  # S px: past it
    with pytest.warns(UserWarning) as caught:
        warned = pipe.generate(_video(), MASK, steps=2, progress=False)
    said = [str(w.message) for w in caught]
    assert any(f"{T} frames of {S}x{S} px on the CPU" in m for m in said), said
    assert any(m.startswith("the first of 2 denoising steps took") for m in said), said
    assert torch.equal(quiet, warned)


def test_ancestral_noise_streams_differ_per_sample_and_clip():
    from mardini.pipeline.pipeline import _step_noise_seed

    seeds = {_step_noise_seed(s, j) for s in (3, 4) for j in range(3)}
    assert len(seeds) == 6 and not seeds & {3, 4}  # and none reuses a start-noise stream


def test_a_made_checkpoint_records_its_clips_as_a_training_run_does(tmp_path):
    """``make_checkpoint(size=(H, W))`` recorded no size (tests put ``datamodule_hyper_parameters`` in by hand): it
    records its clips' frames and resolution under the VideoDataModule's argument names, so loading reads (H, W)."""
    import inspect

    from mardini.data.datamodule import VideoDataModule
    from mardini.pipeline.loading import load_checkpoint
    from mardini.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "16x32.ckpt", "generation", frames=T, size=(16, 32))
    data = torch.load(path, map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]
    assert data == {"frames": T, "resolution": [16, 32]} and set(data) <= set(inspect.signature(VideoDataModule).parameters)
    assert load_checkpoint(path).resolution == (16, 32)


def test_a_checkpoint_that_records_no_window_warns_and_takes_the_window_passed(ckpts, tmp_path):
    """No model.frames, datamodule or curriculum frames: the size's registry window (tiny: 4) is only a warned
    fallback, and ``window=`` gives the trained one; a checkpoint that records its window refuses another."""
    ckpt = torch.load(ckpts["joint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["frames"] == T and ckpt["datamodule_hyper_parameters"]["frames"] == T
    ckpt["hyper_parameters"]["frames"] = None  # a module built without frames, fitted on a dataloader
    del ckpt["datamodule_hyper_parameters"]  # (no datamodule: no data recorded)
    bare = tmp_path / "no_window.ckpt"
    torch.save(ckpt, bare)
    with pytest.warns(UserWarning, match=r"records no trained window .*registry window of 4 frames.*window=T"):
        assert MarDiniPipeline.from_checkpoint(bare).window == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = MarDiniPipeline.from_checkpoint(bare, window=T)
    assert pipe.window == T
    out = pipe.generate(_video(), MASK, steps=1, progress=False)  # the 5-frame window the model was trained on
    assert out.shape == (2, T, 3, S, S)
    with pytest.raises(ValueError, match=r"records a trained window of 5 frames; window=9 contradicts it"):
        MarDiniPipeline.from_checkpoint(ckpts["joint"], window=9)


def test_a_curriculum_subclass_s_window_and_attention_are_the_sampling_ones(tmp_path):
    """A Curriculum subclass's state is keyed by its own class name: its trained window and /ST -> /T switch were
    dropped (the registry's window and ST attention sampled a model trained on 3 frames with /T)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from mardini.lit import MarDiniModule
    from mardini.lit.curriculum import Milestone
    from mardini.testing import _quiet
    from user_extensions import WindowSchedule

    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=T, planner_resolution=16, lr=1e-3)
    clips = [{"video": v} for v in _video(2)]  # (T, 3, S, S) each
    schedule = WindowSchedule([Milestone(0), Milestone(1, frames=3, attention="t")])
    with _quiet():
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=str(tmp_path), callbacks=[schedule])
        trainer.fit(module, DataLoader(clips, batch_size=2))
        trainer.save_checkpoint(tmp_path / "schedule.ckpt")
    assert list(torch.load(tmp_path / "schedule.ckpt", weights_only=True)["callbacks"]) == ["WindowSchedule"]
    pipe = MarDiniPipeline.from_checkpoint(tmp_path / "schedule.ckpt")
    assert pipe.window == 3 and pipe.generator.attention_mode == "t"  # as the module trained at its last step
    video = _video(1)
    assert pipe.interpolate(video[:, 0], video[:, -1], steps=1, progress=False).shape == (1, 3, 3, S, S)


def test_a_checkpoint_without_hyper_parameters_says_so(ckpts, tmp_path, capsys, monkeypatch):
    """Without ``hyper_parameters`` the loader fell back to the size's defaults silently: a checkpoint of other
    network settings was misdiagnosed ('the weights do not fit the network rebuilt from its hyper-parameters ...
    another code version?'), and one of default settings sampled with the registry's window (4, not its 5)."""
    import re

    from mardini.lit.checkpoints import read_checkpoint
    from mardini.pipeline.cli import main
    from mardini.reproduce.quality import PlannerOnly
    from mardini.user_errors import run_reporting_user_errors

    def stripped(path, name):
        ckpt = read_checkpoint(path)
        del ckpt["hyper_parameters"]
        torch.save(ckpt, tmp_path / name)
        return tmp_path / name

    def says_so(path):
        return (rf"^{re.escape(str(path))} has no hyper_parameters \(not saved by a MarDini training run, or they "
                r"were stripped\)")

    plain = stripped(ckpts["joint"], "joint.ckpt")
    other = stripped(make_checkpoint(tmp_path / "sc.ckpt", "generation", generator={"self_cond": True}), "sc_.ckpt")
    for path in (other, plain):
        with pytest.raises(ValueError, match=says_so(path)):
            MarDiniPipeline.from_checkpoint(path)
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    argv = ["interpolate", "--ckpt", str(other), "--images", "a.png", "b.png", "--out", str(tmp_path / "out")]
    assert run_reporting_user_errors("sample.py", lambda: main(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sample.py: error: {other} has no hyper_parameters") and "code version" not in err
    planning = stripped(make_checkpoint(tmp_path / "planning.ckpt", "planning"), "planning_.ckpt")
    with pytest.raises(ValueError, match=says_so(planning)):
        PlannerOnly(planning)  # the reproduction's "MAR only" reads the planner's settings from them too

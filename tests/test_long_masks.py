"""generate_long: any mask over more frames than a window, window by window (tasks.window_schedule)."""

from __future__ import annotations

import pytest
import torch

from mardini.masking import image_to_video_mask, interpolation_mask, mask_from_given
from mardini.pipeline import tasks
from pipeline_helpers import SIDE, WINDOW, ckpts, one_thread, pipe  # noqa: F401 (fixtures)

W, S = WINDOW, SIDE  # window and frame side of the test checkpoints
KW = dict(steps=1, progress=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def _video(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, t, 3, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (B, T, 3, H, W)


def _spy(pipe) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Per ``generate`` call: the window's video, its mask row and its seeds."""
    seen, generate = [], pipe.generate

    def spy(video, mask, **kw):
        assert torch.equal(mask, mask[:1].expand_as(mask))  # one mask for the batch
        seen.append((video.clone(), mask[0].clone(), list(kw["seed"])))
        return generate(video, mask, **kw)

    pipe.generate = spy
    return seen


def _rows(pattern: str) -> list[bool]:
    """``"g.."``: g = given, . = generated."""
    return [c == "." for c in pattern]


# mask (T,) -> the windows of the documented rule (window 5, context 2): (first frame, given (g) / generated (.))
SCHEDULES = {
    "keyframes 3 windows apart": (interpolation_mask(11), [(0, "g...."), (3, "gg..."), (6, "gg..g")]),
    "backward expansion": (mask_from_given(7, [5, 6]), [(2, "...gg"), (-1, "...gg")]),
    "middle image": (image_to_video_mask(9, 4), [(3, ".g..."), (6, "gg..."), (0, "...gg")]),
    # the window at 6 cannot reach frame 12: it keeps frames 8-9 only, so that the next one holds 12 and 2 known frames
    "keyframes, a window keeps part": (mask_from_given(13, [0, 12]),
                                       [(0, "g...."), (3, "gg..."), (6, "gg..."), (8, "gg..g")]),
    "expansion, last window virtual": (mask_from_given(12, [0]),
                                       [(0, "g...."), (3, "gg..."), (6, "gg..."), (9, "gg...")]),
    # frame 11 lies past the context's reach (a window at 6 would end at 10): the window starts later to include it
    "a given frame just past the context's reach": (mask_from_given(12, [0, 4, 11]),
                                                    [(0, "g...g"), (3, "gg..."), (7, "g...g")]),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_windows_follow_the_documented_rule_and_given_frames_come_back_exactly(pipe, name):
    mask, expected = SCHEDULES[name]
    t = mask.shape[0]
    assert [(s, m.tolist()) for s, m in tasks.window_schedule(mask, W, 2)] == [(s, _rows(p)) for s, p in expected]
    video = _video(2, t)
    seen = _spy(pipe)
    out = pipe.generate_long(video, mask, context=2, seed=1, **KW)
    assert out.shape == (2, t, 3, S, S) and torch.isfinite(out).all()
    assert torch.equal(out[:, ~mask], video[:, ~mask])  # bit-exact
    assert [m.tolist() for _, m, _ in seen] == [_rows(p) for _, p in expected]  # what each window really ran
    for (clip, m, _), (s, _) in zip(seen, expected):
        assert clip.shape == (2, W, 3, S, S)  # every window full length
        real = [i for i in range(W) if 0 <= s + i < t]
        given = [i for i in real if not m[i]]
        assert torch.equal(clip[:, given], out[:, [s + i for i in given]])  # known frames at their places
        assert all(m[i] for i in range(W) if i not in real)  # virtual frames are generated
    assert len({tuple(sd) for _, _, sd in seen}) == len(seen)  # each window its own noise


def test_the_frame_before_every_given_frame_is_generated_seeing_it():
    """Over every mask of up to 9 frames (windows of 3-5, every context): each generated frame is kept from exactly
    one window, and the frame right before a given frame (after the first given one) comes from a window that holds
    that given frame, so a keyframe is interpolated towards, never extrapolated past."""
    import itertools

    for w in (3, 4, 5):
        for context in range(1, w):
            for t in range(w + 1, 10):
                for bits in itertools.product((False, True), repeat=t):
                    if all(bits) or not any(bits):
                        continue
                    last = {}  # generated frame -> the (first, end) of the last window that generated it
                    for s, m in tasks.window_schedule(torch.tensor(bits), w, context):
                        last.update({s + j: (s, s + w) for j in range(w) if m[j] and 0 <= s + j < t})
                    assert set(last) == {i for i in range(t) if bits[i]}
                    k0 = bits.index(False)
                    for g in range(k0 + 1, t):
                        if not bits[g] and bits[g - 1]:
                            assert last[g - 1][0] <= g < last[g - 1][1], (bits, w, context, g)


def test_frames_generated_by_a_window_are_given_to_the_next(pipe):
    mask = interpolation_mask(11)
    video = _video(1, 11)
    seen = _spy(pipe)
    out = pipe.generate_long(video, mask, context=2, **KW)
    assert not torch.equal(out[:, 3:5], torch.zeros_like(out[:, 3:5]))
    assert torch.equal(seen[1][0][:, :2], out[:, 3:5])  # window 2 starts from window 1's last 2 frames


def test_one_window_is_generate(pipe):
    video = _video(2, W)
    mask = mask_from_given(W, [0, 3])
    for m in (mask, mask[None].expand(2, -1)):
        assert torch.equal(pipe.generate_long(video, m, seed=3, num_samples=2, **KW),
                           pipe.generate(video, mask[None].expand(2, -1).clone(), seed=3, num_samples=2, **KW))
    short = _video(1, 3)
    assert torch.equal(pipe.generate_long(short, interpolation_mask(3), **KW),
                       pipe.generate(short, interpolation_mask(3)[None], **KW))


def test_seeds_are_per_clip_and_sample_whatever_the_batch(pipe):
    video, mask = _video(2, 11), interpolation_mask(11)
    both = pipe.generate_long(video, mask, seed=3, eta=1.0, **KW)
    alone = pipe.generate_long(video[1:], mask, seed=4, eta=1.0, **KW)  # clip 1 has seed 3 + 1
    torch.testing.assert_close(alone, both[1:], rtol=0, atol=1e-4)
    assert torch.equal(both, pipe.generate_long(video, mask, seed=3, eta=1.0, **KW))  # reproducible
    many = pipe.generate_long(video, mask, seed=3, eta=1.0, num_samples=2, **KW)
    assert many.shape == (4, 11, 3, S, S)
    torch.testing.assert_close(many[::2], both, rtol=0, atol=1e-4)  # sample 0 of each clip
    assert not torch.allclose(many[0], many[1])
    assert not torch.allclose(both[0], pipe.generate_long(video[:1], mask, seed=5, eta=1.0, **KW)[0])


@pytest.mark.parametrize("given", [[0, 4], [4]])
def test_a_longer_video_keeps_the_earlier_frames(pipe, given):
    """Frames of a window past the end are virtual, so every window has the trained length; and backward windows
    are salted by their index in their pass, so a longer forward pass leaves them as they were."""
    video = _video(1, 12)
    short = pipe.generate_long(video[:, :9], mask_from_given(9, given), eta=1.0, **KW)
    long = pipe.generate_long(video, mask_from_given(12, given), eta=1.0, **KW)
    assert torch.equal(short, long[:, :9])


def test_bad_masks_and_options_are_named(pipe):
    video = _video(2, 7)
    mask = mask_from_given(7, [0, 6])
    with pytest.raises(ValueError, match=r"mask rows \[1\] differ from row 0: .*call it once per group of clips "
                                         r"with the same mask"):
        pipe.generate_long(video, torch.stack([mask, mask_from_given(7, [0])]), **KW)
    for bad in (mask[:5], mask.long(), mask[None].expand(3, -1), [True] * 7):
        with pytest.raises(ValueError, match=r"mask must be a \(7,\) or \(2, 7\) bool tensor \(True = generate\)"):
            pipe.generate_long(video, bad, **KW)
    with pytest.raises(ValueError, match="give at least one reference frame"):
        pipe.generate_long(video, torch.ones(7, dtype=torch.bool), **KW)
    with pytest.raises(ValueError, match="leave at least one frame to generate"):
        pipe.generate_long(video, torch.zeros(7, dtype=torch.bool), **KW)
    with pytest.raises(ValueError, match=r"context must be an integer in \[1, window - 1\] = \[1, 4\], got 5"):
        pipe.generate_long(video, mask, context=5, **KW)
    with pytest.raises(ValueError, match=r"window must be <= 5 \(the checkpoint's trained window\), got 7; "
                                         "generate_long goes window by window"):
        pipe.generate_long(video, mask, window=7, **KW)
    with pytest.raises(TypeError, match=r"generate_long\(\) takes window= .*not frames="):
        pipe.generate_long(video, mask, frames=5, **KW)
    with pytest.raises(ValueError, match="give at least one reference frame"):
        tasks.window_schedule(torch.ones(7, dtype=torch.bool), W)  # was "True is not in list"
    with pytest.raises(ValueError, match=r"mask must be a \(T,\) bool tensor \(True = generate\), got torch.bool \(1, 7\)"):
        tasks.window_schedule(mask[None], W)

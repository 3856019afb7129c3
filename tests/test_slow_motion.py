"""Slow motion on a batch: each clip's windows are put back in its own frames, as a call on the clip alone does."""

from __future__ import annotations

import pytest
import torch

from pipeline_helpers import SIDE, WINDOW, ckpts, one_thread, pipe  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_slow_motion_of_two_clips_with_several_windows_per_level_equals_each_clip_alone(pipe):
    """Factor 4 on 5 frames with a 5-frame window: 2 windows at the first level, 4 at the second, each level's
    windows in one batch of (windows x clips) rows."""
    video = torch.rand(2, 5, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, n, 3, H, W)
    kw = dict(factor=4, window=WINDOW, steps=2, progress=False)
    out = pipe.slow_motion(video, seed=3, **kw)  # (B, 17, 3, H, W)
    assert out.shape == (2, 17, 3, SIDE, SIDE)
    for b in range(2):
        assert torch.equal(out[b, ::4], video[b])  # the input frames at every 4th index, each in its own clip
        alone = pipe.slow_motion(video[b : b + 1], seed=3 + b, **kw)  # clip b has seed 3 + b
        torch.testing.assert_close(out[b : b + 1], alone, rtol=0, atol=1e-5)

"""Given frames under a lossy autoencoder: the pipeline returns the input pixels for them, not their decoding."""

from __future__ import annotations

import pytest
import torch

from mardini.autoencoders import SpaceToDepthAutoencoder
from pipeline_helpers import SIDE, WINDOW, ckpts, one_thread, pipe  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = torch.tensor([[False, True, True, True, False], [False, True, False, True, True]])  # (B, T) True = generated


class DimmingAutoencoder(SpaceToDepthAutoencoder):
    """Space-to-depth whose decoder dims every pixel by 10%: a round trip does not give the input back."""

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        return super().decode_frames(z) * 0.9  # (N, 3, H, W)


def test_given_frames_are_the_input_pixels_and_generated_ones_the_decoding_under_a_lossy_autoencoder(pipe):
    ae = pipe.autoencoder
    pipe.autoencoder = DimmingAutoencoder(ae.downsample, ae.scale, ae.chunk_size, ae.shift)
    video = torch.rand(2, WINDOW, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, T, 3, H, W)
    assert not torch.equal(pipe.decode(pipe.autoencoder.encode(video)), video)  # lossy
    out = pipe.generate(video, MASK, steps=2, seed=1, progress=False)  # (B, T, 3, H, W)
    assert torch.equal(out[~MASK], video[~MASK])
    z = pipe.generate_latents(video, MASK, steps=2, seed=1, progress=False)[0]  # (B, T, C, h, w)
    assert torch.equal(out[MASK], pipe.decode(z)[MASK])

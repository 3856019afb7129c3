"""Anchored targets (``model.anchor: nearest``): the generator diffuses each generated frame's change from its
nearest given frame, and sampling adds that frame back."""

from __future__ import annotations

import pytest
import torch

from mardini.diffusion.anchor import FrameAnchor, anchor_frames
from mardini.lit import GenerationModule, MarDiniModule
from mardini.pipeline import MarDiniPipeline
from pipeline_helpers import make_checkpoint, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = torch.tensor([[False, True, True, True, False], [True, True, False, True, True]])  # (B, T), True = generate


def _z(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, 3, 4, 4, generator=torch.Generator().manual_seed(seed))  # (B, T, C, h, w)


def test_anchor_is_the_nearest_given_frame_earlier_on_a_tie():
    z = _z()
    a = anchor_frames(z, MASK)
    for b, picks in enumerate(([0, 0, 0, 4, 4], [2, 2, 2, 2, 2])):  # frame 2 of row 0 is as near to 0 as to 4
        for t, src in enumerate(picks):
            assert torch.equal(a[b, t], z[b, src]), (b, t, src)


def test_target_is_the_scaled_change_and_maps_back_exactly():
    z = _z()
    anchor = FrameAnchor("nearest", scale=0.5)
    r = anchor.to_target(z, MASK)
    torch.testing.assert_close(r[0, 1], (z[0, 1] - z[0, 0]) / 0.5)
    torch.testing.assert_close(r[1, 4], (z[1, 4] - z[1, 2]) / 0.5)
    assert torch.equal(r[~MASK], z[~MASK])  # references stay the latents themselves
    back = anchor.from_target(r, z, MASK)
    torch.testing.assert_close(back, z)
    assert torch.equal(back[~MASK], z[~MASK])  # bit for bit


def test_none_is_the_identity():
    z, r = _z(0), _z(1)
    anchor = FrameAnchor()
    assert not anchor.enabled and anchor.to_target(z, MASK) is z
    assert torch.equal(anchor.from_target(r, z, MASK), torch.where(MASK[:, :, None, None, None], r, z))


@pytest.mark.parametrize("kw, words", [({"anchor": "previous"}, "model.anchor='previous' is impossible"),
                                       ({"anchor": "nearest", "anchor_scale": 0.0}, "model.anchor_scale=0.0")])
@pytest.mark.parametrize("cls", [GenerationModule, MarDiniModule])
def test_bad_settings_fail_at_construction(cls, kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
        cls(size="tiny", **kw)


def test_training_noises_the_change_not_the_frame():
    """On a still clip the change is zero: the generated frames' input is pure scaled noise, without the anchor
    the frame's own signal is in it."""
    still = _z()[:, :1].expand(2, 5, 3, 4, 4).contiguous()  # (B, T, C, h, w), every frame equal
    seen = {}
    for anchor in ("none", "nearest"):
        module = GenerationModule(size="tiny", frames=5, anchor=anchor)
        net = module.networks["generator"]

        def spy(z_t, t, plan, mask, self_cond=None, _anchor=anchor):
            seen[_anchor] = (z_t.detach().clone(), t.clone())
            return torch.zeros_like(z_t)

        net.forward = spy
        module.diffusion_loss(still, None, MASK, torch.Generator().manual_seed(0))
    (z_none, t), (z_near, _) = seen["none"], seen["nearest"]
    alpha, sigma = module.schedule.alpha_sigma(t)  # (B, 1, 1, 1, 1)
    noise = (z_near / sigma)[MASK]  # the same draw in both runs
    torch.testing.assert_close(z_none[MASK], (alpha * still + sigma * z_near / sigma)[MASK])
    assert noise.std() > 0.5 and torch.equal(z_near[~MASK], still[~MASK])


def test_a_network_that_predicts_no_change_repeats_the_nearest_given_frame(tmp_path):
    ckpt = make_checkpoint(tmp_path / "anchored.ckpt", kind="joint", model_args={"anchor": "nearest",
                                                                                 "anchor_scale": 0.7})
    pipe = MarDiniPipeline.from_checkpoint(ckpt)
    assert pipe.anchor.anchor == "nearest" and pipe.anchor.scale == 0.7 and pipe.info["anchor"] == "nearest"
    video = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z, _, m = pipe.generate_latents(video, MASK, steps=3, progress=False)
    assert not torch.allclose(z[m], anchor_frames(z, m)[m])  # the trained network moves things
    pipe.generator.forward = lambda z_t, t, plan, mask, cache=None, self_cond=None: _no_change(pipe, z_t, t)
    z, _, m = pipe.generate_latents(video, MASK, steps=3, progress=False)
    torch.testing.assert_close(z, anchor_frames(z, m), rtol=0, atol=1e-5)


def _no_change(pipe, z_t, t):
    """The velocity whose x0 estimate is 0: ``v = alpha / sigma z_t`` (a zero change from the anchor)."""
    alpha, sigma = pipe.schedule.alpha_sigma(t)
    return alpha / sigma * z_t


def test_pixel_stats_measure_the_anchor_scale_as_training_sees_the_change(tmp_path):
    """``anchor_scale`` = the std of the normalised latents' change from the nearest given frame."""
    from mardini.autoencoders.pixel import SpaceToDepthAutoencoder
    from mardini.autoencoders.pixel_stats import main
    from mardini.data.datamodule import first_clips
    from mardini.data.testing import tiny_synthetic
    from mardini.masking import MaskSampler

    root = tiny_synthetic(tmp_path / "synth")
    args = ["--shards", str(root / "train"), "--clips", "6", "--frames", "4", "--resolution", "8"]
    stats = main(args + ["--anchor-keep-ratio", "0.25", "0.5"])
    assert "anchor_scale" not in main(args)
    video = first_clips(str(root / "train"), 6, frames=4, resolution=8, fps=8.0)  # (6, 4, 3, 8, 8)
    z = SpaceToDepthAutoencoder(2, scale=stats["scale"], shift=stats["shift"]).encode(video).double()
    mask, _ = MaskSampler((0.25, 0.5)).sample(6, 4, torch.Generator().manual_seed(0))  # the command's masks
    change = FrameAnchor("nearest").to_target(z, mask)[mask]  # (n, C, h, w)
    assert 0.05 < stats["anchor_scale"] < 2
    assert abs(float(change.std(unbiased=False)) - stats["anchor_scale"]) < 1e-3 * stats["anchor_scale"]


def test_a_stage_refuses_a_generator_trained_on_another_target(tmp_path):
    plain = make_checkpoint(tmp_path / "plain.ckpt", kind="generation")
    anchored = make_checkpoint(tmp_path / "anchored.ckpt", kind="generation",
                               model_args={"anchor": "nearest", "anchor_scale": 0.7})
    MarDiniModule(size="tiny", frames=5, generator_ckpt=str(plain))  # the paper's target on both sides
    GenerationModule(size="tiny", frames=5, init_from=str(plain), anchor_scale=0.5)  # no anchor: the scale is unused
    MarDiniModule(size="tiny", frames=5, generator_ckpt=str(anchored), anchor="nearest", anchor_scale=0.7)
    with pytest.raises(ValueError, match=r"trained with anchor='nearest', anchor_scale=0.7, this stage has "
                                         r"anchor='none'.*set model.init_args.anchor"):
        MarDiniModule(size="tiny", frames=5, generator_ckpt=str(anchored))
    with pytest.raises(ValueError, match=r"anchor_scale=1.0.*set model.init_args.anchor"):
        GenerationModule(size="tiny", frames=5, init_from=str(plain), anchor="nearest")

"""``model.loss_reduction``: ``clip`` (the default) averages each clip's generated elements, then the clips;
``element`` (the paper's form) averages every generated element of the batch, so clips with more generated frames
weigh more. The 2-process gradient of ``element`` is in tests/test_ddp.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mardini.lit import GenerationModule, MarDiniModule, PlanningModule
from mardini.masking import MaskSampler

T = 6
GENERATED = (1, 3, 5)  # generated frames of each clip: uneven, so the two reductions differ


class FixedMasks(MaskSampler):
    """Clip ``i`` generates its last ``GENERATED[i]`` frames (template ``random``)."""

    def sample(self, batch: int, frames: int, generator: torch.Generator | None = None):
        generated = torch.tensor(GENERATED[:batch])  # (B,)
        mask = torch.arange(frames) >= frames - generated[:, None]  # (B, T)
        return mask, torch.zeros(batch, dtype=torch.long)


def _module(cls, monkeypatch, **kwargs):
    """A tiny stage drawing :class:`FixedMasks`, its ``log`` calls recorded in ``module.logged``."""
    extra = {"plan_recon_weight": 0.5} if cls is MarDiniModule else {}
    torch.manual_seed(0)
    module = cls(size="tiny", planner_resolution=16, generator={"depth": 1}, planner={"depth": 1},
                 **extra, **kwargs)
    module.mask_sampler = FixedMasks()
    module.logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: module.logged.__setitem__(
        name, float(torch.as_tensor(value).detach())))
    return module


def _batch() -> dict:
    video = torch.rand(len(GENERATED), T, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return {"video": video}  # (B, T, 3, H, W) in [-1, 1]


def test_element_is_the_mean_over_every_generated_element_and_clip_the_mean_of_the_clips_means(monkeypatch):
    """The planner warm-up's regression by hand: the squared errors of the generated frames, averaged over all of
    them (``element``), or per clip and then over the clips (``clip``)."""
    batch = _batch()
    element = _module(PlanningModule, monkeypatch, loss_reduction="element")
    clip = _module(PlanningModule, monkeypatch)
    z_low = element.latents_low(batch)  # (B, T, C, h', w')
    mask, _ = FixedMasks().sample(len(GENERATED), T)  # (B, T)
    with torch.no_grad():
        planner = element.networks["planner"]
        err = (planner.project(planner(z_low, mask), size=tuple(z_low.shape[-2:])) - z_low) ** 2  # (B, T, C, h', w')
    by_hand_element = err[mask].mean()  # over the 1 + 3 + 5 generated frames' elements
    by_hand_clip = torch.stack([err[b][mask[b]].mean() for b in range(len(GENERATED))]).mean()
    got_element, got_clip = (module.training_step(batch, 0).detach() for module in (element, clip))
    print(f"element {float(got_element):.6f} (by hand {float(by_hand_element):.6f}), "
          f"clip {float(got_clip):.6f} (by hand {float(by_hand_clip):.6f})")
    torch.testing.assert_close(got_element, by_hand_element, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_clip, by_hand_clip, rtol=1e-5, atol=0)
    assert abs(float(got_element - got_clip)) > 1e-3 * float(got_clip)  # the reductions differ here
    # train/loss stays the per-clip mean under either; element logs its own mean beside it
    assert element.logged["train/loss"] == pytest.approx(float(by_hand_clip), rel=1e-5)
    assert element.logged["train/loss_element"] == pytest.approx(float(by_hand_element), rel=1e-5)
    assert "train/loss_element" not in clip.logged


@pytest.mark.parametrize("cls", [GenerationModule, PlanningModule, MarDiniModule])
def test_every_stage_weighs_its_clips_by_their_generated_frames(cls, monkeypatch):
    """Each stage's compute_loss gives the generated frames per clip; element weighs the per-clip losses by them
    (the joint stage's diffusion and plan-reconstruction terms alike: both average the same generated frames)."""
    module = _module(cls, monkeypatch, loss_reduction="element")
    batch = _batch()
    per_clip = module.compute_loss(batch, module.step_generator(0), train=True)  # (B,): training_step's draws
    assert module._last_generated.tolist() == list(GENERATED)
    weights = torch.tensor(GENERATED, dtype=torch.float32)  # (B,)
    torch.testing.assert_close(module.training_step(batch, 0), (per_clip * weights).sum() / weights.sum())


@pytest.mark.parametrize("cls", [GenerationModule, PlanningModule, MarDiniModule])
def test_the_default_clip_reduction_is_the_plain_per_clip_mean_bit_for_bit(cls, monkeypatch):
    module = _module(cls, monkeypatch)
    assert module.hparams.loss_reduction == "clip"
    batch = _batch()
    per_clip = module.compute_loss(batch, module.step_generator(0), train=True)  # (B,)
    assert torch.equal(module.training_step(batch, 0), per_clip.mean())
    assert "train/loss_element" not in module.logged


def test_element_refuses_gradient_accumulation_at_the_fit_s_start_and_at_a_step():
    module = PlanningModule(size="tiny", planner_resolution=16, loss_reduction="element")
    module._trainer = SimpleNamespace(datamodule=None, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="model.loss_reduction=element with trainer.accumulate_grad_batches=2.*"
                                         "accumulate_grad_batches: 1.*or model.loss_reduction: clip"):
        module.setup("fit")
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        module.training_step(_batch(), 0)  # a callback that raised it during the fit
    module._trainer = None
    clip = PlanningModule(size="tiny", planner_resolution=16)
    clip._trainer = SimpleNamespace(datamodule=None, accumulate_grad_batches=2)
    clip.setup("fit")  # clip accumulates as before
    clip._trainer = None


def test_a_compute_loss_that_does_not_count_the_generated_frames_is_named(monkeypatch):
    module = _module(PlanningModule, monkeypatch, loss_reduction="element")
    monkeypatch.setattr(module, "compute_loss", lambda batch, gen, train: setattr(
        module, "_last_template", torch.zeros(3, dtype=torch.long)) or torch.ones(3))
    with pytest.raises(ValueError, match=r"PlanningModule.compute_loss did not set self._last_generated.*mask.sum\(1\)"):
        module.training_step(_batch(), 0)

"""``model.loss_reduction``: ``clip`` (the default) averages each clip's generated elements, then the clips;
``element`` (the paper's form) averages every generated element of the batch, so clips with more generated frames
weigh more, over every micro-batch of a gradient-accumulation window. The 2-process gradient of ``element`` is in
tests/test_ddp.py."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from mardini.lit import GenerationModule, MarDiniModule, PlanningModule
from mardini.lit.batch_weight import ElementWindow
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


def test_element_is_refused_only_where_the_strategy_accumulates_by_itself():
    """DeepSpeed's strategy accumulates inside its engine, which leaves no window end to rescale at."""
    module = PlanningModule(size="tiny", planner_resolution=16, loss_reduction="element")
    module._trainer = SimpleNamespace(datamodule=None, accumulate_grad_batches=2,
                                      strategy=SimpleNamespace(handles_gradient_accumulation=False,
                                                               root_device=torch.device("cpu")))
    module.setup("fit")  # DDP, FSDP, one device: accumulates
    module._trainer.strategy = type("DeepSpeedLike", (), {"handles_gradient_accumulation": True,
                                                           "root_device": torch.device("cpu")})()
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 under DeepSpeedLike, which accumulates the "
                                         "gradients itself.*or model.loss_reduction: clip"):
        module.setup("fit")
    module._trainer = None


# --------------------------------------------------------------------------------------------------
# element under gradient accumulation: 2 micro-batches of 2 clips train like one batch of 4
# --------------------------------------------------------------------------------------------------
WINDOW = (1, 3, 5, 2)  # generated frames of clips 0-3: micro-batch 0 generates 4 frames, micro-batch 1 7


class QueuedMasks(MaskSampler):
    """Clip after clip of the fit, the last ``WINDOW[i]`` frames generated, however the clips are batched."""

    def __init__(self) -> None:
        super().__init__()
        self.queue = list(WINDOW)

    def sample(self, batch: int, frames: int, generator: torch.Generator | None = None):
        generated = torch.tensor(self.queue[:batch])  # (B,)
        del self.queue[:batch]
        mask = torch.arange(frames) >= frames - generated[:, None]  # (B, T)
        return mask, torch.zeros(batch, dtype=torch.long)


class RecordStepGradients(L.Callback):
    """The gradients the optimiser stepped with (plain SGD leaves them as they were), at each window's end."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.grads = {n: p.grad.clone() for n, p in pl_module.networks.named_parameters() if p.grad is not None}


class NormBeforeStep(L.Callback):
    """A user's gradient-norm logger: the norm of the gradients its own ``on_before_optimizer_step`` sees."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.norms.append(_norm({n: p.grad for n, p in pl_module.networks.named_parameters() if p.grad is not None}))


def _step_gradients(batch: int, accumulate: int, clip: float | None = None, plugins: list | None = None,
                    callbacks: list[L.Callback] = ()) -> dict[str, torch.Tensor]:
    """The gradients of one ``element`` optimiser step on the 4 clips of :data:`WINDOW`, in ``4 / batch`` batches
    accumulated ``accumulate`` at a time, clipped to the norm ``clip``, under the trainer's ``plugins``, with the
    ``callbacks`` besides."""
    torch.manual_seed(0)
    module = PlanningModule(size="tiny", planner_resolution=16, planner={"depth": 1}, loss_reduction="element")
    module.mask_sampler = QueuedMasks()
    module.configure_optimizers = lambda: torch.optim.SGD(module.networks.parameters(), lr=0.1)
    video = torch.rand(len(WINDOW), T, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (4, T, ...)
    batches = [{"video": video[i : i + batch]} for i in range(0, len(WINDOW), batch)]
    record = RecordStepGradients()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
                        plugins=plugins, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[record, *callbacks])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert not module.mask_sampler.queue  # every clip trained
    return record.grads


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))


def _assert_same_gradient(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert got.keys() == want.keys() and len(want) > 0
    for k in want:  # tol of each tensor's largest entry
        scale = float(want[k].abs().max())
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol * scale, msg=lambda m, k=k: f"{k}: {m}")


def test_element_window_counts_by_hand():
    """Micro-batches of 4 and 7 generated frames (all ranks'): both losses divide by 4, the gradient by 11 / (2 x 4)."""
    window = ElementWindow(step=0)
    assert float(window.add(torch.tensor(4.0))) == 4.0
    assert float(window.add(torch.tensor(7.0))) == 4.0  # the first micro-batch's count
    assert float(window.gradient_factor(2)) == pytest.approx(8 / 11)
    assert float(window.rank_mean(torch.tensor([2.0, 1.0]), torch.tensor([1, 3]))) == pytest.approx(5 / 4)
    assert float(window.rank_mean(torch.tensor([4.0]), torch.tensor([2]))) == pytest.approx(13 / 6)
    assert float(ElementWindow(step=0).add(torch.tensor(0.0))) == 1.0  # a micro-batch that generates nothing


def test_element_with_accumulation_2_x_batch_2_gives_the_gradient_of_one_batch_of_4():
    """Micro-batches of 4 and 7 generated frames: Lightning's mean of the two micro-batch losses would weigh a
    frame of the first 7/4 as much as one of the second; the window's rescale makes it the mean over all 11."""
    one = _step_gradients(batch=4, accumulate=1)
    two = _step_gradients(batch=2, accumulate=2)
    print(f"gradient norm: one batch {_norm(one):.6g}, two micro-batches {_norm(two):.6g}")
    _assert_same_gradient(two, one)


def test_a_callback_s_on_before_optimizer_step_sees_the_window_s_rescaled_gradient():
    """The window's rescale runs when its last micro-batch's backward has returned, before any
    on_before_optimizer_step: a callback's gradient norm there is the one-batch step's. Before, the module rescaled in
    its own on_before_optimizer_step, which Lightning calls after the callbacks': they saw the gradient 8/11 too
    large here (micro-batches of 4 and 7 generated frames, both divided by 4)."""
    seen = {b: NormBeforeStep() for b in (4, 2)}
    for b, callback in seen.items():
        _step_gradients(batch=b, accumulate=4 // b, callbacks=[callback])
    assert len(seen[2].norms) == 1
    assert seen[2].norms == pytest.approx(seen[4].norms, rel=1e-6)


def test_element_with_accumulation_clips_the_rescaled_gradient():
    """Lightning clips after on_before_optimizer_step, and the window's gradients are rescaled before it: clipping
    sees the step's gradient (rescaling after it would leave the norm 8/11 of the clip value here)."""
    clip = 0.5 * _norm(_step_gradients(batch=4, accumulate=1))
    one = _step_gradients(batch=4, accumulate=1, clip=clip)
    two = _step_gradients(batch=2, accumulate=2, clip=clip)
    assert _norm(one) == pytest.approx(clip, rel=1e-5)
    _assert_same_gradient(two, one)


def test_element_with_accumulation_under_16_mixed_s_grad_scaler():
    """``16-mixed``: the rescale multiplies the scaled gradients right after the window's last backward, and Lightning
    unscales them after it (both linear: the same gradient; an inf/NaN stays one for the scaler's check). On CPU with fp16 autocast and a CPU GradScaler, the
    plugin a GPU's 16-mixed runs; fp16 rounds each batching differently, so to 5e-3 (without the rescale: 27 %)."""
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2)]
    one, two = (_step_gradients(batch=b, accumulate=4 // b, plugins=[MixedPrecision("16-mixed", "cpu", scaler=s)])
                for b, s in zip((4, 2), scalers))
    assert [s.get_scale() for s in scalers] == [2.0**12] * 2  # no overflow: both steps were taken
    _assert_same_gradient(two, one, tol=5e-3)


def test_a_compute_loss_that_does_not_count_the_generated_frames_is_named(monkeypatch):
    module = _module(PlanningModule, monkeypatch, loss_reduction="element")
    monkeypatch.setattr(module, "compute_loss", lambda batch, gen, train: setattr(
        module, "_last_template", torch.zeros(3, dtype=torch.long)) or torch.ones(3))
    with pytest.raises(ValueError, match=r"PlanningModule.compute_loss did not set self._last_generated.*mask.sum\(1\)"):
        module.training_step(_batch(), 0)

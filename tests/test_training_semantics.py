"""What a training step means, checked on the tiny size: the loss reads generated frames only, the plan dropout rate
(train only), per-step randomness, and an EMA that follows the raw weights while validation reads it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.lit import GenerationModule, MarDiniModule

FRAMES = 5


def _video(b: int, seed: int = 3) -> dict:
    return {"video": torch.rand(b, FRAMES, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1}


def test_the_diffusion_loss_ignores_what_the_generator_says_on_given_frames():
    """Eq. 1: only generated ([NOISE]) frames enter the loss; a wild output on reference frames changes nothing."""
    torch.manual_seed(0)
    module = GenerationModule(size="tiny", frames=FRAMES)
    batch = _video(2)
    with torch.no_grad():
        clean = module.compute_loss(dict(batch), torch.Generator().manual_seed(7), True)  # (B,)

    def wild_on_references(_mod, args, kwargs, out):
        mask = args[3]  # (B, T) True = generated
        return torch.where(mask[:, :, None, None, None], out, out + 1e3)

    handle = module.networks["generator"].register_forward_hook(wild_on_references, with_kwargs=True)
    try:
        with torch.no_grad():
            wild = module.compute_loss(dict(batch), torch.Generator().manual_seed(7), True)
    finally:
        handle.remove()
    torch.testing.assert_close(wild, clean)


def _null_plan_rows(module: MarDiniModule, train: bool, b: int) -> int:
    seen = {}
    orig = module.diffusion_loss

    def spy(z_high, plan, mask, generator, weighted=True):
        seen["plan"] = plan
        return orig(z_high, plan, mask, generator, weighted)

    module.diffusion_loss = spy
    with torch.no_grad():
        module.compute_loss(_video(b), torch.Generator().manual_seed(1), train)
    plan = seen["plan"]
    null = module.networks["generator"].null_plan(*plan.shape[:3]).to(plan)
    return int((plan == null).flatten(1).all(1).sum())


def test_plan_dropout_replaces_about_its_share_of_plans_in_training_and_none_in_validation():
    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=FRAMES, planner_resolution=16, plan_dropout=0.25,
                           generator={"depth": 1}, planner={"depth": 1})
    b = 40
    dropped = _null_plan_rows(module, True, b)
    assert 0 < dropped < b // 2, dropped  # ~10 of 40 expected; the paper's CFG needs the null branch rarely
    assert _null_plan_rows(module, False, b) == 0  # validation loss is conditional on the plan


def test_the_planner_trains_on_the_low_resolution_copy_that_the_latent_cache_and_sampling_give_it():
    """On the pixel path the planner's latents are the ``planner_resolution`` copy's, bit for bit what the latent
    cache stores as ``z_low`` and what the pipeline's planner reads (not the full-resolution latents)."""
    from mardini.data.latent_cache import encode_pair
    from mardini.pipeline import MarDiniPipeline

    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=FRAMES, planner_resolution=16, generator={"depth": 1},
                           planner={"depth": 1})
    mask = torch.tensor([False, True, True, True, False]).expand(2, -1)  # (B, T) True = generated
    video = _video(2)["video"] * ~mask[..., None, None, None]  # (B, T, 3, 32, 32), masked frames zero as in sampling
    z_low = module.latents_low({"video": video})  # (B, T, C, h', w')
    ae = module.autoencoder
    assert z_low.shape == (2, FRAMES, ae.latent_channels, 16 // ae.downsample, 16 // ae.downsample)
    assert torch.equal(z_low, encode_pair(ae, video, 16)[1])
    pipe = MarDiniPipeline(module.networks["generator"], ae, module.networks["planner"], planner_resolution=16,
                           window=FRAMES)
    seen = []
    pipe.planner.register_forward_pre_hook(lambda _mod, args: seen.append(args[0]))  # args[0]: z_low
    pipe.plan(video, mask)
    assert len(seen) == 1 and torch.equal(seen[0], z_low)


def test_every_training_step_draws_new_randomness():
    module = GenerationModule(size="tiny", generator={"depth": 1})
    a, b = (torch.rand(8, generator=module.step_generator(step)) for step in (0, 1))
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.rand(8, generator=module.step_generator(0)))  # and resumably the same per step


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("synth"), train=12, val=2, frames=12, size=16)


def test_the_ema_follows_the_raw_weights_and_validation_reads_it(synth, tmp_path):
    model = GenerationModule(size="tiny", planner_resolution=8, lr=1e-2, ema_decay=0.5, ema_warmup=False,
                             generator={"depth": 1})
    start = {k: v.clone() for k, v in model.ema.module.state_dict().items()}
    seen = {}

    class InValidation(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["val"] = {k: v.clone() for k, v in pl_module.networks.state_dict().items()}

    dm = VideoDataModule(train_shards=str(synth / "train"), val_shards=str(synth / "val"), frames=4, fps=8,
                         resolution=16, batch_size=2, num_workers=0, shuffle_buffer=4, epoch_size=100, val_clips=2)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
                        val_check_interval=3, callbacks=[InValidation()])
    trainer.fit(model, datamodule=dm)
    ema = model.ema.module.state_dict()
    raw = model.networks.state_dict()
    floats = [k for k, v in ema.items() if v.is_floating_point()]
    moved = [k for k in floats if not torch.equal(ema[k], start[k])]
    assert moved, "the EMA never moved from its initial weights: sampling would use untrained networks"
    assert any(not torch.equal(ema[k], raw[k]) for k in floats)  # decay 0.5: it lags the raw weights
    assert all(torch.equal(seen["val"][k], ema[k]) for k in floats)  # validation ran on the EMA weights

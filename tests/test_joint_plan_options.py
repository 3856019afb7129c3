"""Joint-stage options that make the generator read the plan: the kept reconstruction loss, training only some layers."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mardini.diffusion.loss import masked_mse_per_sample
from mardini.lit import MarDiniModule
from mardini.pipeline.loading import load_checkpoint


def _module(weight: float) -> MarDiniModule:
    torch.manual_seed(0)
    return MarDiniModule(size="tiny", frames=5, planner_resolution=16, plan_dropout=0.0, plan_recon_weight=weight)


def _batch() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"video": torch.rand(2, 5, 3, 32, 32, generator=g) * 2 - 1}  # (B, T, 3, H, W)


def test_the_head_is_dropped_by_default_and_kept_with_a_weight():
    assert _module(0.0).networks["planner"].head is None
    assert _module(0.5).networks["planner"].head is not None


def test_loss_adds_the_weighted_masked_reconstruction_and_trains_the_head():
    with_recon, paper = _module(2.0), _module(0.0)
    state = {k: v for k, v in with_recon.networks.state_dict().items() if ".head." not in k}
    paper.networks.load_state_dict(state)  # same planner and generator, no head
    batch = _batch()
    loss = with_recon.compute_loss(dict(batch), torch.Generator().manual_seed(7), True)  # (B,)
    base = paper.compute_loss(dict(batch), torch.Generator().manual_seed(7), True)  # (B,)

    z_low = with_recon.latents_low(dict(batch))  # (B, T, C, h', w')
    mask, _ = with_recon.mask_sampler.sample(2, 5, torch.Generator().manual_seed(7))  # the draw compute_loss made
    planner = with_recon.networks["planner"]
    with torch.no_grad():
        recon = planner.project(planner(z_low, mask), size=tuple(z_low.shape[-2:]))  # (B, T, C, h', w')
    expected = base.detach() + 2.0 * masked_mse_per_sample(recon.float(), z_low, mask)  # (B,)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    loss.mean().backward()
    assert planner.head.weight.grad is not None and planner.head.weight.grad.abs().sum() > 0


def _validate(module: MarDiniModule, batches: dict[int, dict], monkeypatch, other_rank=None) -> dict[str, float]:
    """What one validation epoch over ``{batch_idx: batch}`` logs. ``other_rank``: a second rank's summed tensors by
    shape, added by a stand-in of the strategy's sum reduction (two ranks' validation)."""
    from types import SimpleNamespace

    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    module.on_validation_epoch_start()
    for i, batch in batches.items():
        module.validation_step(dict(batch), i)
    if other_rank is not None:
        reduce = lambda t, reduce_op: t + other_rank[tuple(t.shape)] if reduce_op == "sum" else None  # noqa: E731
        module._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))
    module.on_validation_epoch_end()
    module._trainer = None
    return logged


def test_the_parts_of_a_joint_stage_s_loss_are_logged_in_training_and_validation(monkeypatch):
    """With plan_recon_weight > 0 the joint stage's val/loss (and train/loss) is the diffusion loss plus the weighted
    reconstruction loss of the planner's head, not comparable with a generator warm-up's, and validation logged
    neither part. val/loss stays that sum; val/diffusion_loss (the val/loss of the same networks without the head's
    term) and val/plan_recon_loss are the parts, means over every rank's clips reduced as val/loss is; train logs
    train/diffusion_loss beside train/plan_recon_loss."""

    batches = {i: {"video": torch.rand(b, 5, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1}
               for i, b in enumerate([2, 1, 3])}  # (B, T, 3, H, W)
    with_recon, paper = _module(2.0), _module(0.0)
    state = {k: v for k, v in with_recon.networks.state_dict().items() if ".head." not in k}
    for target in (paper.networks, paper.ema.module):  # validation scores the EMA weights
        target.load_state_dict(state)
    logged, without = _validate(with_recon, batches, monkeypatch), _validate(paper, batches, monkeypatch)
    assert logged["val/loss"] == pytest.approx(logged["val/diffusion_loss"] + 2.0 * logged["val/plan_recon_loss"])
    assert logged["val/diffusion_loss"] == pytest.approx(without["val/loss"]) and logged["val/plan_recon_loss"] > 0
    assert "val/plan_recon_loss" not in without  # no head, no term

    with_recon.on_validation_epoch_start()  # as a second rank: batches 1 and 2 (the first rank: batch 0)
    for i in (1, 2):
        with_recon.validation_step(dict(batches[i]), i)
    sums = {tuple(t.shape): t for t in (with_recon._val_template_sums, with_recon._val_part_sums)}  # what it reduces
    assert len(sums) == 2
    assert _validate(with_recon, {0: batches[0]}, monkeypatch, other_rank=sums) == pytest.approx(logged)

    from mardini.lit.base import MarDiniBase

    trained: dict[str, float] = {}
    monkeypatch.setattr(with_recon, "log", lambda name, value, **kw: trained.__setitem__(name, float(value)))
    monkeypatch.setattr(MarDiniBase, "_log_train", lambda *a: None)  # the base's logs need a Trainer
    per_sample = with_recon.compute_loss(dict(batches[0]), torch.Generator().manual_seed(7), True)  # (B,)
    assert not trained  # compute_loss logs nothing (it runs outside a fit too); the training step's logs do
    with_recon._log_train(dict(batches[0]), per_sample, per_sample.mean())
    loss = per_sample.mean()  # train/loss
    assert float(loss) == pytest.approx(trained["train/diffusion_loss"] + 2.0 * trained["train/plan_recon_loss"])


def test_negative_weight_is_refused():
    with pytest.raises(ValueError, match=r"model\.plan_recon_weight=-1.0 is impossible: it must be >= 0"):
        MarDiniModule(size="tiny", plan_recon_weight=-1.0)


def test_a_checkpoint_trained_with_the_head_samples_without_it(tmp_path):
    module = _module(1.0)
    clips = [{"video": v} for v in _batch()["video"]]  # (T, 3, H, W) each
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(clips, batch_size=2))
    path = tmp_path / "joint_recon.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_checkpoint(path)
    assert loaded.planner is not None and loaded.planner.head is None
    own = {k: v for k, v in module.ema.module["planner"].state_dict().items() if not k.startswith("head.")}
    for key, value in loaded.planner.state_dict().items():
        torch.testing.assert_close(value, own[key])


PLAN_PATH = ["planner.*", "generator.plan_embed.*", "generator.blocks.*.cross.*"]


def test_train_only_freezes_the_rest_and_a_step_moves_only_the_chosen_layers():
    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16, plan_dropout=0.0, warmup_steps=0,
                           train_only=PLAN_PATH)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised output layers would stop every gradient on the first step
        for p in module.networks.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    trainable = {n for n, p in module.networks.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("planner.", "generator.plan_embed.")) or ".cross." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in module.networks.named_parameters()}
    for frozen in ("generator.blocks.0.mlp.fc1.weight", "generator.embed.weight", "generator.blocks.0.temporal.qkv_proj.weight"):
        assert frozen in before and frozen not in trainable
    clips = [{"video": v} for v in _batch()["video"]]  # (T, 3, H, W) each
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(clips, batch_size=2))
    moved = {n for n, p in module.networks.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= trainable
    assert "generator.blocks.0.cross.kv_proj.weight" in moved and "planner.blocks.0.attn.qkv_proj.weight" in moved


def test_train_only_names_a_pattern_that_matches_nothing():
    with pytest.raises(ValueError, match=r"model\.train_only=.*'generator\.cross\.\*'.* matches no parameter"):
        MarDiniModule(size="tiny", train_only=["planner.*", "generator.cross.*"])


def test_plan_usage_sees_a_plan_blind_generator_and_one_that_reads_the_plan(tmp_path):
    from mardini.evaluation.plan_usage import plan_usage
    from mardini.pipeline.pipeline import MarDiniPipeline
    from mardini.testing import make_checkpoint

    pipe = MarDiniPipeline.from_checkpoint(make_checkpoint(tmp_path / "joint.ckpt", frames=5, size=16))
    video = torch.rand(3, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, T, 3, H, W)
    reads = plan_usage(pipe, video)
    assert reads["velocity_change_null"] > 1e-3 and reads["velocity_change_other_clip"] > 1e-3
    with torch.no_grad():  # cut every path from the plan into the generator
        pipe.generator.plan_embed.fc2.weight.zero_()
        pipe.generator.plan_embed.fc2.bias.zero_()
        for block in pipe.generator.blocks:
            block.cross.proj.weight.zero_()
            block.cross.proj.bias.zero_()
    blind = plan_usage(pipe, video)
    assert blind["velocity_change_null"] < 1e-6 and blind["velocity_change_other_clip"] < 1e-6
    assert blind["midf_psnr_plan"] == pytest.approx(blind["midf_psnr_null"], abs=1e-4)


def test_planner_head_quality_reports_objects_found_and_the_low_resolution_ceiling(tmp_path):
    from mardini.data.datamodule import first_batch
    from mardini.data.testing import tiny_synthetic
    from mardini.evaluation.plan_usage import found_share, planner_head_quality
    from mardini.lit import PlanningModule
    from mardini.masking import interpolation_mask

    shards = tiny_synthetic(tmp_path / "synth", train=2, val=6, frames=12, size=64) / "val"
    batch = first_batch(str(shards), 6, frames=9, resolution=64, fps=None)
    video, positions = batch["video"], batch["positions"]  # (B, 9, 3, 64, 64), (B, 9, K, 2)
    mask = interpolation_mask(9)[None].expand(video.shape[0], -1)  # (B, T)
    assert found_share(video, video, positions, mask) == 1.0  # the truth: every object found
    assert found_share(torch.zeros_like(video), video, positions, mask) == 0.0  # a blank frame: none
    result = planner_head_quality(PlanningModule(size="tiny", frames=9, planner_resolution=16), video, positions)
    assert 0.0 <= result["found_head_upsampled"] < 0.5  # an untrained head draws no crisp object
    assert 0.0 < result["found_truth_at_planner_resolution"] < 1.0  # 16 px blurs some objects away, not all
    assert "found_head_upsampled" not in planner_head_quality(PlanningModule(size="tiny", frames=9), video)


def test_plan_usage_counts_the_objects_restored_from_the_noised_truth(tmp_path):
    from mardini.data.datamodule import first_batch
    from mardini.data.testing import tiny_synthetic
    from mardini.evaluation.plan_usage import plan_usage
    from mardini.pipeline.pipeline import MarDiniPipeline
    from mardini.testing import make_checkpoint

    shards = tiny_synthetic(tmp_path / "synth", train=2, val=4, frames=12, size=32) / "val"
    batch = first_batch(str(shards), 4, frames=5, resolution=32, fps=None)
    pipe = MarDiniPipeline.from_checkpoint(make_checkpoint(tmp_path / "joint.ckpt", frames=5, size=32))
    near_clean = plan_usage(pipe, batch["video"], t=1e-3, positions=batch["positions"])
    assert near_clean["found_plan"] > 0.9 and near_clean["found_null"] > 0.9  # almost the truth itself
    from_noise = plan_usage(pipe, batch["video"], t=1.0, positions=batch["positions"])
    assert from_noise["found_plan"] < 0.5  # an untrained generator draws no object from noise
    assert "found_plan" not in plan_usage(pipe, batch["video"])
    # by object area: the near-clean prediction keeps every size; the planner's low resolution blurs small ones away
    assert all(v > 0.9 for v in near_clean["found_plan_by_size"].values())
    low = near_clean["found_truth_at_planner_resolution_by_size"]
    assert set(low) == set(near_clean["found_plan_by_size"]) and low["0-20"] < 0.5


def test_the_generator_plan_dim_follows_a_wider_planner_through_a_step_and_a_checkpoint(tmp_path):
    """planner.dim alone widens the plan: the generator reads it (plan_dim defaults to it), in training and loading."""
    from mardini.testing import make_checkpoint

    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16, planner={"dim": 256},
                           generator={"dim": 256})
    assert module.networks["generator"].cfg.plan_dim == 256
    loss = module.compute_loss(_batch(), torch.Generator().manual_seed(7), True)  # (B,)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    ckpt = make_checkpoint(tmp_path / "wide.ckpt", "joint", model_args={"planner": {"dim": 256}})
    assert load_checkpoint(ckpt).generator.cfg.plan_dim == 256


def test_a_plan_dim_other_than_the_planner_dim_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"model\.init_args\.generator\.plan_dim=128 differs from the planner's dim "
                                         r"256 \(model\.init_args\.planner\.dim\)"):
        MarDiniModule(size="tiny", planner={"dim": 256}, generator={"plan_dim": 128})
    with pytest.raises(ValueError, match=r"generator\.plan_dim=256 differs from the planner's dim 128 \(size 'tiny'\)"):
        MarDiniModule(size="tiny", generator={"plan_dim": 256})


def test_a_generation_warm_up_builds_the_plan_dim_its_joint_stage_will_read():
    from mardini.lit import GenerationModule

    warm = GenerationModule(size="tiny", planner={"dim": 256})  # the planner of the later joint stage
    assert warm.networks["generator"].cfg.plan_dim == 256
    free = GenerationModule(size="tiny", generator={"plan_dim": 64})  # no planner here: any width is the user's
    assert free.networks["generator"].cfg.plan_dim == 64


def test_plan_usage_cli_reads_clips_at_the_checkpoints_height_and_width(tmp_path, monkeypatch):
    """--checkpoint: a 16x32 checkpoint's clips are 16x32; --planning: --resolution takes N or HxW."""
    import mardini.evaluation.plan_usage as plan_usage
    from mardini.testing import make_checkpoint

    sizes = []

    def heldout(n, frames, size, fps):
        sizes.append(size)
        h, w = (size, size) if isinstance(size, int) else size
        return {"video": torch.rand(n, frames, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1}

    monkeypatch.setattr(plan_usage, "heldout_clips", heldout)
    joint = make_checkpoint(tmp_path / "joint.ckpt", frames=5, size=(16, 32))  # records its 16x32 as train.py does
    assert "velocity_change_null" in plan_usage.main(["--checkpoint", str(joint), "--clips", "2"])
    planning = make_checkpoint(tmp_path / "planning.ckpt", "planning", frames=5, size=(16, 32))
    plan_usage.main(["--planning", str(planning), "--clips", "2", "--frames", "5", "--resolution", "16x32"])
    plan_usage.main(["--planning", str(planning), "--clips", "2", "--frames", "5", "--resolution", "32"])
    assert sizes == [(16, 32), (16, 32), 32]  # the square case as before: a side
    with pytest.raises(SystemExit):
        plan_usage.main(["--planning", str(planning), "--resolution", "16x"])


def test_plan_usage_draws_each_clip_s_noise_alone_so_its_figures_do_not_depend_on_the_batch_size(tmp_path):
    """plan_usage's noise is drawn per clip (evaluate.py's seed of clip k), and the networks run batch_size clips at
    a time: batches of 2 and of 4 give the same figures, and a clip's noise is the same however many clips are
    scored. Before, one noise tensor was drawn for the whole batch from the seed, and there was no batch size."""
    from mardini.data.datamodule import first_batch
    from mardini.data.testing import tiny_synthetic
    from mardini.evaluation.plan_usage import clip_noise, plan_usage
    from mardini.pipeline.pipeline import MarDiniPipeline
    from mardini.testing import make_checkpoint

    shards = tiny_synthetic(tmp_path / "synth", train=2, val=4, frames=12, size=32) / "val"
    batch = first_batch(str(shards), 4, frames=5, resolution=32, fps=None)
    pipe = MarDiniPipeline.from_checkpoint(make_checkpoint(tmp_path / "joint.ckpt", frames=5, size=32))
    by_two, by_four = (plan_usage(pipe, batch["video"], t=0.5, seed=3, positions=batch["positions"], batch_size=b)
                       for b in (2, 4))
    assert by_two.keys() == by_four.keys()
    for name, value in by_two.items():
        assert by_four[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert torch.equal(clip_noise((4, 3, 2), 3)[:2], clip_noise((2, 3, 2), 3))
    assert not torch.equal(clip_noise((2, 3, 2), 3), clip_noise((2, 3, 2), 4))

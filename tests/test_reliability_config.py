"""Impossible settings fail at start, with a message naming the key and its allowed range (one row per key)."""

from __future__ import annotations

import pytest

from mardini.data.datamodule import VideoDataModule
from mardini.lit import GenerationModule, MarDiniModule, PlanningModule
from mardini.lit.curriculum import Curriculum, Milestone

MODEL = [  # (key, impossible value, text of the allowed range)
    ("planner_resolution", 0, ">= 1"),
    ("frames", 1, ">= 2"),
    ("blr", 0.0, "> 0"),
    ("lr", -1e-4, "> 0 or null"),
    ("weight_decay", -0.1, ">= 0"),
    ("betas", (0.9, 1.5), "in [0, 1)"),
    ("warmup_steps", -1, ">= 0"),
    ("decay_steps", 0, ">= 1 or null"),
    ("min_lr_ratio", 1.5, "in [0, 1]"),
    ("ema_decay", 1.0, "in [0, 1)"),
    ("nonfinite", "ignore", "'stop' or 'skip'"),
    ("loss_reduction", "sum", "'clip' (each clip's mean, then the clips' mean) or 'element'"),
    ("keep_ratio", (0.0, 0.5), "0 < min <= max <= 1"),
    ("keep_ratio", (0.8, 0.2), "0 < min <= max <= 1"),
    ("templates", {"random": -1.0}, ">= 0 with a positive sum"),
    ("templates", {"teleport": 1.0}, "allowed"),
]


@pytest.mark.parametrize("cls", [PlanningModule, GenerationModule, MarDiniModule])
@pytest.mark.parametrize("key, value, allowed", MODEL, ids=[f"{k}={v}" for k, v, _ in MODEL])
def test_model_setting_fails_at_construction(cls, key, value, allowed):
    with pytest.raises(ValueError) as info:
        cls(size="tiny", **{key: value})
    msg = str(info.value)
    assert f"model.{key}" in msg and allowed in msg, msg


@pytest.mark.parametrize("cls, key, value, allowed", [
    (GenerationModule, "schedule_shift", 0.0, "> 0"),
    (MarDiniModule, "schedule_shift", -1.0, "> 0"),
    (GenerationModule, "loss_weighting", "p2", "allowed ['none', 'min_snr', 'motion']"),
    (MarDiniModule, "motion_strength", -1.0, ">= 0"),
    (MarDiniModule, "min_snr_gamma", 0.0, "> 0"),
    (MarDiniModule, "plan_dropout", 1.0, "in [0, 1)"),
    (MarDiniModule, "plan_dropout", -0.1, "in [0, 1)"),
])
def test_stage_setting_fails_at_construction(cls, key, value, allowed):
    with pytest.raises(ValueError, match=rf"model\.{key}=.*{_re(allowed)}"):
        cls(size="tiny", **{key: value})


def test_unknown_size_and_network_field_name_the_choices():
    with pytest.raises(KeyError, match="unknown model size 'huge'; registered sizes"):
        GenerationModule(size="huge")
    with pytest.raises(ValueError, match="unknown .* field.*'depht'.*allowed fields"):
        GenerationModule(size="tiny", generator={"depht": 2})



@pytest.mark.parametrize("generator, message", [
    ({"depth": "three"}, "generator.depth='three' must be an integer"),  # int("three") failed without the field
    ({"depth": 2.5}, "generator.depth=2.5 must be an integer"),  # failed inside torch's layers
    ({"dim": 192.0}, "generator.dim=192.0 must be an integer"),
    ({"qk_norm": "no"}, "generator.qk_norm='no' must be true or false"),  # a truthy string: was taken as true
    ({"rope_theta": "big"}, "generator.rope_theta='big' must be a number"),
])
def test_a_network_field_of_the_wrong_type_names_the_field(generator, message):
    with pytest.raises(ValueError, match=_re(f"model.init_args.{message}")):
        MarDiniModule(size="tiny", generator=generator)
    with pytest.raises(ValueError, match=_re(f"model.init_args.planner.{message.split('.', 1)[1]}")):
        PlanningModule(size="tiny", planner={k: v for k, v in generator.items()})


def test_a_network_field_of_a_fitting_type_is_taken():
    module = MarDiniModule(size="tiny", generator={"depth": 3, "rope_theta": 10000, "abs_pos": True})
    assert len(module.networks["generator"].blocks) == 3


DATA = [
    ("frames", 0, ">= 1"),
    ("fps", 0.0, "> 0 or null"),
    ("resolution", 0, ">= 1"),
    ("resolution", (32, 0), ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("num_workers", -1, ">= 0"),
    ("shuffle_buffer", -1, ">= 0"),
    ("epoch_size", 0, ">= 1"),
    ("crop", "middle", "'random' or 'center'"),
    ("crop_scale", (0.0, 1.0), "0 < min <= max <= 1"),
    ("crop_scale", (0.9, 0.5), "0 < min <= max <= 1"),
    ("val_clips", 0, ">= 1 or null"),
    ("val_batch_size", 0, ">= 1 or null"),
    ("prefetch_factor", 0, ">= 1"),
    ("loader_timeout", -1.0, ">= 0"),
]


@pytest.mark.parametrize("key, value, allowed", DATA, ids=[f"{k}={v}" for k, v, _ in DATA])
def test_data_setting_fails_at_construction(key, value, allowed):
    with pytest.raises(ValueError) as info:
        VideoDataModule(**{key: value})
    msg = str(info.value)
    assert f"data.{key}" in msg and allowed in msg, msg


@pytest.mark.parametrize("milestones, message", [
    ([Milestone(-1)], ">= 0 and strictly increasing"),
    ([Milestone(0), Milestone(0)], ">= 0 and strictly increasing"),
    ([Milestone(0, frames=1)], "frames=1 must be >= 2"),
    ([Milestone(0, attention="xy")], "attention='xy' must be 'st' or 't'"),
    ([Milestone(0, keep_ratio=(0.5, 1.2))], "0 < min <= max <= 1"),
    ([Milestone(0, templates={"random": 0.0})], "positive sum"),
])
def test_curriculum_milestone_fails_at_construction(milestones, message):
    with pytest.raises(ValueError, match=_re(message)):
        Curriculum(milestones)


@pytest.mark.parametrize("every", [0, -5])
def test_checkpoint_every_fails_at_start(every, tmp_path):
    from mardini.cli import main

    with pytest.raises(ValueError, match=r"checkpoint_every=.* it must be >= 1"):
        main(["fit", "--model=mardini.lit.GenerationModule", "--data=mardini.data.datamodule.VideoDataModule",
              f"--checkpoint_every={every}",
              f"--trainer.default_root_dir={tmp_path}"])


@pytest.mark.parametrize("arg, message", [
    # before: a ZeroDivisionError traceback from the datamodule's setup
    ("--trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 is impossible: it must be >= 1"),
    # before: a ZeroDivisionError traceback from Lightning's loop after the first training batch
    ("--trainer.val_check_interval=0", "trainer.val_check_interval=0 is impossible: it must be an int >= 1"),
    ("--trainer.val_check_interval=0.0", "trainer.val_check_interval=0.0 is impossible"),
    # before: "-1 is not in bounds, numpy accepts from 0 to 4294967295", no key named
    ("--seed_everything=-1", "seed_everything=-1 is impossible: it must be in [0, 4294967295]"),
])
def test_run_settings_lightning_cannot_run_fail_at_start_naming_the_key(arg, message, tmp_path):
    from mardini.cli import main

    with pytest.raises(ValueError, match=_re(message)):
        main(["fit", "--model=mardini.lit.GenerationModule", "--data=mardini.data.datamodule.VideoDataModule", arg,
              f"--trainer.default_root_dir={tmp_path}"])


def test_model_and_data_that_do_not_fit_fail_before_the_first_step(tmp_path):
    import lightning as L

    from mardini.data.testing import tiny_synthetic

    root = tiny_synthetic(tmp_path / "d", train=6, val=2, frames=12, size=16)
    dm = VideoDataModule(train_shards=str(root / "train"), val_shards=None, frames=4, resolution=16, batch_size=2,
                         num_workers=0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"model\.planner_resolution=32 is larger than .*data\.resolution=16"):
        trainer.fit(MarDiniModule(size="tiny", planner_resolution=32), datamodule=dm)
    with pytest.raises(ValueError, match=r"model\.frames=8 is more than data\.frames=4"):
        trainer.fit(GenerationModule(size="tiny", frames=8), datamodule=dm)


@pytest.mark.parametrize("cls", [PlanningModule, MarDiniModule])
@pytest.mark.parametrize("low, planner, step, near", [
    (15, {}, 2, "14 or 16"),  # tiny's planner: patch 1, the space-to-depth factor 2
    (6, {"patch_size": 2}, 4, "4 or 8"),
    (3, {"patch_size": 2}, 4, "4"),  # no smaller positive multiple
])
def test_a_planner_resolution_the_planner_cannot_split_fails_at_construction(cls, low, planner, step, near):
    """Without a datamodule (a notebook's compute_loss on a video), not as the video's fault at the first batch."""
    with pytest.raises(ValueError, match=rf"^model\.planner_resolution={low} is not divisible by {step} \(the "
                                         rf"autoencoder's factor 2 x the planner's patch size {step // 2}\).*, e\.g\. "
                                         rf"{near}$"):
        cls(size="tiny", planner_resolution=low, planner=planner)
    cls(size="tiny", planner_resolution=low - low % step + step, planner=planner)  # the nearest multiple above: built


def test_a_generator_warm_up_has_no_planner_to_fit_its_planner_resolution_to():
    assert GenerationModule(size="tiny", planner_resolution=15).hparams.planner_resolution == 15  # recorded only


def _re(text: str) -> str:
    import re

    return re.escape(text)

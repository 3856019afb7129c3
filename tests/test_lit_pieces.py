"""Unit tests of the Lightning glue that need no network: LR rule, atomic saves, curriculum, checkpoint checks."""

import math
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from mardini.lit.checkpoint_io import atomic_torch_save
from mardini.lit.checkpoints import check_metadata, read_checkpoint
from mardini.lit.curriculum import Curriculum, Milestone
from mardini.lit.schedules import scaled_lr, warmup_cosine
from mardini.masking import TEMPLATES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_lr_rule_and_schedule():
    assert scaled_lr(3.5e-5, 1024) == pytest.approx(1.4e-4)  # the paper's LR at its 256^2 batch
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("max_steps, estimated, warned", [
    (30, None, "model.warmup_steps=50 is longer than this fit (trainer.max_steps=30): its LR ends the fit at 60% of "
               "the peak and never reaches it; lower model.init_args.warmup_steps to at most 30"),
    (-1, 20, "(the 20 steps of trainer.max_epochs)"),
    (50, None, None),  # the last step is at the peak
])
def test_a_fit_that_ends_inside_its_lr_warm_up_warns_naming_both_values(max_steps, estimated, warned):
    """A stage whose trainer.max_steps ended before model.warmup_steps never reached its peak LR, silently."""
    from types import SimpleNamespace

    from mardini.lit import GenerationModule

    module = GenerationModule(size="tiny", frames=4, lr=1e-4, warmup_steps=50)
    module.trainer = SimpleNamespace(max_steps=max_steps, estimated_stepping_batches=estimated)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.configure_optimizers()
    notes = [str(w.message) for w in caught if "warmup_steps" in str(w.message)]
    assert (notes == []) if warned is None else (len(notes) == 1 and warned in notes[0])


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_torch_save({"step": 2, "bad": Boom()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temp file left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_save_gives_the_file_the_umask_s_mode(tmp_path, umask, mode):
    """As any file the user writes (open's 0o666 less the umask): teammates read the checkpoints where the umask
    lets them; the temp file alone would be 0600 (mkstemp)."""
    old = os.umask(umask)
    try:
        atomic_torch_save({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == mode


def test_atomic_checkpoint_io_reads_and_writes_file_urls_and_honours_map_location(tmp_path, monkeypatch):
    """As Lightning's TorchCheckpointIO: a ``file://`` URL is the local file (not a relative ``file:/...`` path), and a
    ``map_location`` is applied."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from mardini.lit.checkpoint_io import AtomicCheckpointIO

    monkeypatch.chdir(tmp_path)
    io, url = AtomicCheckpointIO(), (tmp_path / "x.ckpt").as_uri()  # file:///...
    io.save_checkpoint({"step": torch.tensor(3)}, url)
    assert sorted(os.listdir(tmp_path)) == ["x.ckpt"]  # no ./file:/... folder
    assert io.load_checkpoint(url) == TorchCheckpointIO().load_checkpoint(url) == {"step": torch.tensor(3)}
    atomic_torch_save({"step": 4}, (tmp_path / "y.ckpt").as_uri())
    assert torch.load(tmp_path / "y.ckpt", weights_only=True) == {"step": 4}
    with pytest.raises(ValueError, match="writes local files only, got memory://z.ckpt"):
        atomic_torch_save({"step": 5}, "memory://z.ckpt")
    moved = io.load_checkpoint(url, map_location="meta")
    assert moved["step"].device.type == "meta"


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    broken = tmp_path / "broken.ckpt"
    atomic_torch_save({"a": torch.zeros(1000)}, broken)
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        read_checkpoint(broken)


def test_check_metadata_names_kinds():
    from mardini.lit.base import CHECKPOINT_FORMAT

    ckpt = {"mardini": {"format": CHECKPOINT_FORMAT, "kind": "planning", "size": "tiny", "networks": ["planner"]}}
    assert check_metadata(ckpt, ("planning",), "x")["kind"] == "planning"
    with pytest.raises(ValueError, match="'planning' checkpoint.*'generation'"):
        check_metadata(ckpt, ("generation",), "x")
    with pytest.raises(ValueError, match="not a MarDini checkpoint"):
        check_metadata({"state_dict": {}}, ("joint",), "x")
    with pytest.raises(ValueError, match="format"):
        check_metadata({"mardini": {**ckpt["mardini"], "format": 999}}, ("planning",), "x")


def test_curriculum_settings_steps_and_interpolation():
    ms = [Milestone(0, keep_ratio=(0.35, 1.0), frames=4), Milestone(100, keep_ratio=(0.15, 0.6), attention="t")]
    cur = Curriculum(ms)
    assert cur.settings_at(50)["keep_ratio"] == (0.35, 1.0) and cur.settings_at(50)["frames"] == 4
    s = cur.settings_at(100)
    assert s["keep_ratio"] == (0.15, 0.6) and s["frames"] == 4 and s["attention"] == "t"
    smooth = Curriculum(ms, interpolate=True).settings_at(50)["keep_ratio"]
    assert smooth == pytest.approx((0.25, 0.8))


JOINT_TASK = [  # configs/tiny/05_joint_task.yaml's schedule
    Milestone(0, keep_ratio=(0.35, 1.0), templates={"random": 1.0, "interpolation": 1.0}),
    Milestone(400, keep_ratio=(0.25, 0.8),
              templates={"random": 1.0, "interpolation": 1.0, "image_to_video": 1.0, "expansion": 0.5}),
    Milestone(800, keep_ratio=(0.15, 0.6)),
]


def test_curriculum_interpolates_the_keep_ratio_across_a_milestone_that_does_not_set_it():
    """A templates-only milestone between two keep ratios neither holds the ramp nor turns it into a step."""
    with_templates = Curriculum([*JOINT_TASK[:2], Milestone(600, templates={"random": 1.0}), JOINT_TASK[2]],
                                interpolate=True)
    plain = Curriculum(JOINT_TASK, interpolate=True)
    assert with_templates.settings_at(600)["keep_ratio"] == pytest.approx((0.2, 0.7))  # half way from 400 to 800
    assert with_templates.settings_at(600)["templates"] == {"random": 1.0}
    for step in range(1301):
        assert with_templates.settings_at(step)["keep_ratio"] == plain.settings_at(step)["keep_ratio"], step


def test_a_resume_from_a_checkpoint_of_the_old_interpolation_rule_warns_where_the_schedule_now_moves_otherwise():
    """A checkpoint written before the keep ratio ramped across milestones without one records no rule; resuming
    a schedule the two rules move differently warns (the run's keep ratio changes from there), others stay quiet."""
    with_templates = Curriculum([*JOINT_TASK[:2], Milestone(600, templates={"random": 1.0}), JOINT_TASK[2]],
                                interpolate=True)
    old_state = {k: v for k, v in with_templates.state_dict().items() if k != "rule"}
    with pytest.warns(UserWarning, match="it now ramps across the milestones that do not set one"):
        with_templates.load_state_dict(old_state)
    assert any(with_templates.settings_at(s)["keep_ratio"] != _two_neighbour_settings(with_templates, s)["keep_ratio"]
               for s in range(1301))  # the rules really differ on this schedule
    for quiet, state in ((Curriculum(JOINT_TASK, interpolate=True), old_state),  # every milestone sets one
                         (with_templates, with_templates.state_dict())):  # written with the current rule
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            quiet.load_state_dict(state)


def _two_neighbour_settings(cur: Curriculum, step: int) -> dict:
    """The interpolation rule before it skipped milestones without a keep ratio: between milestone ``index`` and
    ``index + 1`` only (the same wherever every milestone sets one)."""
    merged: dict = {}
    index = -1
    for i, m in enumerate(cur.milestones):
        if m.step <= step:
            index = i
            merged.update({k: v for k, v in asdict(m).items() if v is not None and k != "step"})
    if cur.interpolate and 0 <= index < len(cur.milestones) - 1:
        a, b = cur.milestones[index], cur.milestones[index + 1]
        if a.keep_ratio is not None and b.keep_ratio is not None:
            w = (step - a.step) / (b.step - a.step)
            merged["keep_ratio"] = tuple(x + w * (y - x) for x, y in zip(a.keep_ratio, b.keep_ratio))
    merged["index"] = index
    return merged


def test_the_shipped_curricula_give_the_same_settings_at_every_step_as_the_two_neighbour_rule():
    """The shipped schedules set a keep ratio in every milestone: their training does not change."""
    found = []
    for path in sorted(CONFIGS.glob("**/*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        trainer = cfg.get("trainer") or {}
        for cb in trainer.get("callbacks") or []:
            if cb["class_path"].endswith("Curriculum"):
                args = cb["init_args"]
                cur = Curriculum([Milestone(**m) for m in args["milestones"]], args.get("interpolate", False))
                found.append(path.name)
                for step in range(max(trainer.get("max_steps", 0), cur.milestones[-1].step) + 2):
                    assert cur.settings_at(step) == _two_neighbour_settings(cur, step), (path, step)
    assert "05_joint_task.yaml" in found


@pytest.mark.parametrize(
    "milestones, message",
    [
        ([], "at least one"),
        ([Milestone(10), Milestone(5)], "strictly increasing"),
        ([Milestone(0, attention="x")], "attention"),
        ([Milestone(0, frames=1)], "frames"),
        ([Milestone(0, keep_ratio=(0.0, 0.5))], "keep_ratio"),
    ],
)
def test_curriculum_rejects_impossible(milestones, message):
    with pytest.raises(ValueError, match=message):
        Curriculum(milestones)


def test_curriculum_refuses_more_frames_than_the_data_at_the_start_of_the_fit():
    from types import SimpleNamespace

    cur = Curriculum([Milestone(0, frames=5), Milestone(2000, frames=12)])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(frames=9), global_step=0)
    with pytest.raises(ValueError, match="milestone at step 2000: frames=12 is more than the data's window of 9"):
        cur.on_fit_start(trainer, None)  # before step 0 is trained, not at step 2000
    cur.check_frames(12)  # a long enough window passes
    cur.check_frames(None)  # a datamodule that does not say


def test_val_template_losses_are_means_over_the_epoch_s_clips(monkeypatch):
    """val/loss_{template}: the mean over all of the epoch's clips of that template, logged once at its end."""
    from mardini.lit import GenerationModule

    module = GenerationModule(size="tiny", frames=4, generator={"depth": 1}, planner_resolution=8)
    logged: dict[str, list[float]] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.setdefault(name, []).append(float(value)))
    monkeypatch.setattr(module, "crop_frames", lambda batch, gen: batch)

    def loss_of(batch, generator, train):  # (B,) losses and their templates, as compute_loss sets them
        module._last_template = batch["template"]
        return batch["loss"]

    monkeypatch.setattr(module, "compute_loss", loss_of)
    batches = [{"loss": torch.tensor([1.0, 2.0, 3.0]), "template": torch.tensor([0, 1, 0])},
               {"loss": torch.tensor([5.0, 4.0]), "template": torch.tensor([2, 1])}]
    module.on_validation_epoch_start()
    for i, batch in enumerate(batches):
        module.validation_step(batch, i)
    assert not any(k.startswith("val/loss_") for k in logged)  # nothing per batch: reduced at the epoch's end
    module.on_validation_epoch_end()
    assert {k: v for k, v in logged.items() if k.startswith("val/loss_")} == {
        "val/loss_random": [2.0], "val/loss_interpolation": [3.0], "val/loss_image_to_video": [5.0]}  # no expansion


def test_curriculum_apply_sets_frames_templates_and_attention_of_the_raw_and_the_ema_generator():
    """Sampling and validation use the EMA generator: a milestone's attention must reach it too."""
    from types import SimpleNamespace

    from mardini.masking import MaskSampler
    from mardini.models.registry import build_generator

    raw, ema = build_generator("tiny", depth=1), build_generator("tiny", depth=1)
    module = SimpleNamespace(mask_sampler=MaskSampler(), frames=9, networks={"generator": raw},
                             ema=SimpleNamespace(module={"generator": ema}))
    cur = Curriculum([Milestone(0, keep_ratio=(0.5, 1.0)),
                      Milestone(10, frames=5, attention="t", templates={"interpolation": 1.0})])
    cur.apply(module, 9)
    assert module.frames == 9 and raw.attention_mode == ema.attention_mode == "st"
    cur.apply(module, 10)
    assert module.frames == 5
    assert raw.attention_mode == "t" and ema.attention_mode == "t"
    assert module.mask_sampler.keep_ratio == (0.5, 1.0)
    assert module.mask_sampler.template_probs == {"interpolation": 1.0}


def test_curriculum_warns_at_the_fit_s_start_naming_each_model_setting_its_step_0_milestone_replaces():
    """A model's templates (keep ratio, frames, attention) that milestone 0 overrides have no effect: say so."""
    import warnings
    from types import SimpleNamespace

    from mardini.masking import MaskSampler
    from mardini.models.registry import build_generator

    def module():
        return SimpleNamespace(mask_sampler=MaskSampler((0.35, 1.0), {"random": 1.0}), frames=9,
                               networks={"generator": build_generator("tiny", depth=1)},
                               ema=SimpleNamespace(module={"generator": build_generator("tiny", depth=1)}))

    trainer = SimpleNamespace(datamodule=SimpleNamespace(frames=9), global_step=0)
    first = Milestone(0, keep_ratio=(0.35, 1.0), templates={"random": 1.0, "interpolation": 1.0}, frames=5,
                      attention="t")
    with pytest.warns(UserWarning, match="curriculum: the milestone at step 0 replaces") as said:
        Curriculum([first, Milestone(100, keep_ratio=(0.15, 0.6))]).on_fit_start(trainer, module())
    assert len(said) == 1
    text = str(said[0].message)
    assert ("model.init_args.templates={'random': 1.0} with {'random': 1.0, 'interpolation': 1.0}; "
            "model.init_args.frames=9 with 5; model.init_args.generator.attention='st' with 't'") in text
    assert "keep_ratio" not in text  # the same value: not named
    assert "the Curriculum's milestones decide these settings" in text and "--trainer.callbacks" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where the values agree or the first milestone comes later
        Curriculum([Milestone(0, keep_ratio=(0.35, 1.0), templates={"random": 1.0}, frames=9, attention="st")]
                   ).on_fit_start(trainer, module())
        Curriculum([Milestone(10, templates={"interpolation": 1.0})]).on_fit_start(trainer, module())


def test_the_shipped_stages_give_the_model_the_settings_their_curriculum_starts_with():
    """Where a Curriculum's step-0 milestone sets the keep ratio or templates, the stage's model declares the same
    (it has no other effect: the milestone replaces it)."""
    checked = []
    for path in sorted(CONFIGS.glob("**/*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        model = ((cfg.get("model") or {}).get("init_args")) or {}
        for cb in (cfg.get("trainer") or {}).get("callbacks") or []:
            first = cb["init_args"]["milestones"][0] if cb["class_path"].endswith("Curriculum") else {}
            for key in ("keep_ratio", "templates", "frames") if first.get("step") == 0 else ():
                if key in first and key in model:
                    assert model[key] == first[key], (path.name, key)
                    checked.append((path.name, key))
    assert ("05_joint_task.yaml", "templates") in checked


def test_curriculum_keeps_a_mask_sampler_subclass_and_its_fields():
    """A subclass set on the module survives the curriculum's keep-ratio / template changes."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    from mardini.masking import MaskSampler

    @dataclass
    class LastFrameSampler(MaskSampler):
        given_last: bool = True

    module = SimpleNamespace(mask_sampler=LastFrameSampler(given_last=False), frames=9, networks={})
    Curriculum([Milestone(0, keep_ratio=(0.2, 0.4), templates={"expansion": 1.0})]).apply(module, 0)
    assert type(module.mask_sampler) is LastFrameSampler and module.mask_sampler.given_last is False
    assert module.mask_sampler.keep_ratio == (0.2, 0.4) and module.mask_sampler.template_probs == {"expansion": 1.0}


def test_curriculum_templates_are_the_model_s_sampler_s_checked_at_the_fit_s_start():
    """A milestone may name a template of one's own sampler class; one the model's sampler does not declare fails
    at the fit's start (not at construction, which does not know the model, nor when the milestone is reached)."""
    from types import SimpleNamespace

    from mardini.masking import MaskSampler
    from user_extensions import EveryOtherSampler

    cur = Curriculum([Milestone(1, keep_ratio=(0.3, 0.6)), Milestone(5, templates={"every_other": 1.0})])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(frames=9), global_step=0)
    plain = SimpleNamespace(mask_sampler=MaskSampler(), frames=9, networks={})
    with pytest.raises(ValueError, match=r"^curriculum milestone at step 5: templates \['every_other'\] are not "
                                         r"declared by the model's mask sampler MaskSampler \(its templates: "
                                         r"\['random', 'interpolation', 'image_to_video', 'expansion'\]\); remove "
                                         r"them from the milestone, or set model.init_args.mask_sampler"):
        cur.on_fit_start(trainer, plain)
    own = SimpleNamespace(mask_sampler=EveryOtherSampler(), frames=9, networks={})
    cur.on_fit_start(trainer, own)
    cur.apply(own, 5)
    assert type(own.mask_sampler) is EveryOtherSampler and own.mask_sampler.template_probs == {"every_other": 1.0}


def test_the_per_template_losses_are_the_model_s_sampler_s_templates(monkeypatch):
    """``model.mask_sampler``: the module draws with that class and logs train/ and val/loss_{its templates}; a
    sampler set from Python before the fit counts from setup on; one with other templates during the fit is refused
    (the per-template sums over the ranks keep one layout)."""
    from dataclasses import replace

    from mardini.lit import GenerationModule
    from mardini.masking import MaskSampler
    from user_extensions import EveryOtherSampler

    module = GenerationModule(size="tiny", frames=4, generator={"depth": 1}, planner_resolution=8,
                              mask_sampler="user_extensions.EveryOtherSampler", templates={"every_other": 1.0})
    assert type(module.mask_sampler) is EveryOtherSampler and module.mask_templates == EveryOtherSampler.templates
    assert module.hparams.mask_sampler == "user_extensions.EveryOtherSampler"  # saved with the checkpoints
    logged: dict[str, list[float]] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.setdefault(name, []).append(float(value)))
    monkeypatch.setattr(module, "crop_frames", lambda batch, gen: batch)
    video = torch.rand(2, 4, 3, 16, 16) * 2 - 1  # (B, T, 3, H, W)
    with torch.no_grad():
        module._log_train({}, module.compute_loss({"video": video}, torch.Generator().manual_seed(0), True),
                          torch.tensor(1.0))
    assert "train/loss_every_other" in logged and not any(f"train/loss_{n}" in logged for n in TEMPLATES)
    module.on_validation_epoch_start()
    module.validation_step({"video": video}, 0)
    module.on_validation_epoch_end()
    assert [k for k in logged if k.startswith("val/loss_")] == ["val/loss_every_other"]

    module.mask_sampler = replace(module.mask_sampler, keep_ratio=(0.5, 0.5))  # what a Curriculum does: the same class
    module.validation_step({"video": video}, 1)
    module.mask_sampler = MaskSampler()  # other templates, mid-fit
    with pytest.raises(ValueError, match=r"the mask sampler's templates changed during the fit \(\[.*'every_other'\] "
                                         r"-> \['random', .*'expansion'\], MaskSampler\)"):
        module.on_validation_epoch_end()
    module.setup("fit")  # set before a fit: its templates from then on
    assert module.mask_templates == TEMPLATES


def test_weight_decay_groups_see_through_activation_checkpoint_wrappers():
    """FSDPStrategy's activation_checkpointing_policy wraps blocks, which renames their parameters: the matrices
    keep their weight decay."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from mardini.lit import MarDiniModule
    from mardini.models.generator import GeneratorBlock

    module = MarDiniModule(size="tiny")
    decay, no_decay = module.weight_decay_groups()
    assert decay and all(p.ndim >= 2 for p in decay) and all(p.ndim < 2 for p in no_decay)
    apply_activation_checkpointing(module.networks, check_fn=lambda m: isinstance(m, GeneratorBlock))
    assert any("_checkpoint_wrapped_module" in n for n, _ in module.networks.named_parameters())
    assert [len(g) for g in module.weight_decay_groups()] == [len(decay), len(no_decay)]
    module.networks["generator"].extra = torch.nn.Linear(2, 2)  # a parameter added after construction
    with pytest.raises(RuntimeError, match="was not in the networks when the module was built"):
        module.weight_decay_groups()


def test_fsdp_root_reads_the_trainer_through_the_public_property_and_none_when_detached():
    """``fsdp_root`` goes through ``LightningModule.trainer`` (public), not the private ``_trainer`` it used to read."""
    from types import SimpleNamespace
    from unittest import mock

    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    from mardini.lit.fsdp import fsdp_root

    root = mock.MagicMock(spec=FullyShardedDataParallel)  # an FSDP root as far as isinstance goes
    root._use_orig_params = True
    strategy = FSDPStrategy()
    strategy.model = root

    class Served(BoringModel):
        """Its trainer comes from the public property only (as a module wrapped by another framework's shim)."""

        @property
        def trainer(self) -> L.Trainer:
            return SimpleNamespace(strategy=strategy)

    assert fsdp_root(Served()) is root
    assert fsdp_root(BoringModel()) is None  # detached: LightningModule.trainer raises, fsdp_root says no FSDP
    assert fsdp_root(torch.nn.Linear(2, 2)) is None

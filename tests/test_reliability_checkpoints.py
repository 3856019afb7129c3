"""Checkpoints and numerics: weights_only loading everywhere, clear errors for foreign checkpoints, EMA and raw
weights never swapped, the non-finite loss/gradient policies (stop naming the step, skip and count)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.lit import GenerationModule, MarDiniModule, PlanningModule
from mardini.lit.checkpoints import read_checkpoint
from mardini.pipeline import MarDiniPipeline

ROOT = Path(__file__).resolve().parents[1]
# decay_steps: an LR schedule of its own, which the resumes with more max_steps keep (unset, it follows max_steps)
TINY = dict(size="tiny", planner_resolution=8, lr=1e-3, ema_decay=0.5, ema_warmup=False, decay_steps=16)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("synth"), train=12, val=2, frames=12, size=16)


def _dm(root: Path) -> VideoDataModule:
    return VideoDataModule(train_shards=str(root / "train"), val_shards=str(root / "val"), frames=4, fps=8,
                           resolution=16, batch_size=2, num_workers=0, shuffle_buffer=4, epoch_size=100,
                           val_clips=2)


def _trainer(tmp: Path, max_steps: int, callbacks=(), **kw) -> L.Trainer:
    args = dict(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp, limit_val_batches=0, callbacks=list(callbacks))
    return L.Trainer(**{**args, **kw})


def _gen(**kw) -> GenerationModule:
    return GenerationModule(**{**TINY, "generator": {"depth": 1}, **kw})


def _states(model) -> tuple[dict, dict]:
    raw = {k: v.detach().clone() for k, v in model.networks.state_dict().items()}
    ema = {k: v.detach().clone() for k, v in model.ema.module.state_dict().items()}
    return raw, ema


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------
# weights_only everywhere
# --------------------------------------------------------------------------------------------------


def test_every_torch_load_in_the_code_is_weights_only():
    files = [*ROOT.glob("mardini/**/*.py"), *ROOT.glob("*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("bench/*.py")]
    calls = []
    for path in files:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 0, m.end() - 1
            for end in range(m.end() - 1, len(text)):  # the call's closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.relative_to(ROOT), text[m.start(): end + 1]))
    assert calls  # the scan finds the loaders
    unsafe = [(str(p), c) for p, c in calls if "weights_only=True" not in c]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_resume_loads_weights_only(capsys):
    from mardini.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "debug.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert "\nweights_only: true\n" in printed and "\nckpt_path: last\n" in printed


# --------------------------------------------------------------------------------------------------
# Foreign checkpoints: another stage, size or format says what it is and what was expected
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(synth, tmp_path_factory):
    """A generation checkpoint after 4 steps (written by ModelCheckpoint mid-run) and the final model."""
    tmp = tmp_path_factory.mktemp("ckpt")
    model = _gen()
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, filename="s{step}", every_n_train_steps=4,
                                                  save_top_k=-1)
    _trainer(tmp, 4, [ckpt_cb]).fit(model, datamodule=_dm(synth))
    return model, next(tmp.glob("*.ckpt"))


def test_stage_mismatch_names_both_kinds(saved, synth, tmp_path):
    _, path = saved
    with pytest.raises(ValueError, match=r"is a 'generation' checkpoint.*but a 'planning' checkpoint is expected"):
        PlanningModule(**TINY, init_from=str(path))
    with pytest.raises(ValueError, match=r"'generation' checkpoint.*'planning'"):
        MarDiniModule(**TINY, planner_ckpt=str(path))
    with pytest.raises(ValueError, match=r"is a 'generation' checkpoint.*'planning' checkpoint is expected"):
        _trainer(tmp_path, 6).fit(PlanningModule(**TINY), datamodule=_dm(synth), ckpt_path=str(path))


def test_size_mismatch_names_both_sizes(saved, synth, tmp_path):
    _, path = saved
    with pytest.raises(ValueError, match=r"size 'tiny'.*this model is size 'small'"):
        GenerationModule(**{**TINY, "size": "small"}, init_from=str(path))
    with pytest.raises(ValueError, match=r"this model: size 'tiny'.*does not fit this model.*shape mismatch"):
        _gen(generator={"depth": 1, "dim": 64}, init_from=str(path))  # same size name, other shapes
    with pytest.raises(ValueError, match=r"size 'tiny'.*this model is size 'small'"):
        _trainer(tmp_path, 6).fit(GenerationModule(**{**TINY, "size": "small"}), datamodule=_dm(synth),
                                  ckpt_path=str(path))


def test_a_new_run_refused_before_training_leaves_the_folder_s_checkpoints_where_they_are(saved, synth, tmp_path):
    """StepCheckpoint sets an earlier run's checkpoints aside (``earlier.N/``) when the new run's training starts, once
    the checkpoint it resumes has loaded; before, it did so at ``setup``, before Lightning read that checkpoint, so a
    resume refused (another kind, an EMA-only export) emptied the folder that ``--ckpt_path last`` resumes from."""
    from mardini.lit.ema_export import export_ema_only
    from mardini.lit.step_checkpoint import StepCheckpoint

    _, path = saved  # a generation checkpoint of step 4, outside the folder: a resume from it starts a new run there
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("last.ckpt", "step00000004.ckpt"):  # the earlier run's
        (folder / name).write_bytes(path.read_bytes())
    files = lambda where: {str(p.relative_to(where)): p.read_bytes() for p in where.rglob("*") if p.is_file()}  # noqa: E731
    earlier = files(folder)
    export = tmp_path / "ema.ckpt"
    export_ema_only(path, export)

    def fit(model, ckpt: Path) -> None:
        saves = StepCheckpoint(dirpath=folder, filename="step{step:08d}", auto_insert_metric_name=False,
                               save_last=True, every_n_train_steps=100, resume=str(ckpt))
        _trainer(tmp_path, 5, [saves]).fit(model, datamodule=_dm(synth), ckpt_path=str(ckpt))

    with pytest.raises(ValueError, match=r"'generation' checkpoint.*'planning' checkpoint is expected"):
        fit(PlanningModule(**TINY), path)
    with pytest.raises(ValueError, match=r"EMA-only export.*cannot resume a fit"):
        fit(_gen(), export)
    assert files(folder) == earlier, sorted(files(folder))
    fit(_gen(), path)  # a new run that trains: the earlier one is set aside, byte for byte
    assert files(folder / "earlier.1") == earlier
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step00000005.ckpt"]


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-configs", "hyper-parameters-only"])
def test_a_warm_up_of_other_network_settings_names_the_fields_that_differ(tmp_path, recorded):
    """A generator warm-up given the joint stage's generator but not its planner: {dim: 64} built plan_dim 128 (the
    size's planner); a planner warm-up of another width. The error names the differing fields (from the configs the
    checkpoint records, or from its hyper-parameters where it records none), the tensors after them."""
    from mardini.testing import make_checkpoint

    generator, planner = {"dim": 64, "heads": 4, "depth": 1}, {"dim": 64, "depth": 1}
    gen = make_checkpoint(tmp_path / "gen.ckpt", "generation", frames=4, generator=generator)
    plan = make_checkpoint(tmp_path / "plan.ckpt", "planning", frames=4, model_args={"planner": planner})
    if recorded:  # each network's resolved config
        assert read_checkpoint(gen)["mardini"]["network_configs"]["generator"]["plan_dim"] == 128
    else:  # as written before checkpoints recorded their networks' configs
        for name in ("gen", "plan"):
            ckpt = read_checkpoint(tmp_path / f"{name}.ckpt")
            ckpt["mardini"].pop("network_configs", None)
            torch.save(ckpt, tmp_path / f"{name}_old.ckpt")
        gen, plan = tmp_path / "gen_old.ckpt", tmp_path / "plan_old.ckpt"
    with pytest.raises(ValueError) as info:  # rope_theta differs too, but changes no weight: not named
        MarDiniModule(**TINY, planner=planner, generator={**generator, "rope_theta": 500.0}, generator_ckpt=str(gen))
    assert ("does not fit this model: it was built with other network settings: generator.plan_dim: checkpoint 128, "
            "this model 64 (plan_dim follows the planner's dim: give the warm-up stage the same planner: {dim: 64}). "
            "Give this stage") in str(info.value)
    assert "Tensors: missing [], unexpected [], shape mismatch [" in str(info.value)
    assert "('null_plan_token', (128,), (64,))" in str(info.value)
    with pytest.raises(ValueError, match=r"network 'planner' .* other network settings: planner\.dim: checkpoint 64, "
                                         r"this model 128\. Give this stage .* Tensors: missing \[\], unexpected "
                                         r"\[\], shape mismatch \[\('mask_token', \(64,\), \(128,\)\)"):
        MarDiniModule(**TINY, planner={"depth": 1}, generator=generator, planner_ckpt=str(plan))


def test_a_stage_refuses_networks_trained_on_other_latents(saved):
    from mardini.autoencoders import SpaceToDepthAutoencoder

    _, path = saved  # trained on SpaceToDepthAutoencoder(2), shift 0, scale 1
    with pytest.raises(ValueError, match=r"trained on latents of .*differ: \['scale', 'shift'\].*model.autoencoder"):
        _gen(init_from=str(path), autoencoder=SpaceToDepthAutoencoder(2, scale=2.5, shift=-0.4))
    with pytest.raises(ValueError, match=r"differ: \['scale'\]"):
        MarDiniModule(**TINY, generator_ckpt=str(path), autoencoder=SpaceToDepthAutoencoder(2, scale=2.0))
    _gen(init_from=str(path), autoencoder=SpaceToDepthAutoencoder(2, chunk_size=3))  # a memory knob: accepted


def test_a_resume_refuses_other_latents_anchor_or_shapes_than_its_checkpoint(saved, synth, tmp_path):
    from mardini.autoencoders import SpaceToDepthAutoencoder

    _, path = saved  # a generator of depth 1 trained on SpaceToDepthAutoencoder(2), shift 0, scale 1, no anchor
    fix = (r"resume with the settings the run was trained with \(its config.yaml in the log folder; earlier ones are kept "
           r"beside it as config.N.yaml\), or start a new run: --ckpt_path null starts over in the same log folder "
           r"\(the earlier run's checkpoints are moved to checkpoints/earlier.N/\), another trainer.logger save_dir or "
           r"name in a new one")

    def resume(model):
        _trainer(tmp_path, 6).fit(model, datamodule=_dm(synth), ckpt_path=str(path))

    with pytest.raises(ValueError, match=rf"{path.name} was trained on latents .*differ: \['scale', 'shift'\].*{fix}"):
        resume(_gen(autoencoder=SpaceToDepthAutoencoder(2, scale=2.5, shift=-0.4)))
    with pytest.raises(ValueError, match=rf"trained with anchor='none'.*this stage has anchor='nearest'.*{fix}"):
        resume(_gen(anchor="nearest"))
    shapes = r"\(networks\.generator\.[^:]+: checkpoint \(\d+(, \d+)*\), this model \(\d+(, \d+)*\);.* and \d+ more\)"
    with pytest.raises(ValueError, match=rf"{path.name} holds networks that do not fit this model {shapes}; {fix}$"):
        resume(_gen(generator={"depth": 1, "dim": 128}))
    with pytest.raises(ValueError, match=rf"networks\.generator\.blocks\.1\.[^:]+: not in the checkpoint.*{fix}"):
        resume(_gen(generator={"depth": 2}))


def test_a_resume_with_other_training_settings_warns_naming_them(saved, synth, tmp_path):
    """Another mask range, task mix, LR or frames resumes (the run goes on), but says what changed and how to start
    a new run instead; operational settings (activation checkpointing, nonfinite, starting checkpoints) do not."""
    _, path = saved  # TINY: lr 1e-3, keep_ratio (0.35, 1.0), templates None, frames None

    def resume(model) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _trainer(tmp_path, 5).fit(model, datamodule=_dm(synth), ckpt_path=str(path))
        return [str(w.message) for w in caught if "other settings than it was trained with" in str(w.message)]

    said = resume(_gen(keep_ratio=(0.2, 0.5), templates={"random": 1.0, "interpolation": 1.0}, lr=2e-3, frames=3))
    assert len(said) == 1, said
    for changed in ("frames None -> 3", "keep_ratio [0.35, 1.0] -> [0.2, 0.5]", "lr 0.001 -> 0.002",
                    "templates None -> {'random': 1.0, 'interpolation': 1.0}", str(path),
                    # a file of another folder: the fine-tune from it (test_fine_tuning: one of the fit's own folder)
                    "this fit continues that run here", f"--ckpt_path null with --model.init_args.init_from {path}"):
        assert changed in said[0], said[0]
    assert resume(_gen(generator={"depth": 1, "checkpointing": True}, nonfinite="skip", init_from=str(path))) == []
    # fields set to what the checkpoint's generator was built with (the size's heads, the planner's dim) are no change
    assert resume(_gen(generator={"depth": 1, "heads": 4, "plan_dim": 128, "cross_rope_grid": "centre"})) == []
    said = resume(_gen(generator={"depth": 1, "time_scale": 500.0}))
    assert len(said) == 1 and "(generator.time_scale 1000.0 -> 500.0)" in said[0], said


def test_changed_settings_compare_the_networks_each_side_builds():
    """A network field one side records and the other gets from its size (or the planner's width, or the grid a
    checkpoint records) is no change; a field that builds another network is named, old -> new."""
    from mardini.lit.checkpoints import changed_settings

    assert changed_settings({"generator": {"patch_size": 2}}, {"generator": {"patch_size": 2, "depth": 2}}) == []
    assert changed_settings({"generator": None}, {"generator": {"plan_dim": 128}}) == []  # tiny's planner dim
    assert changed_settings({"size": "small", "generator": None}, {"size": "small", "generator": {"depth": 8}}) == []
    assert changed_settings({"generator": {"depth": 2}}, {"generator": {"depth": 3}}) == ["generator.depth 2 -> 3"]
    assert changed_settings({"planner": None, "generator": None}, {"planner": {"dim": 256}, "generator": None}) == [
        "generator.plan_dim 128 -> 256", "planner.dim 128 -> 256"]
    # outputs/tiny/05_joint_task/checkpoints/last.ckpt: a joint checkpoint from before cross_rope_grid was recorded
    hparams = {"size": "tiny", "planner": {"abs_pos": True, "patch_size": 2},
               "generator": {"patch_size": 2, "attention": "t", "dim": 192, "mlp_hidden": 768, "abs_pos": True}}
    meta = {"kind": "joint", "size": "tiny", "networks": ["generator", "planner"], "latent_channels": 12}
    corner = {**hparams, "generator": {**hparams["generator"], "cross_rope_grid": "corner"}}
    assert changed_settings(hparams, corner, meta) == []  # what check_same_cross_rope_grid tells such a resume to add
    assert changed_settings(hparams, hparams, meta) == ["generator.cross_rope_grid 'corner' -> 'centre'"]
    assert changed_settings(corner, hparams, {**meta, "cross_rope_grid": "corner"}) == [
        "generator.cross_rope_grid 'corner' -> 'centre'"]
    generation = {"kind": "generation", "networks": ["generator"], "latent_channels": 12}  # grid inert, unrecorded
    assert changed_settings(hparams, hparams, generation) == []
    assert changed_settings({**hparams, "size": "small"}, {**hparams, "size": "small",
                                                           "planner": {**hparams["planner"], "in_channels": 12}},
                            {**meta, "cross_rope_grid": "centre"}) == []  # in_channels: the latents' 12, not small's 16


def test_format_mismatch_names_both_versions(saved, tmp_path):
    _, path = saved
    ckpt = read_checkpoint(path)
    ckpt["mardini"]["format"] = 99
    ckpt["mardini"]["code"] = {**ckpt["mardini"]["code"], "git_commit": "0123456789abcdef" * 2 + "01234567",
                               "git_dirty": False}
    old = tmp_path / "future.ckpt"
    torch.save(ckpt, old)
    with pytest.raises(ValueError, match=r"checkpoint format 99, this code \(mardini 0\.1\.0\) reads format 1: newer "
                                         r"code wrote it \(mardini 0\.1\.0, commit 0123456789ab\); update this "
                                         r"checkout \(git pull\)"):
        _gen(init_from=str(old))
    del ckpt["mardini"]["format"], ckpt["mardini"]["code"]  # no format: another code, which did not record itself
    torch.save(ckpt, old)
    with pytest.raises(ValueError, match=r"format None, .*: other code wrote it \(mardini \(version unrecorded\), "
                                         r"an unrecorded commit .*read it with a commit of this repository from before "
                                         r"the checkpoint format became 1 \(`git log -S CHECKPOINT_FORMAT") as said:
        _gen(init_from=str(old))
    assert "git checkout its commit" not in str(said.value)  # no commit was recorded to check out
    ckpt["mardini"]["format"], ckpt["mardini"]["code"] = 0, {"mardini": "0.1.0", "git_commit": "ab" * 20}
    torch.save(ckpt, old)
    with pytest.raises(ValueError, match=f"other code wrote it .*commit abababababab.*git checkout {'ab' * 20},"):
        _gen(init_from=str(old))
    torch.save({"state_dict": ckpt["state_dict"]}, old)
    with pytest.raises(ValueError, match="not a MarDini checkpoint.*expected a generation checkpoint"):
        _gen(init_from=str(old))


class _Custom:  # a pickled object of this class is what a weights-only load refuses
    pass


def test_a_path_that_is_no_checkpoint_file_says_what_it_is_without_unsafe_advice(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.ckpt").touch()
    with pytest.raises(ValueError, match=r"run is a directory; pass the checkpoint file inside it, e\.g\. "
                                         r".*run/last\.ckpt \(it holds last\.ckpt\)"):
        read_checkpoint(tmp_path / "run")
    stage = tmp_path / "05_joint_task"  # train.py's stage folder: the files are in its checkpoints/
    (stage / "checkpoints").mkdir(parents=True)
    (stage / "checkpoints" / "epoch=0-step=4.ckpt").touch()
    (stage / "checkpoints" / "last.ckpt").touch()
    for load in (read_checkpoint, MarDiniPipeline.from_checkpoint):  # was "e.g. 05_joint_task/last.ckpt (it holds no"
        with pytest.raises(ValueError, match=r"05_joint_task is a directory; pass the checkpoint file inside it, e\.g\. "
                                             r".*05_joint_task/checkpoints/last\.ckpt \(its checkpoints/ folder holds "
                                             r"last\.ckpt, epoch=0-step=4\.ckpt\)"):
            load(stage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is a directory.*it holds no \*\.ckpt file"):
        read_checkpoint(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"common.yaml is not a torch checkpoint \(a config or another file\?\)") as e:
        read_checkpoint(ROOT / "configs" / "tiny" / "common.yaml")
    assert "weights_only" not in str(e.value)  # PyTorch's advice to unpickle without it is never relayed
    torch.save({"state_dict": {}, "extra": _Custom()}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match=r"holds a Python object \(.*_Custom\) that a weights-only load refuses") as e:
        read_checkpoint(tmp_path / "foreign.ckpt")
    assert "weights_only" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# EMA and raw weights never mix up
# --------------------------------------------------------------------------------------------------


def test_checkpoint_holds_the_ema_of_its_step(saved):
    model, path = saved  # saved at step 4 by ModelCheckpoint; the model stopped at step 4 too
    state = read_checkpoint(path)["state_dict"]
    raw, ema = _states(model)
    assert _equal(_sub(state, "networks."), raw)
    assert _equal(_sub(state, "ema.module."), ema)  # the EMA update of step 4 is in the checkpoint of step 4
    assert not _equal(raw, ema)


def test_resume_restores_raw_and_ema_each_to_its_own(saved, synth, tmp_path):
    _, path = saved
    state = read_checkpoint(path)["state_dict"]
    seen = {}

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["raw"], seen["ema"] = _states(pl_module)

    _trainer(tmp_path, 5, [AtStart()]).fit(_gen(), datamodule=_dm(synth), ckpt_path=str(path))
    assert _equal(seen["raw"], _sub(state, "networks."))
    assert _equal(seen["ema"], _sub(state, "ema.module."))
    assert not _equal(seen["raw"], seen["ema"])


def test_checkpoint_saved_while_ema_is_swapped_in_keeps_raw_weights(synth, tmp_path):
    model = _gen()
    found = {}

    class SaveInValidation(L.Callback):  # runs before the module's on_validation_epoch_end swaps the EMA out
        def on_validation_epoch_end(self, trainer, pl_module):
            found["raw"] = [t.clone() for t in pl_module._ema_backup]
            trainer.save_checkpoint(tmp_path / "in_val.ckpt")

    trainer = _trainer(tmp_path, 2, [SaveInValidation()], limit_val_batches=1, val_check_interval=2)
    trainer.fit(model, datamodule=_dm(synth))
    state = read_checkpoint(tmp_path / "in_val.ckpt")["state_dict"]
    raw = _sub(state, "networks.")
    assert all(torch.equal(a, b) for a, b in zip(raw.values(), found["raw"]))
    assert _equal(raw, _states(model)[0])


# --------------------------------------------------------------------------------------------------
# Non-finite loss or gradient: stop naming the step, or skip and count
# --------------------------------------------------------------------------------------------------


class _PoisonLoss(L.Callback):
    """Makes the loss of training step ``at`` NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            batch["video"].fill_(float("nan"))


class _PoisonGrad(L.Callback):
    """Makes a gradient of step ``at`` infinite while the loss stays finite."""

    def __init__(self, at: int) -> None:
        self.at, self.handle = at, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            p = next(pl_module.networks.parameters())
            self.handle = p.register_hook(lambda g: g * float("inf"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


@pytest.mark.parametrize("poison, what", [(_PoisonLoss, "non-finite loss at step 2"),
                                          (_PoisonGrad, r"non-finite gradient norm \(inf\) at step 2")])
def test_nonfinite_stop_names_the_step(synth, tmp_path, poison, what):
    with pytest.raises(FloatingPointError, match=what):
        _trainer(tmp_path, 4, [poison(2)]).fit(_gen(nonfinite="stop"), datamodule=_dm(synth))


@pytest.mark.parametrize("poison", [_PoisonLoss, _PoisonGrad])
def test_nonfinite_skip_counts_leaves_weights_and_resumes_the_count(synth, tmp_path, poison):
    before = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3 and "raw" not in before:
                before["raw"], before["ema"] = _states(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "after" not in before and "raw" in before:
                before["after"] = _states(pl_module)

    model = _gen(nonfinite="skip", weight_decay=0.1)
    trainer = _trainer(tmp_path, 5, [poison(3), Watch()], logger=L.pytorch.loggers.CSVLogger(tmp_path),
                       log_every_n_steps=1)
    trainer.fit(model, datamodule=_dm(synth))
    assert model.nonfinite_skipped == 1
    raw, ema = before["after"]
    assert not _equal(before["raw"], before["ema"])  # by step 3 the EMA lags the raw weights: a move would show
    assert _equal(raw, before["raw"]) and _equal(ema, before["ema"])  # the bad step changed nothing
    assert all(torch.isfinite(v).all() for v in model.networks.state_dict().values())
    assert float(trainer.logged_metrics["train/nonfinite_skipped"]) == 1
    path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(path)
    assert read_checkpoint(path)["mardini"]["nonfinite_skipped"] == 1
    resumed = _gen(nonfinite="skip", weight_decay=0.1)  # the run's settings (others warn)
    _trainer(tmp_path, trainer.global_step + 1).fit(resumed, datamodule=_dm(synth), ckpt_path=str(path))
    assert resumed.nonfinite_skipped == 1  # the count survives a resume


@pytest.mark.parametrize("poisoned", [(0,), (1,), (0, 1)], ids=["first", "second", "both"])
def test_nonfinite_skip_drops_the_whole_accumulation_window_counted_once(synth, tmp_path, poisoned):
    """accumulate_grad_batches=2, a NaN loss in micro-batch 0, 1 or both of step 3's window: the step changes neither
    the raw weights nor the EMA, counted once. Before, the optimiser stepped on the other micro-batch's gradient
    (the raw weights moved while the EMA stayed), and two NaN micro-batches counted two steps."""
    seen = {}

    class PoisonMicroBatches(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:  # both micro-batches of the window before the optimiser step 3
                seen.setdefault("before", _states(pl_module))
                if batch_idx % 2 in poisoned:
                    batch["video"].fill_(float("nan"))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                seen.setdefault("after", _states(pl_module))

    model = _gen(nonfinite="skip", weight_decay=0.1)
    _trainer(tmp_path, 5, [PoisonMicroBatches()], accumulate_grad_batches=2).fit(model, datamodule=_dm(synth))
    (raw, ema), (raw_after, ema_after) = seen["before"], seen["after"]
    assert not _equal(raw, ema)  # by step 3 the EMA lags the raw weights: a move would show
    assert _equal(raw_after, raw) and _equal(ema_after, ema)
    assert model.nonfinite_skipped == 1


def _scaled_trainer(tmp: Path, max_steps: int, callbacks=(), init_scale: float = 2.0 ** 16) -> L.Trainer:
    """``16-mixed`` on CPU with a GradScaler (as on a GPU) and gradient clipping."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return _trainer(tmp, max_steps, callbacks, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
                    gradient_clip_val=1.0)


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_a_grad_scaler_s_overflow_is_left_to_it_not_stopped_counted_or_ema_updated(synth, tmp_path, nonfinite):
    """An infinite gradient under a GradScaler is its overflow: it skips the step and halves its scale. Before, the
    non-finite policy saw the unscaled inf norm first: ``stop`` ended the run, ``skip`` counted every overflow."""
    seen = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                seen["before"], seen["scale"] = _states(pl_module), trainer.precision_plugin.scaler.get_scale()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:  # step 3 is done
                seen["after"], seen["scale_after"] = _states(pl_module), trainer.precision_plugin.scaler.get_scale()

    model = _gen(nonfinite=nonfinite)
    _scaled_trainer(tmp_path, 5, [_PoisonGrad(3), Watch()]).fit(model, datamodule=_dm(synth))
    assert model.nonfinite_skipped == 0
    assert seen["scale_after"] == seen["scale"] / 2  # the scaler saw the overflow
    (raw, ema), (raw_after, ema_after) = seen["before"], seen["after"]
    assert not _equal(raw, ema)  # by step 3 the EMA lags the raw weights: an update would show
    assert _equal(raw_after, raw) and _equal(ema_after, ema)  # the scaler skipped the step, and the EMA update too
    # an overflow from the start (a scale far too high): the scaler lowers it, step after step, and trains nothing
    model = _gen(nonfinite=nonfinite)
    raw, ema = _states(model)
    _scaled_trainer(tmp_path / "high", 2, init_scale=1e30).fit(model, datamodule=_dm(synth))
    assert model.nonfinite_skipped == 0 and _equal(_states(model)[0], raw) and _equal(_states(model)[1], ema)


def test_a_non_finite_loss_under_a_grad_scaler_is_still_the_policy_s(synth, tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        _scaled_trainer(tmp_path, 4, [_PoisonLoss(2)]).fit(_gen(nonfinite="stop"), datamodule=_dm(synth))
    model = _gen(nonfinite="skip")
    _scaled_trainer(tmp_path / "skip", 4, [_PoisonLoss(2)]).fit(model, datamodule=_dm(synth))
    assert model.nonfinite_skipped == 1


def test_each_micro_batch_of_an_accumulation_window_draws_its_own_randomness(synth, tmp_path):
    seeds: list[tuple[int, int]] = []
    model = _gen()
    original = model.step_generator

    def recording(step, salt=0):
        gen = original(step, salt)
        seeds.append((step, gen.initial_seed()))
        return gen

    model.step_generator = recording
    _trainer(tmp_path, 2, accumulate_grad_batches=2).fit(model, datamodule=_dm(synth))
    assert [s for s, _ in seeds] == [0, 0, 1, 1]  # two micro-batches per optimiser step
    assert seeds[0][1] != seeds[1][1] and seeds[2][1] != seeds[3][1]  # masks, times, noise: new draws each
    assert seeds[0][1] == original(0).initial_seed()  # the first micro-batch draws what a step without accumulation did


def test_gradient_clipping_under_fsdp_goes_through_the_wrapped_root_module():
    """Lightning's FSDP precision plugin refuses norm clipping; the module clips through the FSDP root instead."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    calls = []
    strategy = FSDPStrategy.__new__(FSDPStrategy)  # only its type matters here (no process group on a CPU)
    root = SimpleNamespace(clip_grad_norm_=lambda v: calls.append(v))
    model = _gen()
    model._trainer = SimpleNamespace(strategy=strategy)
    strategy._model = root  # what FSDPStrategy.model returns: the wrapped root module
    model.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert calls == [1.0]


def test_a_fit_bounded_by_epochs_decays_the_lr_over_its_steps(synth, tmp_path):
    lrs = []

    class Lr(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = _gen(warmup_steps=0, min_lr_ratio=0.1, lr=1e-3)
    _trainer(tmp_path, -1, [Lr()], max_epochs=1, limit_train_batches=4).fit(model, datamodule=_dm(synth))
    assert len(lrs) == 4  # the schedule spans the 4 steps Lightning estimates, not 1 (min LR from step 1 on)
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] > 0.8e-3 and lrs[3] > 0.2e-3  # cosine: 1, 0.87, 0.55, 0.23


def test_checkpoints_from_before_the_cross_rope_grid_setting_keep_their_placement(saved, synth, tmp_path):
    """Checkpoints written before ``cross_rope_grid`` placed plan tokens at the covered block's first cell: sampling
    rebuilds them so; a joint stage or a resume with the new placement refuses them, naming the setting."""
    from mardini.pipeline import MarDiniPipeline
    from mardini.testing import make_checkpoint

    joint = make_checkpoint(tmp_path / "joint.ckpt", "joint", frames=4, size=16)
    ckpt = read_checkpoint(joint)
    assert ckpt["mardini"]["cross_rope_grid"] == "centre"
    assert MarDiniPipeline.from_checkpoint(joint).generator.cfg.cross_rope_grid == "centre"
    del ckpt["mardini"]["cross_rope_grid"]  # as written before the setting
    old = tmp_path / "old_joint.ckpt"
    torch.save(ckpt, old)
    assert MarDiniPipeline.from_checkpoint(old).generator.cfg.cross_rope_grid == "corner"
    generator = dict(ckpt["hyper_parameters"].get("generator") or {})
    with pytest.raises(ValueError, match=r"old_joint.ckpt: its generator read the plan with cross_rope_grid='corner'.*"
                                         r"this model has 'centre'; add cross_rope_grid: corner to model.init_args.generator"):
        MarDiniModule(**{**ckpt["hyper_parameters"], "init_from": str(old)})
    kept = MarDiniModule(**{**ckpt["hyper_parameters"], "init_from": str(old),
                            "generator": {**generator, "cross_rope_grid": "corner"}})
    assert kept.networks["generator"].cfg.cross_rope_grid == "corner"

    with pytest.raises(ValueError, match=r"cross_rope_grid='corner'.*add cross_rope_grid: corner"):  # a resume
        MarDiniModule(**ckpt["hyper_parameters"])._check_resumable(ckpt)
    MarDiniModule(**{**ckpt["hyper_parameters"], "generator": {**generator, "cross_rope": False}})._check_resumable(
        ckpt)  # no RoPE on the plan tokens: their placement cannot matter

    _, path = saved  # a generator warm-up reads one null-plan token per frame: its placement cannot matter either
    resumable = read_checkpoint(path)
    assert resumable["mardini"]["cross_rope_grid"] == "centre"
    del resumable["mardini"]["cross_rope_grid"]
    before = tmp_path / "before.ckpt"
    torch.save(resumable, before)
    trainer = _trainer(tmp_path, 6)
    trainer.fit(_gen(), datamodule=_dm(synth), ckpt_path=str(before))
    assert trainer.global_step == 6


def test_a_checkpoint_is_memory_mapped_and_the_legacy_format_still_reads(tmp_path, monkeypatch):
    """A stage reads its starting checkpoint memory-mapped: on a node, 8 ranks each loading a 47 GB joint checkpoint
    (optimiser state included) into memory would need some 380 GB of host RAM."""
    import mardini.lit.checkpoints as checkpoints

    zip_file, legacy = tmp_path / "zip.ckpt", tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, zip_file)
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, legacy, _use_new_zipfile_serialization=False)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(checkpoints.torch, "load", lambda *a, **k: loads.append(k.get("mmap")) or real_load(*a, **k))
    assert torch.equal(read_checkpoint(zip_file)["state_dict"]["w"], torch.arange(4.0))
    assert loads == [True]
    assert torch.equal(read_checkpoint(legacy)["state_dict"]["w"], torch.arange(4.0))
    assert loads == [True, True, None]  # refused memory-mapped, read whole


def test_a_validation_with_no_usable_clip_is_an_error_not_a_run_without_validation(synth, tmp_path):
    """Every validation sample skipped (clips too short for the stage, undecodable files): before, the fit trained to
    its end and never logged val/loss (and with 2 ranks, one without a clip hung the other)."""

    class NothingUsable(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

    class SkipsEveryValidationClip(VideoDataModule):
        def val_dataloader(self):
            return torch.utils.data.DataLoader(NothingUsable(), batch_size=None)

    dm = _dm(synth)
    dm.__class__ = SkipsEveryValidationClip
    with pytest.raises(ValueError, match=r"validation found no usable clip on any rank.*limit_val_batches: 0"):
        _trainer(tmp_path, 2, limit_val_batches=1.0).fit(_gen(), datamodule=dm)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_validation_split_that_holds_no_sample_says_so_and_not_that_samples_were_skipped(synth, tmp_path, workers):
    """Validation shards that give no sample (members not named key.extension; an empty tar, before ``setup`` refused
    it): before, the error said that every validation sample was skipped and that skip lines above said why, with no
    skip line and nothing skipped."""
    import io
    import tarfile

    from mardini.data.sharding import atomic_tar

    nothing, renamed = tmp_path / "nothing", tmp_path / "renamed"
    nothing.mkdir()
    renamed.mkdir()
    with tarfile.open(nothing / "val-000000.tar", "w") as tar:
        info = tarfile.TarInfo("README")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    with atomic_tar(renamed / "val-000000.tar") as sink:  # samples of the wrong members: each one skipped
        for i in range(2):
            sink.write({"__key__": f"clip{i}", "frames.npy": b"not read", "json": b'{"fps": 8.0, "frames": 24}'})
    for shards, message in [
        (nothing, r"the validation shards hold no sample \(none was skipped: empty tar archives, or members not named "
                  r"key.extension\); rebuild data.val_shards .* or set trainer.limit_val_batches: 0 \(or "
                  r"data.val_shards: null\) to train without validation$"),
        (renamed, r"every validation sample was skipped \(the skip lines above say why"),
    ]:
        dm = _dm(synth)
        dm.val_shards, dm.num_workers = str(shards), workers
        with pytest.raises(ValueError, match=r"^validation found no usable clip on any rank: " + message):
            _trainer(tmp_path, 2, limit_val_batches=1.0).fit(_gen(), datamodule=dm)


@pytest.mark.parametrize("resume", ["last", None, "elsewhere.ckpt"], ids=["resume", "new-run", "from-a-file"])
def test_only_the_warning_that_its_own_folder_is_not_empty_is_silenced(tmp_path, resume):
    """Every resumed ``train.py fit`` (``--ckpt_path last``, the default rerun) showed Lightning's "Checkpoint directory
    .../checkpoints exists and is not empty.": StepCheckpoint silenced it for a new run only, although a resume writes
    into its own run's folder by design. It is silenced now for this folder alone and during its setup alone: another
    ModelCheckpoint's non-empty folder still warns, and no filter is left behind."""
    import os

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from mardini.lit.step_checkpoint import StepCheckpoint

    own = tmp_path / "stage" / "version_0" / "checkpoints"  # where the logger puts the stage's checkpoints
    other = tmp_path / "other"
    for folder in (own, other):
        folder.mkdir(parents=True)
        (folder / "last.ckpt").touch()
    trainer = _trainer(tmp_path, 1, logger=CSVLogger(tmp_path, name="stage", version=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        StepCheckpoint(resume=resume, save_last=True).setup(trainer, _gen(), "fit")
        assert warnings.filters == before
        ModelCheckpoint(dirpath=other, save_last=True).setup(trainer, _gen(), "fit")
    full = [str(w.message) for w in caught if "exists and is not empty" in str(w.message)]
    assert full == [f"Checkpoint directory {os.path.realpath(other)} exists and is not empty."], full

"""Fine-tuning a trained checkpoint: which setting takes which kind of checkpoint, and what a start loads."""

from __future__ import annotations

import re

import pytest

from mardini.lit import GenerationModule, MarDiniModule
from mardini.testing import make_checkpoint

TINY = dict(size="tiny", frames=5, planner_resolution=16)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """One checkpoint of each kind (a step on random clips each)."""
    root = tmp_path_factory.mktemp("fine_tuning")
    return {kind: str(make_checkpoint(root / f"{kind}.ckpt", kind, frames=5))
            for kind in ("joint", "generation", "planning")}


@pytest.mark.parametrize("module, setting, kind, fix", [
    (MarDiniModule, "init_from", "generation",
     r"pass it as model\.init_args\.generator_ckpt .*and set model\.init_args\.init_from null"),
    (MarDiniModule, "init_from", "planning",
     r"pass it as model\.init_args\.planner_ckpt .*and set model\.init_args\.init_from null"),
    (MarDiniModule, "generator_ckpt", "joint", r"pass it as model\.init_args\.init_from"),
    (MarDiniModule, "planner_ckpt", "generation", r"pass it as model\.init_args\.generator_ckpt"),
    (GenerationModule, "init_from", "joint",
     r"a 'joint' checkpoint starts a 'joint' stage \(model\.class_path mardini\.lit\.MarDiniModule, "
     r"model\.init_args\.init_from\)"),
])
def test_a_checkpoint_of_another_kind_is_refused_naming_the_setting_that_takes_it(ckpts, module, setting, kind,
                                                                                    fix):
    with pytest.raises(ValueError, match=rf"is a '{kind}' checkpoint.*is expected here; {fix}"):
        module(**TINY, **{setting: ckpts[kind]})


def test_resuming_a_checkpoint_of_another_kind_names_the_setting_that_starts_from_it(ckpts):
    """``--ckpt_path`` resumes a run of the stage; a warm-up given there is refused naming ``generator_ckpt``."""
    from mardini.lit.checkpoints import read_checkpoint

    path = ckpts["generation"]
    with pytest.raises(ValueError, match=r"is a 'generation' checkpoint.*--ckpt_path resumes a run of this stage.*"
                                         r"pass it as --model\.init_args\.generator_ckpt with --ckpt_path null"):
        MarDiniModule(**TINY).check_checkpoint(read_checkpoint(path), path, fitting=True)


def test_a_start_reports_what_it_loaded_and_the_network_settings_it_changes(ckpts, monkeypatch):
    """``init_from`` says which networks it took from which checkpoint, what becomes of their EMA and of the run's
    state, and the settings that keep the weights' shapes but change what they compute (here ``abs_pos``)."""
    import mardini.lit.checkpoint_hooks as hooks

    lines: list[str] = []
    monkeypatch.setattr(hooks, "rank_zero_info", lines.append)
    MarDiniModule(**TINY, init_from=ckpts["joint"], generator={"abs_pos": True})
    MarDiniModule(**TINY, planner_ckpt=ckpts["planning"], generator_ckpt=ckpts["generation"])
    start, planner, generator = lines
    assert start.startswith(f"init_from: generator and planner (raw and EMA weights) from {ckpts['joint']}, "
                            "a 'joint' checkpoint of size 'tiny' at step 1;")
    assert "network settings changed: generator.abs_pos False -> True;" in start
    assert "the EMA restarts from these weights" in start and "step and curriculum start anew" in start
    assert planner.startswith("planner_ckpt: planner (raw and EMA weights)") and "'planning' checkpoint" in planner
    assert generator.startswith("generator_ckpt: generator") and "changed" not in planner + generator


def test_a_resume_warns_that_a_new_init_from_is_not_loaded(ckpts, tmp_path):
    """Rerunning a stage with another ``init_from`` in a folder that holds a run resumes that run: the new file is
    not loaded, which the fit says, naming ``--ckpt_path null``; the run's own ``init_from`` (a requeue) says
    nothing."""
    import warnings

    import lightning as L
    import torch
    from torch.utils.data import StackDataset

    clips = StackDataset(video=torch.rand(2, 5, 3, 16, 16) * 2 - 1)  # (clips, T, 3, H, W)
    started = str(make_checkpoint(tmp_path / "started.ckpt", "joint", frames=5,
                                  model_args={"init_from": ckpts["joint"]}))  # a run that started from a checkpoint

    def resume(path: str, init_from: str) -> list[str]:
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=str(tmp_path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(MarDiniModule(**TINY, init_from=init_from),
                        datamodule=L.LightningDataModule.from_datasets(clips, batch_size=2), ckpt_path=path)
        return [str(w.message) for w in caught if "is not loaded" in str(w.message)]

    (message,) = resume(started, init_from=started)  # e.g. the stage's own last.ckpt given as init_from
    assert message.startswith(f"resuming {started}, so init_from {started} (the run started from {ckpts['joint']}) "
                              "is not loaded")
    assert "pass --ckpt_path null" in message
    assert resume(started, init_from=ckpts["joint"]) == []


def _fit(module, steps: int, tmp_path, ckpt_path: str | None = None, checkpointing: bool = False):
    """``steps`` steps of ``module`` on two random clips (5 frames, 16 px), in process (``checkpointing``: Lightning's
    ModelCheckpoint, saving in ``tmp_path/checkpoints``); returns the trainer."""
    import lightning as L
    import torch
    from torch.utils.data import StackDataset

    clips = StackDataset(video=torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=checkpointing,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=L.LightningDataModule.from_datasets(clips, batch_size=2), ckpt_path=ckpt_path)
    return trainer


def _network(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("start", ["training checkpoint", "EMA-only export"])
@pytest.mark.parametrize("keep_loaded", [False, True])
def test_a_network_train_only_freezes_keeps_the_ema_the_checkpoint_samples_with(ckpts, tmp_path, monkeypatch, start,
                                                                                 keep_loaded):
    """``train_only '[generator.*]'`` from a joint checkpoint: after a step the frozen planner's raw and EMA weights
    are both the checkpoint's EMA planner (the weights it samples with), whether the EMA restarts (the default) or
    goes on (``ema_keep_loaded``); before, its EMA restarted from the raw planner, which sampling then used."""
    import torch

    import mardini.lit.joint as joint
    from mardini.lit.checkpoints import read_checkpoint
    from mardini.lit.ema_export import ema_only

    path = ckpts["joint"]
    loaded = read_checkpoint(path)
    if start == "EMA-only export":
        path = str(tmp_path / "ema.ckpt")
        torch.save(ema_only(loaded), path)
    ema_planner = _network(loaded["state_dict"], "ema.module.planner.")
    raw_planner = _network(loaded["state_dict"], "networks.planner.")
    assert any(not torch.equal(v, raw_planner[k]) for k, v in ema_planner.items())  # perturbed apart
    lines: list[str] = []
    monkeypatch.setattr(joint, "rank_zero_info", lines.append)
    module = MarDiniModule(**TINY, init_from=path, train_only=["generator.*"], ema_keep_loaded=keep_loaded, lr=1e-2)
    assert _fit(module, 1, tmp_path).global_step == 1
    for where, net in (("raw", module.networks["planner"]), ("EMA", module.ema.module["planner"])):
        state = net.state_dict()
        assert state.keys() == ema_planner.keys()
        differ = [k for k, v in ema_planner.items() if not torch.equal(state[k], v)]
        assert not differ, f"{where} planner differs from the loaded EMA in {differ[:3]}"
    generator = module.networks["generator"].state_dict()
    assert any(not torch.equal(v, generator[k]) for k, v in _network(loaded["state_dict"], "networks.generator.").items())
    n = len(ema_planner)
    assert lines == [f"train_only: the planner's frozen parameters ({n} of {n}) take their loaded EMA weights, the ones "
                     "the checkpoint samples with, as raw and EMA weights alike"]


def test_a_resume_under_another_train_only_is_refused_naming_the_setting_and_the_fine_tune(tmp_path):
    """A run resumed with a ``train_only`` that trains other parameters is refused before its optimiser state is
    loaded (before, Lightning failed inside ``optimizer.load_state_dict``: "loaded state dict contains a parameter
    group that doesn't match the size of optimizer's group"), naming both settings and the fine-tune with
    ``init_from``; other patterns that select the same parameters resume."""
    trainer = _fit(MarDiniModule(**TINY, train_only=["generator.*"]), 2, tmp_path)
    path = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)} was trained with model\.init_args\.train_only=\['generator\.\*'\], "
                                         r"this fit has \['planner\.\*'\], which trains \d+ parameters the run froze "
                                         r"\(planner\..*\) and freezes \d+ parameters it trained \(generator\..*\): .*"
                                         r"Resume with train_only: \['generator\.\*'\].*--model\.init_args\.init_from "
                                         rf"{re.escape(path)} with --ckpt_path null"):
        _fit(MarDiniModule(**TINY, train_only=["planner.*"]), 3, tmp_path, ckpt_path=path)
    with pytest.raises(ValueError, match=r"train_only=\['generator\.\*'\], this fit has None, which trains \d+ "
                                         r"parameters the run froze \(planner\."):
        _fit(MarDiniModule(**TINY), 3, tmp_path, ckpt_path=path)
    same = ["generator.blocks.*", "generator.*"]  # other patterns, the same parameters
    assert _fit(MarDiniModule(**TINY, train_only=same), 3, tmp_path, ckpt_path=path).global_step == 3


def test_resuming_another_run_s_file_with_other_settings_names_continuing_it_and_fine_tuning_it(ckpts, tmp_path):
    """``--ckpt_path FILE`` of another run's folder, with other settings: the warning says that this fit continues
    that run here and names the fine-tune (``--ckpt_path null`` with ``init_from FILE``), where it named only
    ``--ckpt_path null``, which would start the new settings from scratch; a file of the fit's own checkpoint folder
    keeps the message of a rerun of the run."""
    import warnings

    def resume(path: str, steps: int, plan_dropout: float) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit(MarDiniModule(**TINY, lr=1e-3, plan_dropout=plan_dropout), steps, tmp_path, ckpt_path=path, checkpointing=True)
        return [str(w.message) for w in caught if "other settings than it was trained with" in str(w.message)]

    other = ckpts["joint"]  # another run's checkpoint, at step 1
    (message,) = resume(other, 2, plan_dropout=0.2)
    folder = tmp_path / "checkpoints"
    assert message == (f"resuming {other} with other settings than it was trained with (plan_dropout 0.1 -> 0.2): "
                       f"{other} is not in this fit's checkpoint folder {folder}, so this fit continues that run here "
                       "under the new settings: its step, optimiser, LR schedule and curriculum go on. To start a new "
                       "run from its weights instead (fine-tuning: step 0, a new optimiser and schedule), pass "
                       f"--ckpt_path null with --model.init_args.init_from {other}")
    (own,) = folder.glob("*.ckpt")  # this fit's, at step 2
    (message,) = resume(str(own), 3, plan_dropout=0.3)
    assert "the run goes on from its step under the new ones. To train them as a new run instead, pass --ckpt_path " \
           "null (starts over in the same log folder" in message and "init_from" not in message

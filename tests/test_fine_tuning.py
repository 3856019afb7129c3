"""Fine-tuning a trained checkpoint: which setting takes which kind of checkpoint, and what a start loads."""

from __future__ import annotations

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

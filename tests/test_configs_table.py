"""The config tables are read from the stage YAMLs, count the networks the stages build, and match the docs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from mardini.autoencoders.pixel import SpaceToDepthAutoencoder
from mardini.configs_table import chain_table, main, read_chain, read_stage, summary_table
from mardini.lit import MarDiniModule

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_joint_stage_counts_the_networks_its_module_builds():
    args = yaml.safe_load((TINY / "05_joint_task.yaml").read_text())["model"]["init_args"]
    ae = SpaceToDepthAutoencoder(**args["autoencoder"]["init_args"])
    module = MarDiniModule(**{**args, "autoencoder": ae, "init_from": None})
    stage = read_stage(TINY / "05_joint_task.yaml")
    assert stage.planner[2] == _count(module.networks["planner"])  # joint stage: no projection head
    assert stage.generator == (192, 2, "t", _count(module.networks["generator"]))
    assert stage.trains == "both" and stage.batch == 8 and stage.steps == 1300  # batch from common.yaml
    assert stage.kept == "35-100 % -> 15-60 %"  # the Curriculum callback's first and last milestones


def test_ema_column_is_the_decay_the_stage_module_ends_at(tmp_path):
    args = yaml.safe_load((TINY / "05_joint_task.yaml").read_text())["model"]["init_args"]
    ae = SpaceToDepthAutoencoder(**args["autoencoder"]["init_args"])
    module = MarDiniModule(**{**args, "autoencoder": ae, "init_from": None})
    stage = read_stage(TINY / "05_joint_task.yaml")
    reached, cap = stage.ema
    assert cap == args["ema_decay"] and reached == module.ema.get_decay(stage.steps) < cap  # the ramp, below its cap
    assert f"| {reached:.4f} (cap {cap:g}) |" in chain_table([stage])
    chain = tmp_path / "chain"
    shutil.copytree(TINY, chain)
    cfg = yaml.safe_load((chain / "05_joint_task.yaml").read_text())
    cfg["model"]["init_args"]["ema_warmup"] = False  # the full decay from the first step
    (chain / "05_joint_task.yaml").write_text(yaml.safe_dump(cfg))
    flat = read_stage(chain / "05_joint_task.yaml")
    assert flat.ema == (cap, cap) and chain_table([flat]).endswith(f"| {cap:g} |")


def test_stage_frames_follow_the_module_then_the_data():
    assert read_stage(TINY / "01_dm_warmup_4f.yaml").frames == 4  # model.frames crops the 9-frame clips
    assert read_stage(TINY / "02_dm_warmup_9f.yaml").frames == 9


def test_a_changed_config_changes_the_table(tmp_path):
    chain = tmp_path / "chain"
    shutil.copytree(TINY, chain)
    before = read_chain(chain)
    cfg = yaml.safe_load((chain / "05_joint_task.yaml").read_text())
    cfg["model"]["init_args"]["generator"]["depth"] = 4
    cfg["trainer"]["max_steps"] = 2600
    (chain / "05_joint_task.yaml").write_text(yaml.safe_dump(cfg))
    after = read_chain(chain)
    assert after[-1].generator[3] > before[-1].generator[3] and after[-1].generator[1] == 4
    assert "| 2600 | 20.8k |" in chain_table(after) and "| 1300 | 10.4k |" in chain_table(before)


def test_clips_seen_count_every_accumulated_batch(tmp_path):
    chain = tmp_path / "chain"
    shutil.copytree(TINY, chain)
    cfg = yaml.safe_load((chain / "05_joint_task.yaml").read_text())
    cfg["trainer"]["accumulate_grad_batches"] = 2  # 8 clips per batch, 16 per optimiser step
    (chain / "05_joint_task.yaml").write_text(yaml.safe_dump(cfg))
    stage = read_stage(chain / "05_joint_task.yaml")
    assert stage.clips == 1300 * 16
    # before: "| 8 | 1300 | 10.4k |", half the clips the stage trains on
    assert "| 16 (8 x 2) | 1300 | 20.8k |" in chain_table(read_chain(chain))
    cfg["trainer"]["accumulate_grad_batches"] = {0: 1, 4: 2}  # Lightning's by-epoch scheduler form
    (chain / "05_joint_task.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="accumulate_grad_batches=.*the tables need a positive integer"):
        read_stage(chain / "05_joint_task.yaml")


def test_a_curriculum_subclass_is_read_as_one(tmp_path):
    chain = tmp_path / "chain"
    shutil.copytree(TINY, chain)
    cfg = yaml.safe_load((chain / "05_joint_task.yaml").read_text())
    [cb] = [c for c in cfg["trainer"]["callbacks"] if c["class_path"] == "mardini.lit.curriculum.Curriculum"]
    cb["class_path"] = "user_extensions.WindowSchedule"  # a subclass whose name does not end in "Curriculum"
    (chain / "05_joint_task.yaml").write_text(yaml.safe_dump(cfg))
    assert read_stage(chain / "05_joint_task.yaml").kept == "35-100 % -> 15-60 %"  # its milestones, as before
    from mardini.configs_table import is_curriculum

    assert is_curriculum("no_such_package.MyCurriculum")  # not importable: judged by its name
    assert not is_curriculum("mardini.lit.sample_grids.SampleGrids")


def test_the_paper_chains_name_their_final_models():
    text = main([])
    for name in ("MarDini-S/ST-512", "MarDini-S/T-1024", "MarDini-L/ST-512", "MarDini-L/T-1024"):
        assert f"| {name} |" in text
    assert "| tiny | `configs/tiny/` 01-05 |" in text
    paper_l = read_chain(ROOT / "configs" / "paper" / "mardini-l")
    assert paper_l[-1].planner[0] == 4096 and paper_l[-1].planner[1] == 16 and paper_l[-1].generator[2] == "t"


def test_a_file_that_is_not_a_stage_is_named(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("model: {class_path: torch.nn.Linear}\n")
    with pytest.raises(ValueError, match="x.yaml.*not a MarDini stage module"):
        read_stage(bad)
    with pytest.raises(FileNotFoundError, match="no stage YAML"):
        read_chain(tmp_path / "empty")


def _block(text: str, tag: str) -> str:
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    assert start in text and end in text, f"the doc lacks the {tag} markers"
    return text[text.index(start) + len(start): text.index(end)].strip()


def test_readme_and_paper_config_docs_hold_the_current_tables():
    """Edit a stage config, then rerun the commands the docs name (python -m mardini.configs_table ...)."""
    readme = (ROOT / "README.md").read_text()
    assert _block(readme, "configs_table") == summary_table(
        [read_chain(ROOT / c) for c in ("configs/tiny", "configs/paper/mardini-s", "configs/paper/mardini-l")])
    paper = (ROOT / "configs" / "paper" / "README.md").read_text()
    for size in ("mardini-s", "mardini-l"):
        assert _block(paper, f"configs_table {size}") == chain_table(read_chain(ROOT / "configs" / "paper" / size))
    assert _block(readme, "configs_table tiny") == chain_table(read_chain(TINY))

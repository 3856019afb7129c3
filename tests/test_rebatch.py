"""``python -m mardini.rebatch``: the tiny chain at another batch size sees the same clips, on its own runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from mardini import rebatch
from mardini.configs_table import read_chain

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_batch_4_doubles_the_steps_and_keeps_the_clips_seen(tmp_path):
    dst = tmp_path / "tiny_b4"
    rebatch.main([str(TINY), str(dst), "--batch", "4", "--save-dir", "outputs/tiny_b4"])
    old, new = read_chain(TINY), read_chain(dst)
    assert [s.path.name for s in new] == [s.path.name for s in old]
    for a, b in zip(old, new):
        assert b.batch == 4 and a.batch == 8
        assert b.steps == 2 * a.steps and b.clips == a.clips  # same clips seen, per stage
        assert (b.planner, b.generator, b.frames, b.resolution) == (a.planner, a.generator, a.frames, a.resolution)
    for name in [s.path.name for s in old]:
        src, out = _load(TINY / name), _load(dst / name)
        args, new_args = src["model"]["init_args"], out["model"]["init_args"]
        assert new_args["warmup_steps"] == 2 * args["warmup_steps"]
        assert new_args["ema_decay"] == pytest.approx(1 - (1 - args["ema_decay"]) / 2)  # same time constant in clips
        assert new_args["lr"] == args["lr"]
        assert out["trainer"]["logger"]["init_args"]["save_dir"] == "outputs/tiny_b4"
        for key in rebatch.CKPT_KEYS:
            if key in args:  # the chain reads its own earlier stages, never the original's
                assert new_args[key] == args[key].replace("outputs/tiny/", "outputs/tiny_b4/")
    curriculum = [c for c in _load(dst / "05_joint_task.yaml")["trainer"]["callbacks"]
                  if c["class_path"].endswith("Curriculum")][0]["init_args"]["milestones"]
    original = [c for c in _load(TINY / "05_joint_task.yaml")["trainer"]["callbacks"]
                if c["class_path"].endswith("Curriculum")][0]["init_args"]["milestones"]
    assert [m["step"] for m in curriculum] == [2 * m["step"] for m in original]
    assert _load(dst / "common.yaml")["data"]["init_args"]["batch_size"] == 4
    assert (dst / "common.yaml").read_text().startswith("# Written by `python -m mardini.rebatch")


def test_a_stage_with_its_own_batch_is_rescaled_from_it(tmp_path):
    src, dst = tmp_path / "chain", tmp_path / "chain_b4"
    src.mkdir()
    for f in TINY.glob("*.yaml"):
        cfg = _load(f)
        if f.name == "03_mar_warmup.yaml":  # this stage trains at 16, the others at common.yaml's 8
            cfg["data"] = {"init_args": {"batch_size": 16}}
        (src / f.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    rebatch.main([str(src), str(dst), "--batch", "4", "--save-dir", "outputs/tiny_b4"])
    old, new = {s.path.name: s for s in read_chain(src)}, {s.path.name: s for s in read_chain(dst)}
    assert old["03_mar_warmup.yaml"].batch == 16 and old["02_dm_warmup_9f.yaml"].batch == 8
    for name, b in new.items():
        assert b.batch == 4 and b.clips == old[name].clips
    assert new["03_mar_warmup.yaml"].steps == 4 * old["03_mar_warmup.yaml"].steps
    assert _load(dst / "03_mar_warmup.yaml")["model"]["init_args"]["warmup_steps"] == 4 * _load(
        src / "03_mar_warmup.yaml")["model"]["init_args"]["warmup_steps"]


def test_a_curriculum_subclass_s_milestones_are_rescaled(tmp_path):
    """A callback whose class imports as a Curriculum subclass is one, whatever its name (``WindowSchedule``)."""
    src, dst = tmp_path / "chain", tmp_path / "chain_b4"
    shutil.copytree(TINY, src)
    cfg = _load(src / "05_joint_task.yaml")
    [cb] = [c for c in cfg["trainer"]["callbacks"] if c["class_path"] == "mardini.lit.curriculum.Curriculum"]
    cb["class_path"] = "user_extensions.WindowSchedule"
    (src / "05_joint_task.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rebatch.main([str(src), str(dst), "--batch", "4", "--save-dir", "outputs/tiny_b4"])
    [new] = [c for c in _load(dst / "05_joint_task.yaml")["trainer"]["callbacks"]
             if c["class_path"] == "user_extensions.WindowSchedule"]
    assert [m["step"] for m in new["init_args"]["milestones"]] == [2 * m["step"] for m in cb["init_args"]["milestones"]]


def test_bad_requests_fail_naming_the_problem(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(SystemExit, match="at least 1"):
        rebatch.main([str(TINY), str(dst), "--batch", "0", "--save-dir", "outputs/x"])
    with pytest.raises(SystemExit, match="the chain's own"):
        rebatch.main([str(TINY), str(dst), "--batch", "4", "--save-dir", "outputs/tiny"])
    with pytest.raises(SystemExit, match="common.yaml"):
        rebatch.main([str(tmp_path), str(dst), "--batch", "4", "--save-dir", "outputs/x"])
    rebatch.main([str(TINY), str(dst), "--batch", "4", "--save-dir", "outputs/x"])
    with pytest.raises(SystemExit, match="--force"):
        rebatch.main([str(TINY), str(dst), "--batch", "2", "--save-dir", "outputs/x"])
    rebatch.main([str(TINY), str(dst), "--batch", "2", "--save-dir", "outputs/x", "--force"])
    assert read_chain(dst)[0].batch == 2 and read_chain(dst)[0].steps == 4 * read_chain(TINY)[0].steps


def test_the_lr_decay_length_is_rescaled_with_the_steps(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    stage = src / "01_dm_warmup_4f.yaml"
    cfg = _load(stage)
    cfg["model"]["init_args"]["decay_steps"] = 300  # a user's own cosine length
    stage.write_text(yaml.safe_dump(cfg))
    rebatch.main([str(src), str(tmp_path / "b4"), "--batch", "4", "--save-dir", "outputs/b4"])
    out = _load(tmp_path / "b4" / "01_dm_warmup_4f.yaml")
    assert out["model"]["init_args"]["decay_steps"] == 600
    assert out["trainer"]["max_steps"] == 2 * cfg["trainer"]["max_steps"]

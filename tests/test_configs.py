"""Every shipped stage config parses through the CLI (with the DDP and FSDP cluster settings for the paper ones)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mardini.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = sorted((CONFIGS / "paper").glob("mardini-*/*.yaml"))
TINY = sorted(p for p in (CONFIGS / "tiny").glob("*.yaml") if p.name != "common.yaml")


def _printed(capsys, *configs: Path) -> dict:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_the_paper_chain_is_complete():
    assert [p.name[:2] for p in PAPER if "mardini-s" in str(p)] == [f"{i:02d}" for i in range(1, 11)]
    assert len(PAPER) == 20


@pytest.mark.parametrize("cluster", ["cluster.yaml", "fsdp.yaml"])
@pytest.mark.parametrize("stage", PAPER, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_stage_parses(capsys, stage, cluster):
    cfg = _printed(capsys, stage, CONFIGS / "paper" / cluster)
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["trainer"]["max_steps"] > 0
    strategy = cfg["trainer"]["strategy"]["class_path"]
    assert strategy.endswith("FSDPStrategy" if cluster == "fsdp.yaml" else "DDPStrategy")
    assert cfg["model"]["init_args"]["size"].startswith("mardini-")


@pytest.mark.parametrize("stage", TINY, ids=lambda p: p.stem)
def test_tiny_stage_parses(capsys, stage):
    cfg = _printed(capsys, CONFIGS / "tiny" / "common.yaml", stage)
    assert cfg["model"]["init_args"]["size"] == "tiny" and cfg["trainer"]["accelerator"] == "cpu"

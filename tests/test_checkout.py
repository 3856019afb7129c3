"""The demo, the reproduction and ``configs_table`` read the checkout's configs from any folder, and a non-editable
install (the package alone in site-packages) says that they need the checkout, before any data is built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Stop(Exception):
    """Ends a command once it has shown what it reads (no training here)."""


def test_the_demo_reads_the_checkout_s_configs_from_another_folder(tmp_path, monkeypatch):
    """``cd /tmp/x && python -m mardini.demo`` built data/shards there, then stopped: no configs/tiny/common.yaml."""
    from mardini.demo import chain
    from mardini.demo import main as demo

    read = []

    def first_stage(name, config_dir=None, **kw):
        config_dir = chain.TINY_DIR if config_dir is None else config_dir
        read.append(chain.stage_settings(config_dir / "common.yaml", config_dir / f"{name}.yaml"))
        raise Stop

    monkeypatch.setattr(demo, "build_synthetic", lambda *a, **k: [])
    monkeypatch.setattr(demo, "run_stage", first_stage)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Stop):
        demo.main(["--no-progress"])
    assert read[0]["model"]["class_path"].endswith("GenerationModule")  # 01_dm_warmup_4f, from the checkout


def test_the_reproduction_copies_the_checkout_s_configs_from_another_folder(tmp_path, monkeypatch):
    from mardini.demo import data
    from mardini.reproduce import main as reproduce
    from mardini.reproduce import runs

    def pair(configs, *a, **k):
        assert (configs / "fig6c_identity_off.yaml").is_file() and (configs / "common.yaml").is_file()
        raise Stop

    monkeypatch.setattr(data, "build_synthetic", lambda *a, **k: [])
    monkeypatch.setattr(runs, "train_identity_pair", pair)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Stop):
        reproduce.main(["--quick", "--only", "fig6c", "--out", "out", "--no-progress"])


def _configs_table() -> int:
    import runpy
    import warnings

    with pytest.raises(SystemExit) as exit, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'mardini.configs_table' found in sys.modules", RuntimeWarning)
        runpy.run_module("mardini.configs_table", run_name="__main__")
    return exit.value.code


@pytest.mark.parametrize("module", ["mardini.demo", "mardini.reproduce", "mardini.configs_table"])
def test_without_a_checkout_the_command_says_it_needs_one_before_building_anything(tmp_path, monkeypatch, capsys,
                                                                                  module):
    """After ``pip install .`` (the package alone), the demo built its data set and then failed on the relative
    configs/tiny, the reproduction the same, and configs_table raised ``no stage YAML in
    .../site-packages/configs/tiny``."""
    from mardini import checkout
    from mardini.demo import data
    from mardini.demo import main as demo
    from mardini.reproduce import main as reproduce

    built = []
    monkeypatch.setattr(data, "build_synthetic", lambda *a, **k: built.append(a) or [])
    monkeypatch.setattr(demo, "build_synthetic", lambda *a, **k: built.append(a) or [])
    monkeypatch.setattr(checkout, "ROOT", tmp_path / "site-packages")  # where a non-editable install puts mardini
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [module])
    run = {"mardini.demo": lambda: demo.cli(["--no-progress"]), "mardini.configs_table": _configs_table,
           "mardini.reproduce": lambda: reproduce.cli(["--quick", "--no-progress"])}[module]
    code = run()
    err = capsys.readouterr().err
    assert code == 2 and not built and not any(tmp_path.iterdir())
    assert err.startswith(f"python -m {module}: error: this command reads the repository's configs/")
    assert "no source checkout" in err and "`pip install -e .` in the clone" in err and "Traceback" not in err


def test_an_installed_copy_of_the_package_finds_no_checkout_and_builds_nothing(tmp_path):
    """The package copied alone (as ``pip install .`` installs it), run from another folder."""
    site, work = tmp_path / "site-packages", tmp_path / "work"
    shutil.copytree(ROOT / "mardini", site / "mardini", ignore=shutil.ignore_patterns("__pycache__"))
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "MARDINI_TRACEBACK": "0"}
    done = subprocess.run([sys.executable, "-m", "mardini.demo", "--train-clips", "2", "--no-progress"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(f"python -m mardini.demo: error: this command reads the repository's "
                                  f"configs/tiny, and mardini runs from {site}, which is no source checkout")
    assert not any(work.iterdir())  # no data set, no outputs


def test_a_checkout_missing_a_file_says_how_to_restore_it(tmp_path, monkeypatch):
    from mardini import checkout

    (tmp_path / "configs").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setattr(checkout, "ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"configs/tiny is missing from the checkout: restore it with `git -C "):
        checkout.repo_path("configs/tiny")
    assert checkout.repo_path("configs") == tmp_path / "configs" and checkout.is_checkout()

"""The settings file a ``train.py`` run saves (``mardini/cli_saved_config.py``), with a stub trainer: no fit runs.
Lightning's own save is replaced by writing the new config.yaml by hand, as it would."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import pytest
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback

from mardini.cli_saved_config import KeepEarlierConfig, keep_earlier_config

EARLIER, NEW = "ckpt_path: null\nlr: 0.002\n", "ckpt_path: null\nlr: 0.001\n"


@pytest.fixture
def saver(monkeypatch, tmp_path):
    """A ``KeepEarlierConfig`` of the settings ``NEW`` and a rank-0 trainer logging in ``tmp_path``."""
    monkeypatch.setattr(SaveConfigCallback, "setup", lambda *args: None)
    parser = LightningArgumentParser()
    parser.add_argument("--ckpt_path", type=Optional[str], default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    return (KeepEarlierConfig(parser, parser.parse_args([]), command="train.py fit --lr 1e-3"),
            SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True))


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_the_earlier_config_is_kept_under_the_first_free_number(tmp_path):
    (tmp_path / "config.1.yaml").write_text("lr: 1\n")
    (tmp_path / "config.yaml").write_text("lr: 2\n")
    assert keep_earlier_config(tmp_path / "config.yaml", "lr: 3\n") == tmp_path / "config.2.yaml"
    assert (tmp_path / "config.1.yaml").read_text() == "lr: 1\n" and (tmp_path / "config.2.yaml").read_text() == "lr: 2\n"


def test_a_config_that_does_not_parse_is_kept_and_the_same_settings_are_not(tmp_path):
    (tmp_path / "config.yaml").write_text("lr: [unclosed\n")
    assert keep_earlier_config(tmp_path / "config.yaml", "lr: 3\n") == tmp_path / "config.1.yaml"
    (tmp_path / "config.yaml").write_text("lr: 3\n# a comment\n")
    assert keep_earlier_config(tmp_path / "config.yaml", "lr: 3.0\n") is None


def test_a_fit_failing_before_training_puts_the_earlier_config_back(saver, tmp_path):
    save, trainer = saver
    (tmp_path / "config.yaml").write_text(EARLIER)
    save.setup(trainer, None, "fit")
    (tmp_path / "config.yaml").write_text(NEW)  # Lightning's save
    save.on_exception(trainer, None, RuntimeError("sanity check failed"))
    assert _names(tmp_path) == ["config.yaml"] and (tmp_path / "config.yaml").read_text() == EARLIER


def test_a_fit_failing_once_training_started_keeps_both_configs_until_put_back(saver, tmp_path):
    """The new settings trained: config.yaml is theirs and the earlier one stays kept, until ``put_back`` (the earlier
    run put back) restores the earlier file byte for byte."""
    save, trainer = saver
    (tmp_path / "config.yaml").write_text(EARLIER)
    save.setup(trainer, None, "fit")
    (tmp_path / "config.yaml").write_text(NEW)
    save.on_train_start(trainer, None)
    save.on_exception(trainer, None, RuntimeError("step 3 failed"))
    assert (tmp_path / "config.yaml").read_text() == NEW and (tmp_path / "config.1.yaml").read_text() == EARLIER
    save.put_back()
    assert _names(tmp_path) == ["config.yaml"] and (tmp_path / "config.yaml").read_text() == EARLIER


@pytest.mark.parametrize("earlier", [None, "ckpt_path: null\nlr: 0.001  # the same settings\n"])
def test_put_back_restores_no_config_or_the_same_settings_bytes(saver, tmp_path, earlier):
    save, trainer = saver
    if earlier is not None:
        (tmp_path / "config.yaml").write_text(earlier)
    save.setup(trainer, None, "fit")
    (tmp_path / "config.yaml").write_text(NEW)
    save.on_train_start(trainer, None)
    save.put_back()
    assert _names(tmp_path) == ([] if earlier is None else ["config.yaml"])
    if earlier is not None:
        assert (tmp_path / "config.yaml").read_text() == earlier


def test_a_validate_writes_validate_yaml_headed_by_its_command_and_checkpoint_in_ascii(saver, tmp_path):
    """validate leaves config.yaml alone (it is what the run trained with) and writes validate.yaml, whose header
    names the command and the checkpoint scored, non-ASCII escaped."""
    save, trainer = saver
    (tmp_path / "config.yaml").write_text(EARLIER)
    save.command, save.scored = "train.py validate --ckpt_path r\u00e9sum\u00e9.ckpt", "r\u00e9sum\u00e9.ckpt (global step 2)"
    save.setup(trainer, None, "validate")
    (tmp_path / "validate.yaml").write_text(NEW)
    save.save_config(trainer, None, "validate")
    assert _names(tmp_path) == ["config.yaml", "validate.yaml"] and (tmp_path / "config.yaml").read_text() == EARLIER
    text = (tmp_path / "validate.yaml").read_bytes().decode("ascii")
    assert text.startswith("# train.py validate --ckpt_path r\\xe9sum\\xe9.ckpt\n# (the command")
    assert "# scored: r\\xe9sum\\xe9.ckpt (global step 2), the checkpoint" in text and text.endswith(NEW)

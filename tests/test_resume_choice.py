"""Which checkpoint ``train.py`` resumes or scores (``mardini/cli_resume.py``), on files alone: no fit runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mardini.cli_resume import deleted_by_fit_hint, resume_checkpoint, resumed_file, resumed_step


def _save(folder: Path, name: str, step: int | None, mtime: int) -> Path:
    """A checkpoint ``name`` recording ``step`` (none: None), modified at ``mtime`` (seconds)."""
    path = folder / name
    torch.save({} if step is None else {"global_step": step}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_the_highest_step_is_resumed_though_an_older_step_s_file_is_newer(tmp_path):
    """A kill between stepN.ckpt and last.ckpt leaves an older last.ckpt, written later than step 2's by a rerun:
    the step decides, not the file's time."""
    _save(tmp_path, "step00000002.ckpt", 2, mtime=1_000)
    _save(tmp_path, "last.ckpt", 1, mtime=2_000)
    _save(tmp_path, "hpc_ckpt_1.ckpt", 0, mtime=3_000)
    assert resume_checkpoint(str(tmp_path)) == str(tmp_path / "step00000002.ckpt")


def test_among_equal_steps_the_newest_file_is_resumed(tmp_path):
    """last.ckpt and a preemption checkpoint of the same step: the one written later (the preemption's)."""
    _save(tmp_path, "last.ckpt", 4, mtime=1_000)
    _save(tmp_path, "hpc_ckpt_1.ckpt", 4, mtime=2_000)
    assert resume_checkpoint(str(tmp_path)) == str(tmp_path / "hpc_ckpt_1.ckpt")


def test_only_the_files_a_fit_writes_are_resumed(tmp_path):
    """A checkpoint of one's own in the folder (a copy, Lightning's ``epoch=..`` name) is never resumed, however
    high its step; a folder of those alone resumes nothing."""
    for name in ("best.ckpt", "epoch=3-step=9.ckpt", "last.ckpt.orig.ckpt", "step00000009-copy.ckpt"):
        _save(tmp_path, name, 9, mtime=2_000)
    assert resume_checkpoint(str(tmp_path)) is None
    _save(tmp_path, "last.ckpt", 1, mtime=1_000)
    assert resume_checkpoint(str(tmp_path)) == str(tmp_path / "last.ckpt")


@pytest.mark.parametrize("name,hinted", [("step00000100.ckpt", True), ("hpc_ckpt_3.ckpt", True),
                                         ("last.ckpt", False), ("mine.ckpt", False)])
def test_only_the_files_a_fit_deletes_get_the_hint_that_it_deletes_them(name, hinted):
    """A fit deletes its older step and preemption checkpoints, not last.ckpt nor a file of one's own."""
    assert bool(deleted_by_fit_hint(Path("stage") / "checkpoints" / name)) is hinted


@pytest.mark.parametrize("ckpt_path", [None, "last", "best", "hpc", "registry", "registry:my-model:latest"])
def test_lightning_s_keywords_name_no_file_the_cli_reads(ckpt_path):
    """``--ckpt_path`` keywords (the model registry's too) are Lightning's to resolve: no local file, no step."""
    assert resumed_file(ckpt_path) is None and resumed_step(ckpt_path) is None


def test_the_resumed_step_is_the_one_the_checkpoint_records_and_none_where_it_records_none(tmp_path):
    assert resumed_step(str(_save(tmp_path, "step00000007.ckpt", 7, mtime=1_000))) == 7
    assert resumed_step(str(_save(tmp_path, "weights.ckpt", None, mtime=1_000))) is None

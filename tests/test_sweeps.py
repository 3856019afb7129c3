"""What a hyper-parameter sweep needs beyond one run: a folder per run from the environment (a SLURM job array's task
id), each run's code and library versions on record, and the best checkpoint by a monitored metric."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mardini.data.testing import tiny_synthetic
from test_run_lock import _config, _fit


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    tiny_synthetic(root / "data" / "shards" / "synthetic", train=8, val=4, frames=8, size=32)
    return root


def test_a_job_array_s_task_id_in_the_logger_version_gives_each_task_its_folder(workdir, monkeypatch, tmp_path):
    """``version: task${SLURM_ARRAY_TASK_ID}`` (as sbatch passes it to scripts/slurm_train.sh, unexpanded) is
    expanded in the job; config.yaml records the folder. Before, every task logged in the one folder named
    ``task${SLURM_ARRAY_TASK_ID}``."""
    version = "--trainer.logger.init_args.version=task${SLURM_ARRAY_TASK_ID}"
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        _fit(workdir, monkeypatch, _config(tmp_path), version)
    stage = tmp_path / "stage"
    assert sorted(p.name for p in stage.iterdir()) == ["task0", "task1"]
    for task in ("0", "1"):
        assert (stage / f"task{task}" / "checkpoints" / "last.ckpt").is_file()
        saved = yaml.safe_load((stage / f"task{task}" / "config.yaml").read_text())
        assert saved["trainer"]["logger"]["init_args"]["version"] == f"task{task}"
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(ValueError, match=r"names the environment variable\(s\) SLURM_ARRAY_TASK_ID, not set here"):
        _fit(workdir, monkeypatch, _config(tmp_path), version)

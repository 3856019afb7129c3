"""``scripts/slurm_train.sh``: the python and train.py it hands srun, from any folder and from sbatch's spooled copy
of the script (a stand-in ``srun`` records its arguments; no SLURM here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_train.sh"
TRAIN_ARGS = ["fit", "--config", "stage.yaml", "--ckpt_path", "last", "--config", "overlay.yaml",
              "--trainer.num_nodes", "2", "--trainer.devices", "4"]


def run(tmp: Path, script: Path, scontrol: str | None = None, **env: str) -> tuple[subprocess.CompletedProcess, list]:
    """``bash script stage.yaml --config overlay.yaml`` in ``tmp/job`` on 2 nodes of 4 GPUs; what srun was given."""
    bin_dir, job, args = tmp / "bin", tmp / "job", tmp / "srun_args"
    for folder in (bin_dir, job):
        folder.mkdir(exist_ok=True)
    stubs = {"srun": f'printf "%s\\n" "$@" > {args}'}
    if scontrol is not None:  # `scontrol show job ID`: the job's record, its Command the submitted script
        stubs["scontrol"] = f'printf "JobId=7 JobName=mardini\\n   Command={scontrol} stage.yaml\\n   WorkDir={job}\\n"'
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    args.unlink(missing_ok=True)
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp),
            "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "h100:4"}
    done = subprocess.run(["bash", str(script), "stage.yaml", "--config", "overlay.yaml"], cwd=job,
                          env={**base, **env}, capture_output=True, text=True, timeout=60)
    return done, args.read_text().splitlines() if args.exists() else []


def is_train_py(arg: str) -> bool:
    """The checkout's train.py by an absolute path (a relative one would be read in the job's folder)."""
    return Path(arg).is_absolute() and Path(arg).resolve() == ROOT / "train.py"


def test_from_another_folder_it_runs_the_checkout_s_train_py_with_its_venv_or_the_path_s_python(tmp_path):
    """``srun .venv/bin/python train.py fit ...`` assumed the checkout as the current folder and the Makefile's venv:
    from another folder or in a conda environment, ``.venv/bin/python: No such file or directory``."""
    done, srun = run(tmp_path, SCRIPT)
    venv = ROOT / ".venv" / "bin" / "python"
    assert done.returncode == 0, done.stderr
    assert srun[0] == (str(venv) if os.access(venv, os.X_OK) else "python")
    assert is_train_py(srun[1]) and srun[2:] == TRAIN_ARGS  # config paths as given
    done, srun = run(tmp_path, SCRIPT, PYTHON="/opt/conda/envs/mardini/bin/python")
    assert done.returncode == 0 and srun[0] == "/opt/conda/envs/mardini/bin/python" and srun[2:] == TRAIN_ARGS


@pytest.mark.parametrize("found_by", ["scontrol", "submit folder", "MARDINI_ROOT"])
def test_sbatch_s_spooled_copy_finds_the_checkout(tmp_path, found_by):
    """sbatch runs a copy of the script from slurmd's spool folder: the checkout is the submitted script's (scontrol's
    Command), else the folder sbatch was called from, or $MARDINI_ROOT."""
    spooled = tmp_path / "spool" / "job7" / "slurm_script"
    spooled.parent.mkdir(parents=True)
    shutil.copy(SCRIPT, spooled)
    env = {"SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(ROOT if found_by == "submit folder" else tmp_path),
           **({"MARDINI_ROOT": str(ROOT)} if found_by == "MARDINI_ROOT" else {})}
    done, srun = run(tmp_path, spooled, scontrol=str(SCRIPT) if found_by == "scontrol" else None, **env)
    assert done.returncode == 0, done.stderr
    assert is_train_py(srun[1]) and srun[2:] == TRAIN_ARGS


def test_without_a_checkout_to_find_it_is_one_line_naming_mardini_root(tmp_path):
    spooled = tmp_path / "spool" / "slurm_script"
    spooled.parent.mkdir()
    shutil.copy(SCRIPT, spooled)
    done, srun = run(tmp_path, spooled, SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(tmp_path))
    assert done.returncode == 2 and not srun
    assert done.stderr.startswith("slurm_train.sh: error: no train.py in ") and "set MARDINI_ROOT" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

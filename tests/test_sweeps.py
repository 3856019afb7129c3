"""What a hyper-parameter sweep needs beyond one run: a folder per run from the environment (a SLURM job array's task
id), each run's code and library versions on record, and the best checkpoint by a monitored metric."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest
import yaml

import mardini
from mardini.data.testing import tiny_synthetic
from test_run_lock import _config, _fit

REPO = Path(__file__).resolve().parents[1]


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


def test_a_run_records_its_git_commit_and_library_versions_with_its_hyper_parameters(workdir, monkeypatch, tmp_path):
    """hparams.yaml (and TensorBoard's HParams tab) say which code and libraries trained the run. Before, nothing in
    the run's folder did: runs of a sweep trained at different commits or library versions looked alike."""
    from importlib.metadata import version

    from test_training_logs import _hparams_in_events

    _fit(workdir, monkeypatch, _config(tmp_path))
    folder = tmp_path / "stage"
    code = yaml.safe_load((folder / "hparams.yaml").read_text()).get("code") or {}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert code.get("git_commit") == (head.stdout.strip() if head.returncode == 0 else None)
    assert code.get("git_dirty") in ((True, False) if head.returncode == 0 else (None,))
    assert {k: code.get(k) for k in ("mardini", "python", "torch", "lightning")} == {
        "mardini": mardini.__version__, "python": platform.python_version(), "torch": version("torch"),
        "lightning": version("lightning")}
    shown = _hparams_in_events(folder)
    assert shown["code/lightning"] == version("lightning") and shown["code/git_commit"] == str(code["git_commit"])


def test_each_checkpoint_records_the_code_that_saved_it_and_every_commit_the_run_trained_with(workdir, monkeypatch,
                                                                                             tmp_path):
    """A fit, then its resume under another commit (faked): the last checkpoint holds the resuming process's code and
    both commits with the steps they trained from, hparams.yaml the same history, and the resume said it went on
    from a checkpoint of another commit. Before, a checkpoint said nothing of its code and hparams.yaml held the
    latest start's commit only."""
    from importlib.metadata import version

    import torch

    from mardini import run_info
    from mardini.lit import checkpoint_hooks
    from mardini.lit.run_settings import code_settings

    said: list[str] = []
    monkeypatch.setattr(checkpoint_hooks, "rank_zero_info", said.append)
    code_settings.cache_clear()
    real = run_info.code_version()
    _fit(workdir, monkeypatch, _config(tmp_path))  # 2 steps
    other = {**real, "git_commit": "f" * 40, "git_dirty": True}
    monkeypatch.setattr(run_info, "code_version", lambda root=None: other)
    code_settings.cache_clear()
    try:
        _fit(workdir, monkeypatch, _config(tmp_path), "--trainer.max_steps=3")
    finally:
        code_settings.cache_clear()
    folder = tmp_path / "stage"
    meta = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["mardini"]
    assert {k: meta["code"][k] for k in ("git_commit", "git_dirty", "mardini", "torch")} == {
        "git_commit": "f" * 40, "git_dirty": True, "mardini": mardini.__version__, "torch": version("torch")}
    history = [(e["git_commit"], e["git_dirty"], e["from_step"]) for e in meta["code_history"]]
    assert history == [(real["git_commit"], real["git_dirty"], 0), ("f" * 40, True, 2)]
    shown = yaml.safe_load((folder / "hparams.yaml").read_text())["code"]["history"]
    assert [(e["git_commit"], e["from_step"]) for e in shown] == [(real["git_commit"], 0), ("f" * 40, 2)]
    lines = [line for line in said if line.startswith("resuming ")]
    assert len(lines) == 1 and f"commit {(real['git_commit'] or '')[:12]}" in lines[0], said
    assert "this fit runs commit ffffffffffff with uncommitted changes" in lines[0]


def test_outside_a_git_checkout_the_code_a_run_and_its_checkpoints_record_holds_the_sources_digest(monkeypatch,
                                                                                                    tmp_path):
    """Outside a git checkout (a wheel, a copy) ``code_settings`` -- hparams.yaml's ``code``, each checkpoint's
    ``code`` and ``code_history`` -- held the version alone (``git_commit`` and ``git_dirty`` None), so a resume with
    changed sources of the same version added no history entry and said nothing. It holds ``source`` there now, as
    ``evaluate.py``'s record does, and the history and the resume's line tell two sources apart."""
    from mardini import run_info
    from mardini.lit.code_record import entry, extended, other_code_line
    from mardini.lit.run_settings import code_settings

    real = run_info.code_version
    monkeypatch.setattr(run_info, "code_version", lambda root=None: real(tmp_path))  # tmp_path: no repository
    code_settings.cache_clear()
    try:
        code = code_settings()
    finally:
        code_settings.cache_clear()
    assert code["git_commit"] is None and code["source"] == run_info.source_digest()
    changed = {**code, "source": "sha256:0123456789abcdef"}  # the same version, other sources
    history = extended([entry(code, 0)], changed, 5)
    assert [(e["source"], e["from_step"]) for e in history] == [(code["source"], 0), (changed["source"], 5)]
    line = other_code_line("last.ckpt", code, changed) or ""
    assert f"written by the sources {code['source']} (no git commit" in line
    assert f"this fit runs the sources {changed['source']}" in line
    assert other_code_line("last.ckpt", code, dict(code)) is None


VALIDATE_EACH_STEP = ["--trainer.max_steps=4", "--trainer.limit_val_batches=2", "--trainer.val_check_interval=1"]


def _best(folder: Path) -> list[Path]:
    return sorted((folder / "checkpoints").glob("best-*.ckpt"))


def test_the_shipped_best_val_loss_callback_keeps_the_checkpoint_of_the_lowest_val_loss(workdir, monkeypatch, tmp_path):
    """configs/callbacks/best_val_loss.yaml, appended to a stage's callbacks as README says, keeps one checkpoint, the
    step of the lowest val/loss; last.ckpt stays the one a rerun resumes."""
    import torch

    from test_training_logs import _scalars

    best = f"--trainer.callbacks+={REPO / 'configs' / 'callbacks' / 'best_val_loss.yaml'}"
    _fit(workdir, monkeypatch, _config(tmp_path), best, *VALIDATE_EACH_STEP)
    folder = tmp_path / "stage"
    losses = [v for _, v in _scalars(folder, "val/loss")]
    assert len(losses) == 4 and len(set(losses)) == 4
    (kept,) = _best(folder)
    saved = torch.load(kept, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 1 + losses.index(min(losses))
    assert kept.name == f"best-step{saved['global_step']:08d}-val_loss{min(losses):.4f}.ckpt"
    again = _fit(workdir, monkeypatch, _config(tmp_path), best, *VALIDATE_EACH_STEP[1:], "--trainer.max_steps=5")
    assert again.trainer.global_step == 5  # resumed from last.ckpt (step 4), not from the best checkpoint


def test_the_shipped_evaluation_callbacks_keep_the_checkpoint_of_the_best_interpolation_psnr(workdir, monkeypatch,
                                                                                           tmp_path):
    """interpolation_eval.yaml then best_interpolation_psnr.yaml (README's command; the window and clip count cut to
    this test's data) keep the checkpoint of the highest eval/interpolation/midf_psnr."""
    from test_training_logs import _scalars

    callbacks = REPO / "configs" / "callbacks"
    _fit(workdir, monkeypatch, _config(tmp_path), *VALIDATE_EACH_STEP,
         f"--trainer.callbacks+={callbacks / 'interpolation_eval.yaml'}", "--trainer.callbacks.init_args.frames=4",
         "--trainer.callbacks.init_args.num_clips=2", "--trainer.callbacks.init_args.steps=2",
         f"--trainer.callbacks+={callbacks / 'best_interpolation_psnr.yaml'}")
    folder = tmp_path / "stage"
    psnr = [v for _, v in _scalars(folder, "eval/interpolation/midf_psnr")]
    assert len(psnr) == 4
    (kept,) = _best(folder)
    assert kept.name.endswith(f"-midf_psnr{max(psnr):.2f}.ckpt")


def test_config_yaml_begins_with_the_command_and_its_overrides_and_still_loads(workdir, monkeypatch, tmp_path):
    """A sweep's runs differ by their overrides: config.yaml names the command that made it (a YAML comment), above
    the resolved settings. Before, the file held the settings alone."""
    tmp_path = tmp_path / "sweep \u00e9"  # a non-ASCII path: the command line is written in ASCII, escaped
    tmp_path.mkdir()
    config = _config(tmp_path)
    _fit(workdir, monkeypatch, config, "--model.init_args.lr=0.002")
    assert all(line.isascii() for line in (tmp_path / "stage" / "config.yaml").read_bytes().splitlines()[:2])
    text = (tmp_path / "stage" / "config.yaml").read_text()
    first = text.splitlines()[0]
    shown = str(config).encode("ascii", "backslashreplace").decode()
    assert first.startswith(f"# train.py fit --config '{shown}' ") and first.endswith(" --model.init_args.lr=0.002")
    assert yaml.safe_load(text)["model"]["init_args"]["lr"] == 0.002
    again = _fit(workdir, monkeypatch, config, "--model.init_args.lr=0.002", "--trainer.max_steps=3")  # a resume
    assert again.trainer.global_step == 3
    assert (tmp_path / "stage" / "config.1.yaml").read_text() == text  # the first part's, kept with its command
    assert (tmp_path / "stage" / "config.yaml").read_text().splitlines()[0].endswith(" --trainer.max_steps=3")

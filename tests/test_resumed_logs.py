"""The logs of a stage across resumes and new runs: one x-axis, every step once, an earlier run's logs set aside."""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mardini.cli import main
from mardini.data.testing import tiny_synthetic
from mardini.lit.checkpoints import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
STAGE = "01_dm_warmup_4f"
FAST = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.num_workers=0", "--data.init_args.epoch_size=64", "--data.init_args.batch_size=4",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.precision=32-true",
        "--trainer.log_every_n_steps=1",
        "--model.init_args.decay_steps=16",  # an LR schedule of its own: the resumes with more max_steps keep it
        # the stage's 4-frame window at 16 px: the logs are the same whatever the clip size, and steps cheaper
        "--data.init_args.frames=4", "--data.init_args.resolution=16"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder laid out like the repo root: data/shards/synthetic/{train,val} (16 px clips)."""
    root = tmp_path_factory.mktemp("logs")
    tiny_synthetic(root / "data" / "shards" / "synthetic", train=24, val=16, frames=18, size=16)
    return root


def _fit(workdir: Path, monkeypatch, steps: int, *extra: str):
    monkeypatch.chdir(workdir)
    return main(["fit", "--config", str(TINY / "common.yaml"), "--config", str(TINY / f"{STAGE}.yaml"),
                 f"--trainer.max_steps={steps}", *FAST, *extra])


def _scalars(folder: Path) -> dict[str, list[int]]:
    """``{tag: [step, ...]}`` of the TensorBoard scalars in ``folder`` (after TensorBoard's purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _bts(path: Path) -> int:
    """Lightning's logged step (``_batches_that_stepped``) a checkpoint records."""
    return read_checkpoint(path)["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]


def test_a_resume_from_the_end_of_a_fit_that_validated_logs_on_at_the_global_step(workdir, monkeypatch, tmp_path):
    """A fit validated at its last step, resumed twice: train/loss, the learning rate and val/loss at the steps of
    one uninterrupted run (the scalars of step k at k - 1), each once. Before, the end-of-fit checkpoint recorded
    the logged step after the last one was counted and the resume counted it again: one step further on per resume
    (train/loss at [0, 1, 3, 4, 6, 7]; the checkpoints at global step 4 and 6 recorded 5 and 8). A checkpoint such
    a run wrote resumes at its global step too. The checkpoints of the fits' last steps, saved where Lightning's every-N
    saves are, record the logged step before the last step's count (global step - 1), which a resume adds."""
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.val_check_interval=2",
            "--data.init_args.epoch_size=400"]  # 100 batches an epoch: validated at steps 2, 4, 6
    folder = tmp_path / STAGE
    recorded = []
    for steps in (2, 4, 6):
        _fit(workdir, monkeypatch, steps, *save)
        recorded.append(_bts(folder / "checkpoints" / "last.ckpt"))
    scalars = _scalars(folder)
    got = {"recorded": recorded, **{tag: scalars[tag] for tag in ("train/loss", "lr-AdamW/pg1", "val/loss")}}
    assert got == {"recorded": [1, 3, 5], "train/loss": [0, 1, 2, 3, 4, 5], "lr-AdamW/pg1": [0, 1, 2, 3, 4, 5],
                   "val/loss": [1, 3, 5]}
    last = folder / "checkpoints" / "last.ckpt"  # one the shifted runs wrote: its logged step one past its global step
    written = torch.load(last, weights_only=True)
    written["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] = 7
    torch.save(written, last)
    _fit(workdir, monkeypatch, 7, *save)
    assert _scalars(folder)["train/loss"] == [0, 1, 2, 3, 4, 5, 6] and _bts(last) == 6


def test_a_resumed_fit_continues_a_csv_logger_s_metrics_csv(workdir, monkeypatch, tmp_path):
    """A CSV-logged stage fitted to step 2, resumed to 4, then resumed from a copy of its step-2 checkpoint (as if
    killed right after it: steps 3 and 4 are logged again) to 6: one metrics.csv holding every step once. Before,
    Lightning's CSVLogger deleted the folder's metrics.csv at each fit's start ("Previous log files in this directory
    will be deleted"): it held the last fit's steps alone."""
    save = ["--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.val_check_interval=2",
            "--data.init_args.epoch_size=400"]
    folder = tmp_path / STAGE
    _fit(workdir, monkeypatch, 2, *save)
    kept = shutil.copy(folder / "checkpoints" / "last.ckpt", folder / "checkpoints" / "kept.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(workdir, monkeypatch, 4, *save)
        _fit(workdir, monkeypatch, 6, *save, f"--ckpt_path={kept}")
    rows = list(csv.DictReader((folder / "metrics.csv").read_text().splitlines()))
    steps = {key: [int(row["step"]) for row in rows if row.get(key)]
             for key in ("train/loss", "lr-AdamW/pg1", "val/loss")}
    assert steps == {"train/loss": list(range(6)), "lr-AdamW/pg1": list(range(6)), "val/loss": [1, 3, 5]}
    assert not [w for w in caught if "Previous log files" in str(w.message)]


def test_a_resume_from_the_end_of_a_fit_logs_the_epoch_it_goes_on_in(workdir, monkeypatch, tmp_path):
    """Fits to 2, 4 and 6 steps in one 100-batch epoch, each resuming the last: every step logs epoch 0, and each
    end-of-fit checkpoint records it. Before, StepCheckpoint saved the fit's last step at the fit's end, after
    Lightning's fit loop had counted the unfinished epoch as completed: each resume went on in the same epoch (its
    batches, its data) logging it one higher (epoch [0, 0, 1, 1, 2, 2]; the checkpoints recorded 1, 2, 3)."""
    save = ["--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.epoch_size=400"]
    folder = tmp_path / STAGE
    recorded = []
    for steps in (2, 4, 6):
        _fit(workdir, monkeypatch, steps, *save)
        recorded.append(read_checkpoint(folder / "checkpoints" / "last.ckpt")["epoch"])
    rows = list(csv.DictReader((folder / "metrics.csv").read_text().splitlines()))
    logged = [(int(row["step"]), int(row["epoch"])) for row in rows if row.get("train/loss")]
    assert {"logged": logged, "recorded": recorded} == {"logged": [(step, 0) for step in range(6)],
                                                        "recorded": [0, 0, 0]}


def test_a_resume_hides_the_tensorboard_steps_logged_after_its_checkpoint(workdir, monkeypatch, tmp_path):
    """A stage fitted to step 2, resumed to 4, then resumed from a copy of its step-2 checkpoint (as if killed right
    after it) to 6: TensorBoard shows every step once, the resumed run's (its SummaryWriter gets purge_step=2).
    Before, steps 2 and 3, logged after that checkpoint by the run given up, appeared twice."""
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.val_check_interval=2",
            "--data.init_args.epoch_size=400"]
    folder = tmp_path / STAGE
    _fit(workdir, monkeypatch, 2, *save)
    kept = shutil.copy(folder / "checkpoints" / "last.ckpt", folder / "checkpoints" / "kept.ckpt")
    _fit(workdir, monkeypatch, 4, *save)
    _fit(workdir, monkeypatch, 6, *save, f"--ckpt_path={kept}")
    scalars = _scalars(folder)
    assert {tag: scalars[tag] for tag in ("train/loss", "lr-AdamW/pg1", "val/loss")} == {
        "train/loss": list(range(6)), "lr-AdamW/pg1": list(range(6)), "val/loss": [1, 3, 5]}


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "CSVLogger"])
def test_a_new_run_sets_the_earlier_run_s_logs_aside_with_its_checkpoints(workdir, monkeypatch, tmp_path, logger):
    """--ckpt_path null in a stage's folder: the earlier run's event files and hparams.yaml (TensorBoard), its
    hparams.yaml and metrics.csv (CSV) go to checkpoints/earlier.1/ with its checkpoints, byte for byte, and the folder
    holds the new run's alone. Before, only the checkpoints moved: TensorBoard showed both runs as one curve
    (train/loss at steps [0, 1, 2, 0, 1]), and the CSV logger deleted the earlier metrics.csv; later, the CSV
    logger's earlier hparams.yaml was lost (Lightning rewrites it as the fit starts, before the set-aside).
    config.yaml stays KeepEarlierConfig's."""
    save = [f"--trainer.logger.class_path=lightning.pytorch.loggers.{logger}",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]
    folder = tmp_path / STAGE
    _fit(workdir, monkeypatch, 3, *save)
    records = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith("config")}
    _fit(workdir, monkeypatch, 2, *save, "--ckpt_path=null", "--model.init_args.lr=2e-3")
    aside = folder / "checkpoints" / "earlier.1"
    moved = {p.name: p.read_bytes() for p in aside.iterdir() if not p.name.endswith(".ckpt")}
    assert moved == records and "hparams.yaml" in moved
    assert yaml.safe_load((folder / "hparams.yaml").read_text())["lr"] == 2e-3  # the new run's
    if logger == "TensorBoardLogger":
        assert _scalars(folder)["train/loss"] == [0, 1] and _scalars(aside)["train/loss"] == [0, 1, 2]
        assert any(name.startswith("events.out.tfevents.") for name in moved)
    else:
        rows = list(csv.DictReader((folder / "metrics.csv").read_text().splitlines()))
        assert [int(row["step"]) for row in rows if row.get("train/loss")] == [0, 1]
        assert "metrics.csv" in moved
    assert (folder / "hparams.yaml").is_file() and (folder / "config.1.yaml").is_file()


def test_config_yaml_is_compared_without_jsonargparse_s_deprecated_dump_options(tmp_path, monkeypatch):
    """KeepEarlierConfig dumps the new settings (None values kept) to compare them with the config.yaml there.
    Before, it passed ``dump(skip_none=False)``, which jsonargparse 4.49 deprecated (JsonargparseDeprecationWarning
    ``skip_none parameter was deprecated in v4.49.0 and will be removed in v5.0.0. Instead use skip_unset.``)."""
    from types import SimpleNamespace
    from typing import Optional

    from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback

    from mardini.cli import KeepEarlierConfig

    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "all")  # else one per kind and process: order-dependent
    monkeypatch.setattr(SaveConfigCallback, "setup", lambda *args: None)  # Lightning's own save (its own dump)
    parser = LightningArgumentParser()
    parser.add_argument("--ckpt_path", type=Optional[str], default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    (tmp_path / "config.yaml").write_text("ckpt_path: null\nlr: 0.002\n")
    save = KeepEarlierConfig(parser, parser.parse_args([]))
    trainer = SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        save.setup(trainer, None, "fit")
    assert (tmp_path / "config.1.yaml").read_text() == "ckpt_path: null\nlr: 0.002\n"  # other settings: kept
    (tmp_path / "config.yaml").write_text("ckpt_path: null\nlr: 0.002\n")
    KeepEarlierConfig(parser, parser.parse_args(["--lr", "0.002"])).setup(trainer, None, "fit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.1.yaml", "config.yaml"]  # the same: none kept

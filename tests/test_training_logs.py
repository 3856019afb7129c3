"""What a fit logs and records: validation under the curriculum, the run's settings, the curriculum's and the EMA's
state by step, throughput over the logging window, training time across resumes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from mardini.cli import main
from mardini.data.testing import tiny_synthetic

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder laid out like the repo root: data/shards/synthetic/{train,val} (32 px clips)."""
    root = tmp_path_factory.mktemp("logs")
    tiny_synthetic(root / "data" / "shards" / "synthetic", train=16, val=8, frames=10, size=32)
    return root


def _config(tmp: Path, name: str, milestones: list[dict] | None = None, **trainer) -> Path:
    """A tiny generator stage (4 frames, batch 2) logging to ``tmp/name`` with a TensorBoard logger; ``milestones``:
    a Curriculum's (interpolated)."""
    cfg = {
        "seed_everything": 1,
        "checkpoint_every": 100,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "log_every_n_steps": 1,
            "limit_val_batches": 4, "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp), "name": name, "version": ""}},
            **trainer,
        },
        "model": {"class_path": "mardini.lit.GenerationModule", "init_args": {
            "size": "tiny", "planner_resolution": 16, "frames": 4,
            "generator": {"patch_size": 2, "dim": 64, "attention": "st"},
            "lr": 1e-3, "ema_decay": 0.9, "keep_ratio": [0.5, 1.0], "templates": {"random": 1.0}}},
        "data": {"class_path": "mardini.data.datamodule.VideoDataModule", "init_args": {
            "train_shards": "data/shards/synthetic/train", "val_shards": "data/shards/synthetic/val", "frames": 5,
            "fps": 8, "resolution": 32, "batch_size": 2, "num_workers": 0, "epoch_size": 12, "shuffle_buffer": 4,
            "val_clips": 8}},
    }
    if milestones is not None:
        cfg["trainer"]["callbacks"] = [{"class_path": "mardini.lit.curriculum.Curriculum",
                                        "init_args": {"interpolate": True, "milestones": milestones}}]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(workdir: Path, monkeypatch, command: str, config: Path, *args: str):
    monkeypatch.chdir(workdir)
    return main([command, "--config", str(config), *QUIET, *args])


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


# --------------------------------------------------------------------------------------------------
# val/loss under a curriculum: validate scores a checkpoint as the fit validated it
# --------------------------------------------------------------------------------------------------

CURRICULUM = [  # the keep ratio ramps from step 0 to 8; the task mix changes at step 2, the attention at step 3
    {"step": 0, "keep_ratio": [0.5, 1.0], "templates": {"random": 1.0}},
    {"step": 2, "templates": {"random": 1.0, "interpolation": 1.0, "image_to_video": 1.0}},
    {"step": 3, "attention": "t"},
    {"step": 8, "keep_ratio": [0.15, 0.4]},
]


def test_validate_scores_a_checkpoint_under_the_curriculum_the_fit_validated_it_with(workdir, monkeypatch, tmp_path):
    """A fit whose Curriculum changed the task mix, the attention and (mid-ramp) the keep ratio validates after its
    last step; validate of its last.ckpt gives the same val/loss and per-template losses. Before, validate drew with
    the model's own settings (milestone 0's: one template, keep [0.5, 1.0], ST attention)."""
    config = _config(tmp_path, "stage", CURRICULUM, max_steps=5, val_check_interval=5)
    fit = _run(workdir, monkeypatch, "fit", config)
    fitted = {k: float(v) for k, v in fit.trainer.callback_metrics.items() if k.startswith("val/")}
    assert len([k for k in fitted if k.startswith("val/loss_")]) > 1  # step 2's mix
    scored = _run(workdir, monkeypatch, "validate", config)
    validated = {k: float(v) for k, v in scored.trainer.callback_metrics.items() if k.startswith("val/")}
    assert validated == fitted
    assert scored.model.networks["generator"].attention_mode == "t"
    assert scored.model.mask_sampler.keep_ratio == pytest.approx(fit.model.mask_sampler.keep_ratio)  # step 4's


# --------------------------------------------------------------------------------------------------
# The run's settings beside the model's, and a real hp_metric
# --------------------------------------------------------------------------------------------------


def _hparams_in_events(folder: Path) -> dict:
    """The hyper-parameters of the TensorBoard run in ``folder`` (its HParams session start)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "CSVLogger"])
def test_the_recorded_hyper_parameters_hold_the_data_trainer_and_curriculum_settings(workdir, monkeypatch, tmp_path,
                                                                                     logger):
    """hparams.yaml (and TensorBoard's HParams tab) hold the datamodule's settings, the trainer's and the curriculum's
    milestones beside the model's, and hp_metric is the last val/loss. Before, only the model's arguments were
    recorded and hp_metric stayed -1."""
    config = _config(tmp_path, "stage", CURRICULUM, max_steps=4, val_check_interval=2, gradient_clip_val=0.5)
    fit = _run(workdir, monkeypatch, "fit", config, f"--trainer.logger.class_path=lightning.pytorch.loggers.{logger}")
    folder = tmp_path / "stage"
    recorded = yaml.safe_load((folder / "hparams.yaml").read_text())
    assert recorded["lr"] == 1e-3 and recorded["frames"] == 4  # the model's, as before
    data = recorded.get("data") or {}
    assert {k: data.get(k) for k in ("batch_size", "resolution", "fps", "frames", "epoch_size", "train_shards")} == {
        "batch_size": 2, "resolution": 32, "fps": 8, "frames": 5, "epoch_size": 12,
        "train_shards": "data/shards/synthetic/train"}
    trainer = recorded.get("trainer") or {}
    assert {k: trainer.get(k) for k in ("max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val",
                                        "devices", "num_nodes")} == {
        "max_steps": 4, "precision": "32-true", "accumulate_grad_batches": 1, "gradient_clip_val": 0.5, "devices": 1,
        "num_nodes": 1}
    assert recorded.get("curriculum", {}).get("step_2") == {"templates": CURRICULUM[1]["templates"]}
    val = float(fit.trainer.callback_metrics["val/loss"])
    assert float(fit.trainer.callback_metrics["hp_metric"]) == val
    if logger == "TensorBoardLogger":
        shown = _hparams_in_events(folder)
        assert shown["data/batch_size"] == 2 and shown["trainer/precision"] == "32-true"
        assert shown["curriculum/step_3/attention"] == "t"
        assert [v for _, v in _scalars(folder, "hp_metric")][-1] == pytest.approx(val)


# --------------------------------------------------------------------------------------------------
# The task mix, the attention switch and the EMA decay by step
# --------------------------------------------------------------------------------------------------


def _csv_column(folder: Path, key: str) -> dict[int, float]:
    """``{step: value}`` of ``key`` in the CSV logger's metrics.csv in ``folder``."""
    import csv

    with (folder / "metrics.csv").open() as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


def test_the_task_mix_the_attention_switch_and_the_ema_decay_are_logged_by_step(workdir, monkeypatch, tmp_path):
    """curriculum/template_<name> (the normalised weights, 0 for a template not drawn), curriculum/attention_st (the
    curriculum switches it at step 3) and ema/decay (timm's ramp: 0 at the first two updates) at every step. Before,
    only the keep ratio and the frames were logged."""
    config = _config(tmp_path, "stage", CURRICULUM, max_steps=5, limit_val_batches=0,
                     logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                             "init_args": {"save_dir": str(tmp_path), "name": "stage", "version": ""}})
    fit = _run(workdir, monkeypatch, "fit", config)
    folder = tmp_path / "stage"
    steps = [0, 1, 2, 3, 4]
    third = pytest.approx(1 / 3)
    assert _csv_column(folder, "curriculum/template_random") == {0: 1.0, 1: 1.0, 2: third, 3: third, 4: third}
    assert _csv_column(folder, "curriculum/template_image_to_video") == {0: 0.0, 1: 0.0, 2: third, 3: third, 4: third}
    assert _csv_column(folder, "curriculum/template_expansion") == dict.fromkeys(steps, 0.0)
    assert _csv_column(folder, "curriculum/attention_st") == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0}
    decay = _csv_column(folder, "ema/decay")
    assert decay == {s: pytest.approx(fit.model.ema.get_decay(s)) for s in steps}
    assert decay[0] == decay[1] == 0.0 and 0 < decay[2] < decay[4] <= 0.9  # the first updates copy; capped
    # the CSV logger writes them in the locale's encoding: ASCII names read alike in any (test_platforms.py)
    assert (folder / "metrics.csv").read_bytes().isascii() and (folder / "hparams.yaml").read_bytes().isascii()


# --------------------------------------------------------------------------------------------------
# Throughput over the logging window
# --------------------------------------------------------------------------------------------------


class Clock(L.Callback):
    """A fake ``time.perf_counter`` for the module: a training batch takes 1 s, a validation 100 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def on_train_batch_end(self, *args) -> None:
        self.now += 1.0

    def on_validation_end(self, *args) -> None:
        self.now += 100.0


def _tiny_fit(workdir: Path, folder: Path, callbacks: list, max_steps: int, ckpt_path: str | None = None, **trainer):
    """A tiny generator fit in Python (4 frames, batch 2, 6 batches an epoch), logging to ``folder`` (CSV)."""
    from lightning.pytorch.loggers import CSVLogger

    from mardini.data.datamodule import VideoDataModule
    from mardini.lit import GenerationModule

    shards = workdir / "data" / "shards" / "synthetic"
    model = GenerationModule(size="tiny", planner_resolution=16, frames=4, generator={"patch_size": 2, "dim": 64},
                             lr=1e-3, keep_ratio=(0.5, 1.0), decay_steps=16)  # a schedule a longer resume keeps
    data = VideoDataModule(train_shards=str(shards / "train"), val_shards=str(shards / "val"), frames=5, fps=8,
                           resolution=32, batch_size=2, num_workers=0, epoch_size=12, shuffle_buffer=4, val_clips=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, num_sanity_val_steps=0, callbacks=callbacks,
                        logger=CSVLogger(str(folder.parent), name=folder.name, version=""), enable_progress_bar=False,
                        enable_model_summary=False, **trainer)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_throughput_is_the_mean_over_the_logging_window_validation_included(workdir, monkeypatch, tmp_path):
    """perf/clips_per_s at a logged step is the clips since the previous logged step over the time since then: with
    log_every_n_steps 3, steps of 1 s and a validation of 100 s after step 2, step 5 logs 6 clips / 103 s. Before, it
    was the logged step's own clips over the time since the batch before (2 / 1 s at every logged step)."""
    clock = Clock()
    monkeypatch.setattr("mardini.lit.step_logs.time", SimpleNamespace(perf_counter=clock.perf_counter))
    trainer = _tiny_fit(workdir, tmp_path / "run", [clock], max_steps=6, log_every_n_steps=3, val_check_interval=3,
                        limit_val_batches=1, enable_checkpointing=False)
    clips = _csv_column(tmp_path / "run", "perf/clips_per_s")
    assert clips == {2: pytest.approx(4 / 2), 5: pytest.approx(6 / 103)}  # batches 1-2 after the first; 3-5
    tokens = _csv_column(tmp_path / "run", "perf/tokens_per_s")
    per_clip = trainer.lightning_module.tokens_per_clip({"video": torch.zeros(1, 4, 3, 32, 32)})  # 4 frames x 8 x 8
    assert tokens == {step: pytest.approx(per_clip * rate) for step, rate in clips.items()}


def test_tokens_per_clip_counts_the_planner_s_non_square_copy():
    """The planner's copy of 36x64 frames at short side 18 is 18x32 pixels, 9x16 tokens (patch 1, factor 2) per
    frame; the count took a square 9x9 grid of the short side, so perf/tokens_per_s of a 16:9 run was low."""
    from mardini.lit import MarDiniModule, PlanningModule

    video, z_low = torch.zeros(1, 4, 3, 36, 64), torch.zeros(1, 4, 12, 9, 16)  # pixels; cached planner latents
    planning = PlanningModule(size="tiny", planner_resolution=18)
    assert planning.tokens_per_clip({"video": video}) == 4 * 9 * 16
    assert planning.tokens_per_clip({"z_low": z_low}) == 4 * 9 * 16
    joint = MarDiniModule(size="tiny", planner_resolution=18)
    assert joint.tokens_per_clip({"video": video}) == 4 * 18 * 32 + 4 * 9 * 16  # generator + planner


# --------------------------------------------------------------------------------------------------
# Training time across resumes
# --------------------------------------------------------------------------------------------------


def test_checkpoints_record_the_training_seconds_and_a_resume_adds_to_them(workdir, monkeypatch, tmp_path):
    """3 steps of 1 s, saved, resumed in a new process (another clock) for 2 more: the checkpoints record 3 and 5 s,
    and perf/train_hours goes on across the resume. Before, no checkpoint recorded how long its run had trained."""
    from mardini.lit.checkpoints import read_checkpoint

    clock = Clock()
    monkeypatch.setattr("mardini.lit.step_logs.time", SimpleNamespace(perf_counter=clock.perf_counter))
    first = _tiny_fit(workdir, tmp_path / "first", [clock], max_steps=3, log_every_n_steps=1, limit_val_batches=0,
                      enable_checkpointing=False)
    first.save_checkpoint(tmp_path / "3.ckpt")
    clock.now = 1000.0  # the resumed process's clock starts elsewhere
    resumed = _tiny_fit(workdir, tmp_path / "resumed", [clock], max_steps=5, ckpt_path=str(tmp_path / "3.ckpt"),
                        log_every_n_steps=1, limit_val_batches=0, enable_checkpointing=False)
    resumed.save_checkpoint(tmp_path / "5.ckpt")
    assert [read_checkpoint(tmp_path / f"{n}.ckpt")["mardini"].get("train_seconds") for n in (3, 5)] == [3.0, 5.0]
    hours = [*_csv_column(tmp_path / "first", "perf/train_hours").values(),
             *_csv_column(tmp_path / "resumed", "perf/train_hours").values()]
    assert hours == pytest.approx([s / 3600 for s in range(5)])  # at each step's start


def test_a_resume_of_a_checkpoint_without_the_training_time_records_the_step_its_count_starts_at(workdir, monkeypatch,
                                                                                                tmp_path):
    """A checkpoint an older code wrote (no train_seconds), resumed for 2 more steps: the new checkpoint records 2 s
    from step 3, and the demo reports no time for it. Before, it recorded 2 s as the run's whole training time, and
    the demo's stage table showed it as the stage's."""
    from mardini.demo.chain import recorded_seconds
    from mardini.lit.checkpoints import read_checkpoint

    clock = Clock()
    monkeypatch.setattr("mardini.lit.step_logs.time", SimpleNamespace(perf_counter=clock.perf_counter))
    first = _tiny_fit(workdir, tmp_path / "first", [clock], max_steps=3, log_every_n_steps=1, limit_val_batches=0,
                      enable_checkpointing=False)
    first.save_checkpoint(tmp_path / "3.ckpt")
    old = read_checkpoint(tmp_path / "3.ckpt")  # memory-mapped: written to another file
    for key in ("train_seconds", "train_seconds_from_step"):  # as 886635b wrote it
        old["mardini"].pop(key, None)
    torch.save(old, tmp_path / "old.ckpt")
    resumed = _tiny_fit(workdir, tmp_path / "resumed", [clock], max_steps=5, ckpt_path=str(tmp_path / "old.ckpt"),
                        log_every_n_steps=1, limit_val_batches=0, enable_checkpointing=False)
    resumed.save_checkpoint(tmp_path / "5.ckpt")
    meta = read_checkpoint(tmp_path / "5.ckpt")["mardini"]
    assert (meta["train_seconds"], meta["train_seconds_from_step"]) == (2.0, 3)
    assert recorded_seconds(tmp_path / "5.ckpt") is None  # this code's own: counted from step 0
    again = _tiny_fit(workdir, tmp_path / "again", [clock], max_steps=6, ckpt_path=str(tmp_path / "5.ckpt"),
                      log_every_n_steps=1, limit_val_batches=0, enable_checkpointing=False)
    again.save_checkpoint(tmp_path / "6.ckpt")  # a later resume carries the step forward, adding its second
    meta = read_checkpoint(tmp_path / "6.ckpt")["mardini"]
    assert (meta["train_seconds"], meta["train_seconds_from_step"]) == (3.0, 3)
    assert recorded_seconds(tmp_path / "6.ckpt") is None
    assert read_checkpoint(tmp_path / "3.ckpt")["mardini"]["train_seconds_from_step"] == 0
    assert recorded_seconds(tmp_path / "3.ckpt") == 3.0


def test_the_demo_reports_the_training_time_its_stage_s_checkpoint_records(monkeypatch, tmp_path):
    """A stage resumed by the demo reports the training time its checkpoint records (its earlier runs too), and a
    reused stage the time it was trained in; before, the time of the demo's own call into the CLI (a resumed stage
    under-reported) and 0 s for a reused one."""
    import mardini.cli
    from mardini.demo import chain
    from mardini.demo.report import stage_table

    checkpoint = tmp_path / "outputs" / "tiny" / "01_dm_warmup_4f" / "checkpoints" / "last.ckpt"

    def fake_cli(args):  # a resumed run: its checkpoint records 123 s of training, the earlier runs' included
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": 2, "mardini": {"train_seconds": 123.0}}, checkpoint)

    monkeypatch.setattr(mardini.cli, "main", fake_cli)
    monkeypatch.chdir(tmp_path)
    trained = chain.run_stage("01_dm_warmup_4f", REPO / "configs" / "tiny", max_steps=2, progress=False)
    reused = chain.run_stage("01_dm_warmup_4f", REPO / "configs" / "tiny", max_steps=2, progress=False)
    assert (trained.reused, trained.seconds) == (False, 123.0) and (reused.reused, reused.seconds) == (True, 123.0)
    assert "| 123 s | reused |" in stage_table([reused])[-1]

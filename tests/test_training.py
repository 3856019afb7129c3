"""Training from the CLI: the tiny chain stage after stage, exact resume, start-up checks, checkpoint kinds."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mardini.cli import main
from mardini.data.testing import tiny_synthetic
from mardini.lit.checkpoints import read_checkpoint
from mardini.lit.ema_export import export_ema_only

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
STAGES = ["01_dm_warmup_4f", "02_dm_warmup_9f", "03_mar_warmup", "04_joint_model", "05_joint_task"]
KINDS = ["generation", "generation", "planning", "joint", "joint"]
FAST = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.num_workers=0", "--data.init_args.epoch_size=64", "--data.init_args.batch_size=4",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.precision=32-true",
        # an LR schedule of its own: a resume with more max_steps keeps it (unset, it followed max_steps, and
        # every such resume warned that its LR schedule had moved)
        "--model.init_args.decay_steps=16",
        # 16 px clips: what the runs' folders, checkpoints and resumes hold does not depend on the clip size, and a
        # step costs half as much; the chain runs at the stages' own 32 px (SHIPPED_SIZE), the planners' resize too
        "--data.init_args.resolution=16"]
SHIPPED_SIZE = "--data.init_args.resolution=32"  # the tiny chain's (configs/tiny/common.yaml)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder laid out like the repo root: data/shards/synthetic/{train,val} (32 px clips)."""
    root = tmp_path_factory.mktemp("train")
    tiny_synthetic(root / "data" / "shards" / "synthetic", train=24, val=16, frames=18, size=32)
    return root


def _fit(workdir: Path, monkeypatch, *args: str):
    monkeypatch.chdir(workdir)
    return main(["fit", *args])


def _stage(name: str, steps: int, *extra: str) -> list[str]:
    return ["--config", str(TINY / "common.yaml"), "--config", str(TINY / f"{name}.yaml"),
            f"--trainer.max_steps={steps}", *FAST, *extra]


# --------------------------------------------------------------------------------------------------
# The tiny chain, stage after stage
# --------------------------------------------------------------------------------------------------


def test_tiny_chain_runs_stage_after_stage(workdir, monkeypatch):
    for name, kind in zip(STAGES, KINDS):
        cli = _fit(workdir, monkeypatch, *_stage(name, 2, SHIPPED_SIZE))
        assert cli.trainer.global_step == 2
        ckpt = read_checkpoint(workdir / "outputs" / "tiny" / name / "checkpoints" / "last.ckpt")
        assert ckpt["mardini"]["kind"] == kind
        assert not any(k.startswith("autoencoder.") for k in ckpt["state_dict"])  # frozen AE kept out
    # the joint stage started from the warm-ups: its planner keeps the projection head exactly when the stage keeps
    # the warm-up's loss on it (plan_recon_weight > 0; the paper's recipe drops it)
    joint = read_checkpoint(workdir / "outputs" / "tiny" / "04_joint_model" / "checkpoints" / "last.ckpt")
    keeps_head = joint["hyper_parameters"].get("plan_recon_weight", 0.0) > 0
    assert any(".head." in k for k in joint["state_dict"]) == keeps_head
    # the kept-fraction range is logged (the Curriculum's effect is checked in the resume test)
    metrics = cli.trainer.callback_metrics
    assert "curriculum/keep_ratio_min" in metrics and "train/loss" in metrics
    # re-running a finished stage resumes at its last step and trains no further
    again = _fit(workdir, monkeypatch, *_stage(STAGES[-1], 2, SHIPPED_SIZE))
    assert again.trainer.global_step == 2


def test_joint_stage_rejects_checkpoints_of_the_wrong_kind(workdir, monkeypatch):
    gen = "outputs/tiny/01_dm_warmup_4f/checkpoints/last.ckpt"
    if not (workdir / gen).exists():
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 1))
    with pytest.raises(ValueError, match=r"is a 'generation' checkpoint.*'planning' checkpoint is expected"):
        _fit(workdir, monkeypatch, *_stage("04_joint_model", 1, f"--model.init_args.planner_ckpt={gen}",
                                          f"--model.init_args.generator_ckpt={gen}", "--ckpt_path=null"))


def test_an_explicit_ckpt_path_of_another_stage_is_refused_not_trained_as_its_model(workdir, monkeypatch, tmp_path):
    """Lightning's CLI would replace the configured model by the one the checkpoint's hyper-parameters name (the
    joint stage trained and saved as a generator warm-up); the stage's model stays the configured one and refuses
    it."""
    gen = workdir / "outputs" / "tiny" / STAGES[0] / "checkpoints" / "last.ckpt"
    if not gen.exists():
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 1))
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--model.init_args.init_from=null"]
    with pytest.raises(ValueError, match=rf"{re.escape(str(gen))} is a 'generation' checkpoint.*but a 'joint' checkpoint is expected"):
        _fit(workdir, monkeypatch, *_stage("05_joint_task", 3, *save, f"--ckpt_path={gen}"))
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained, nothing saved as stage 05


def _starting_checkpoint(workdir: Path, monkeypatch, tmp_path: Path) -> Path:
    """A copy of stage 1's checkpoint (trained for a step when there is none) as ``tmp_path/start.ckpt``."""
    start = tmp_path / "start.ckpt"
    first = workdir / "outputs" / "tiny" / STAGES[0] / "checkpoints" / "last.ckpt"
    if not first.exists():
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 1))
    start.write_bytes(first.read_bytes())
    return start


def test_a_resume_does_not_need_the_stage_s_starting_checkpoint(workdir, monkeypatch, tmp_path):
    start = _starting_checkpoint(workdir, monkeypatch, tmp_path)
    save = ["--trainer.logger.init_args.save_dir=outputs/resume_init", f"--model.init_args.init_from={start}"]
    assert _fit(workdir, monkeypatch, *_stage(STAGES[1], 2, *save)).trainer.global_step == 2
    start.unlink()  # e.g. the earlier stage's folder cleaned up while this one was preempted
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[1], 3, *save))
    assert resumed.trainer.global_step == 3
    # the run's record still says where the stage started, and rerunning its config.yaml resumes
    assert resumed.model.hparams.init_from == str(start)
    saved = yaml.safe_load((workdir / "outputs" / "resume_init" / STAGES[1] / "config.yaml").read_text())
    assert saved["model"]["init_args"]["init_from"] == str(start) and saved["ckpt_path"] == "last"
    with pytest.raises(Exception, match="start.ckpt"):  # starting over still needs it, and says which file
        _fit(workdir, monkeypatch, *_stage(STAGES[1], 3, *save, "--ckpt_path=null"))


def test_a_resume_from_an_explicit_file_neither_needs_the_starting_checkpoint_nor_drops_model_options(
        workdir, monkeypatch, tmp_path):
    start = _starting_checkpoint(workdir, monkeypatch, tmp_path)
    save = ["--trainer.logger.init_args.save_dir=outputs/resume_file", f"--model.init_args.init_from={start}"]
    _fit(workdir, monkeypatch, *_stage(STAGES[1], 2, *save))
    kept = tmp_path / "kept.ckpt"  # e.g. a copy of the run's checkpoint, given by its path
    kept.write_bytes((workdir / "outputs" / "resume_file" / STAGES[1] / "checkpoints" / "last.ckpt").read_bytes())
    start.unlink()
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[1], 3, *save, f"--ckpt_path={kept}",
                                                 "--model.init_args.nonfinite=skip"))
    assert resumed.trainer.global_step == 3
    assert resumed.model.hparams.nonfinite == "skip"  # the command line's model options hold
    assert resumed.model.hparams.init_from == str(start)
    # a file from elsewhere continues its run here: the folder's earlier checkpoints are set aside, and last.ckpt
    # (not last-v1.ckpt) is the resumed run's, the one --ckpt_path last resumes next
    folder = workdir / "outputs" / "resume_file" / STAGES[1] / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step00000003.ckpt"]
    assert sorted(p.name for p in (folder / "earlier.1").glob("*.ckpt")) == ["last.ckpt", "step00000002.ckpt"]
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 3


def _validate(workdir: Path, monkeypatch, *args: str):
    monkeypatch.chdir(workdir)
    return main(["validate", *args])


def _same_weights(model, path: Path) -> bool:
    """Whether the model's networks (raw and EMA) are those of the checkpoint at ``path``."""
    saved, ours = read_checkpoint(path)["state_dict"], model.state_dict()
    nets = {k: v for k, v in saved.items() if k.startswith(("networks.", "ema."))}
    return bool(nets) and all(torch.equal(ours[k], v) for k, v in nets.items())


def test_validate_scores_the_stage_s_newest_checkpoint_not_the_weights_it_starts_from(workdir, monkeypatch, tmp_path):
    """validate, like fit, defaults to --ckpt_path last: the stage's newest checkpoint, said; none is an error naming
    --ckpt_path PATH and --ckpt_path null (which scores the starting weights); before, validate scored the weights
    the stage starts from (init_from, or freshly initialised ones) silently."""
    start = _starting_checkpoint(workdir, monkeypatch, tmp_path)
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.init_args.init_from={start}"]
    folder = tmp_path / STAGES[1] / "checkpoints"
    with pytest.raises(ValueError, match=rf"validate scores the stage's newest checkpoint \(--ckpt_path last, the "
                                         rf"default\), but {re.escape(str(folder))} holds none .*--ckpt_path PATH to "
                                         rf"score a checkpoint, or --ckpt_path null to score the weights the stage "
                                         rf"starts from"):
        _validate(workdir, monkeypatch, *_stage(STAGES[1], 2, *save))
    _fit(workdir, monkeypatch, *_stage(STAGES[1], 2, *save))
    first = _validate(workdir, monkeypatch, *_stage(STAGES[1], 2, *save, "--ckpt_path=null"))
    assert first.trainer.ckpt_path is None and _same_weights(first.model, start)
    start.unlink()  # the weights scored are the checkpoint's: the starting one is not read
    said: list[str] = []
    monkeypatch.setattr("mardini.cli_resume.rank_zero_info", said.append)
    scored = _validate(workdir, monkeypatch, *_stage(STAGES[1], 2, *save))
    assert scored.trainer.ckpt_path == str(folder / "last.ckpt") and _same_weights(scored.model, folder / "last.ckpt")
    assert said == [f"validate scores {folder / 'last.ckpt'} (step 2), the newest checkpoint of the stage; "
                    "--ckpt_path PATH scores another"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "CSVLogger"])
def test_validate_leaves_the_fit_s_folder_as_it_is_and_logs_in_its_validate_folder(workdir, monkeypatch, tmp_path,
                                                                                    logger):
    """The stage folder's event files, hparams.yaml, metrics.csv and config.yaml record the fit; validate (of the
    newest checkpoint, or of one named) logs its metrics and writes validate.yaml in a folder of its own in the
    folder's validate/ (version_0, version_1, ...). Before, each validate added its event file to the fit's run (a CSV
    logger replaced the fit's metrics.csv and hparams.yaml), and earlier still rotated config.yaml; later, all logged
    in validate/ itself (its validate.yaml the last run's, hparams.yaml the first's)."""
    save = [f"--trainer.logger.class_path=lightning.pytorch.loggers.{logger}",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]
    folder = tmp_path / STAGES[0]
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 1, *save, "--trainer.log_every_n_steps=1"))  # metrics.csv too
    trained = _files(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _validate(workdir, monkeypatch, *_stage(STAGES[0], 1, *save))
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]  # it saves nothing: no matter
    named = _validate(workdir, monkeypatch, *_stage(STAGES[0], 1, *save, "--trainer.limit_val_batches=2",
                                                     f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"))
    after = _files(folder)
    assert {name: after[name] for name in trained} == trained  # the fit's files, byte for byte
    new = sorted(set(after) - set(trained))
    runs = [folder / "validate" / f"version_{n}" for n in (0, 1)]
    assert all(name.startswith(("validate/version_0/", "validate/version_1/")) for name in new), new
    assert [cli.trainer.log_dir.rstrip("/") for cli in (first, named)] == [str(run) for run in runs]
    limits = [yaml.safe_load((run / "validate.yaml").read_text())["trainer"]["limit_val_batches"] for run in runs]
    assert limits == [1, 2]  # FAST's, then the named one's
    assert all((run / "hparams.yaml").is_file() for run in runs)
    for cli, run in zip((first, named), runs):  # each run's score in its own folder
        score = float(cli.trainer.callback_metrics["val/loss"])
        if logger == "CSVLogger":
            rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
            assert [float(row["val/loss"]) for row in rows if row.get("val/loss")] == pytest.approx([score])
        else:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            events = EventAccumulator(str(run))
            events.Reload()
            assert [e.value for e in events.Scalars("val/loss")] == pytest.approx([score])


def test_validate_scores_an_ema_only_export_as_the_checkpoint_it_was_exported_from(workdir, monkeypatch, tmp_path):
    """validate scores the EMA weights, all an export (python -m mardini.lit.ema_export) holds: --ckpt_path EXPORT
    gives the training checkpoint's val/loss, the EMA weights loaded as the raw ones too; before, it failed saying the
    export "cannot resume a fit", which a fit from it still says."""
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}"]
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 1, *save))
    trained, export = tmp_path / STAGES[0] / "checkpoints" / "last.ckpt", tmp_path / "ema.ckpt"
    export_ema_only(trained, export)
    full = _validate(workdir, monkeypatch, *_stage(STAGES[0], 1, *save))
    ema = _validate(workdir, monkeypatch, *_stage(STAGES[0], 1, *save, f"--ckpt_path={export}"))
    assert ema.trainer.ckpt_path == str(export)
    assert float(ema.trainer.callback_metrics["val/loss"]) == float(full.trainer.callback_metrics["val/loss"])
    ours = ema.model.state_dict()
    saved = {k: v for k, v in read_checkpoint(trained)["state_dict"].items() if k.startswith("ema.module.")}
    assert saved and all(torch.equal(ours[k], v) and torch.equal(ours[k.replace("ema.module.", "networks.", 1)], v)
                         for k, v in saved.items())
    elsewhere = [f"--trainer.logger.init_args.save_dir={tmp_path / 'fit'}"]
    with pytest.raises(ValueError, match=r"EMA-only export.*cannot resume a fit.*validate --ckpt_path <it> scores"):
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *elsewhere, f"--ckpt_path={export}"))


def test_a_rerun_with_other_settings_warns_and_keeps_the_run_s_earlier_config(workdir, monkeypatch, tmp_path):
    """The rerun resumes under its new mask range, says so, and config.yaml's earlier settings stay as config.1.yaml;
    a resume refused (another anchor) leaves config.yaml naming the settings the checkpoint was trained with."""
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}"]
    folder = tmp_path / STAGES[0]
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))  # the same settings: nothing to keep
    assert not (folder / "config.1.yaml").exists()
    with pytest.warns(UserWarning, match=r"resuming .*last.ckpt with other settings than it was trained with "
                                         r"\(keep_ratio \[0.45, 1.0\] -> \[0.2, 0.5\]\).*--ckpt_path null"):
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save, "--model.init_args.keep_ratio=[0.2, 0.5]"))
    keep_ratio = lambda name: yaml.safe_load((folder / name).read_text())["model"]["init_args"]["keep_ratio"]  # noqa: E731
    assert keep_ratio("config.1.yaml") == [0.45, 1.0] and keep_ratio("config.yaml") == [0.2, 0.5]
    with pytest.raises(ValueError, match="trained with anchor='none'.*its config.yaml in the log folder"):
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 4, *save, "--model.init_args.keep_ratio=[0.2, 0.5]",
                                          "--model.init_args.anchor=nearest"))
    assert keep_ratio("config.yaml") == [0.2, 0.5] and not (folder / "config.2.yaml").exists()
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_steps"] == 3


def test_a_ckpt_path_null_rerun_starts_over_in_place_and_last_then_resumes_it(workdir, monkeypatch, tmp_path):
    """--ckpt_path null where a run is: the earlier run's checkpoints move to checkpoints/earlier.1/ (byte for byte)
    and --ckpt_path last (a rerun, a requeue) resumes the new run at its step with its settings; before, the new run
    wrote last-v1.ckpt beside the earlier run's last.ckpt, which `last` resumed under the new config."""
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}"]
    folder = tmp_path / STAGES[0] / "checkpoints"
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save))
    earlier = {p.name: p.read_bytes() for p in folder.glob("*.ckpt")}
    assert sorted(earlier) == ["last.ckpt", "step00000003.ckpt"]
    logs = sorted(p.name for p in folder.parent.glob("events.out.tfevents.*")) + ["hparams.yaml"]
    said: list[str] = []
    monkeypatch.setattr("mardini.lit.step_checkpoint.rank_zero_info", said.append)
    new = ["--model.init_args.lr=2e-3"]
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save, *new, "--ckpt_path=null"))
    assert said == [f"A new run in {folder}: the earlier run's checkpoints (last.ckpt, step00000003.ckpt) and logs "
                    f"({', '.join(logs)}) are moved to {folder / 'earlier.1'} (--ckpt_path "
                    f"{folder / 'earlier.1' / 'last.ckpt'} resumes that run)"]
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step00000002.ckpt"]
    assert {p.name: p.read_bytes() for p in (folder / "earlier.1").glob("*.ckpt")} == earlier
    last = read_checkpoint(folder / "last.ckpt")
    assert last["global_step"] == 2 and last["hyper_parameters"]["lr"] == 2e-3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save, *new))
    assert resumed.trainer.ckpt_path == str(folder / "last.ckpt") and resumed.trainer.global_step == 3
    assert not [w for w in caught if "other settings than it was trained with" in str(w.message)]  # its own run's
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 3 and not (folder / "earlier.2").exists()


def test_a_refused_resume_leaves_the_stage_s_folder_as_it_was_and_a_rerun_resumes_it(workdir, monkeypatch, tmp_path):
    """A fit refused for the checkpoint it resumes (--ckpt_path an EMA-only export, a checkpoint of another kind, a
    missing file; the stage's own last.ckpt under another anchor) leaves the stage folder's files byte for byte, and
    the plain rerun resumes its last.ckpt. Before, Lightning read the checkpoint only after its setup: the folder's
    checkpoints had been moved to checkpoints/earlier.1/ (a file from elsewhere starts a new run there), so the rerun
    trained from step 0, and the logger had opened one more event file in the folder."""
    save = [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    folder = tmp_path / "runs" / STAGES[0]
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    last = folder / "checkpoints" / "last.ckpt"
    export, planning = tmp_path / "ema.ckpt", tmp_path / "planning.ckpt"
    export_ema_only(last, export)
    other = read_checkpoint(last)
    other["mardini"]["kind"] = "planning"  # as another stage's checkpoint says
    torch.save(other, planning)
    trained = _files(folder)
    for extra, message in [
        ([f"--ckpt_path={export}"], r"EMA-only export.*cannot resume a fit"),
        ([f"--ckpt_path={planning}"], r"is a 'planning' checkpoint.*but a 'generation' checkpoint is expected"),
        ([f"--ckpt_path={tmp_path / 'gone.ckpt'}"], r"gone.ckpt does not exist; check the path"),
        (["--model.init_args.anchor=nearest"], r"trained with anchor='none'.*this stage has anchor='nearest'"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save, *extra))
        assert _files(folder) == trained, (extra, sorted(_files(folder)))
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save))
    assert resumed.trainer.ckpt_path == str(last) and resumed.trainer.global_step == 3


def test_a_fit_that_fails_in_its_data_setup_leaves_no_event_file_or_log_folder(workdir, monkeypatch, tmp_path):
    """A fit whose datamodule's setup refuses the data (clips too short for --data.init_args.frames) left the event
    file TensorBoard had opened (and the stage folder a new run's logger had made) with nothing in it; now a new run
    leaves no folder, and a rerun of a trained stage leaves its folder's files byte for byte."""
    save = [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    too_long = "--data.init_args.frames=40"  # the clips hold 18 frames
    with pytest.raises(ValueError, match="the stage needs 40 frames"):
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save, too_long))
    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    trained = _files(tmp_path / "runs" / STAGES[0])
    with warnings.catch_warnings(), pytest.raises(ValueError, match="the stage needs 40 frames"):
        warnings.simplefilter("ignore")  # resuming with other data settings
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save, too_long))
    assert _files(tmp_path / "runs" / STAGES[0]) == trained


def test_max_steps_0_is_one_error_saying_it_trains_nothing(workdir, monkeypatch, tmp_path, capsys):
    """--trainer.max_steps 0 was read as unset: 'the LR schedule needs a length: set trainer.max_steps, ...',
    although it was set."""
    from mardini.cli import library_error
    from mardini.user_errors import run_reporting_user_errors

    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}"]
    for extra in (["--model.init_args.decay_steps=null"], ["--model.init_args.decay_steps=10"]):  # a schedule of
        # its own trains nothing either
        code = run_reporting_user_errors("train.py", lambda: _fit(workdir, monkeypatch, *_stage(STAGES[0], 0, *save,
                                                                                                   *extra)),
                                         unwrap=library_error)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[0] == ("train.py: error: trainer.max_steps=0 trains nothing: give a positive number "
                                        "of steps (-1 = bounded by max_epochs)"), err
        assert not list(tmp_path.rglob("*.ckpt"))


GRAD_SCALER_16_MIXED = ('--trainer.plugins={"class_path": "lightning.pytorch.plugins.precision.MixedPrecision", '
                        '"init_args": {"precision": "16-mixed", "device": "cpu"}}')  # a GPU's 16-mixed, on the CPU


@pytest.mark.parametrize("precision, why", [
    ("bf16-true", "it keeps the weights, the EMA and AdamW's moments in half precision"),
    ("16-true", "it keeps the weights, the EMA and AdamW's moments in half precision"),
    ("64-true", "the networks would compute in fp64, but cached latents reach them in fp32"),
], ids=["bf16-true", "16-true", "64-true"])
def test_a_precision_the_stages_do_not_train_in_is_one_error_naming_bf16_mixed(workdir, monkeypatch, tmp_path, capsys,
                                                                                precision, why):
    """--trainer.precision bf16-true (or 16-true) trained a generator warm-up silently with half-precision weights,
    EMA and Adam moments, whose small updates round away, and a stage with a planner failed in its resize
    ('"compute_index_ranges_weights" not implemented for 'BFloat16''), naming neither the setting nor the fix. Both
    are refused at setup, before a step, as is 64-true (fp64 networks, fp32 cached latents)."""
    from mardini.cli import library_error
    from mardini.user_errors import run_reporting_user_errors

    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    for stage in (STAGES[0], STAGES[2]):  # a generator warm-up, the planner warm-up
        run = _stage(stage, 2, f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.precision={precision}")
        code = run_reporting_user_errors("train.py", lambda: _fit(workdir, monkeypatch, *run), unwrap=library_error)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        assert err[0].startswith(f"train.py: error: trainer.precision={precision} is not supported: {why}"), err
        assert err[0].endswith("; use bf16-mixed (bf16 compute with fp32 weights, EMA and optimiser state, as the "
                               "stage configs) or 32-true"), err
        assert not list(tmp_path.rglob("*.ckpt"))


def test_16_mixed_on_a_cpu_trains_as_bf16_mixed_and_transformer_engine_is_refused(workdir, monkeypatch, tmp_path):
    """On a CPU Lightning trains 16-mixed as bf16-mixed (no GradScaler): accepted. Transformer Engine keeps bf16 or
    fp16 weights: refused like bf16-true (its package is not installed here, so the check is called directly)."""
    from mardini.lit.base import _check_precision

    with pytest.warns(UserWarning, match="Using `precision='bf16-mixed'` instead"):
        cli = _fit(workdir, monkeypatch, *_stage(STAGES[0], 1, f"--trainer.logger.init_args.save_dir={tmp_path}",
                                                 "--trainer.precision=16-mixed"))
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 1
    for precision, dtype in [("transformer-engine", "bf16"), ("transformer-engine-float16", "fp16")]:
        with pytest.raises(ValueError, match=rf"^trainer.precision={precision} is not supported: Transformer Engine "
                                             rf"keeps the weights in {dtype} .*; use bf16-mixed"):
            _check_precision(precision)


def test_a_gpu_s_16_mixed_trains_with_its_grad_scaler(workdir, monkeypatch, tmp_path):
    """16-mixed with a GradScaler (a GPU's, here on the CPU) trains: the scaler's overflow steps are its own (see
    tests/test_reliability_checkpoints.py). Before, model.nonfinite stopped the fit at the first one, and then setup
    refused 16-mixed for that reason."""
    cli = _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, f"--trainer.logger.init_args.save_dir={tmp_path}",
                                             "--trainer.precision=null", GRAD_SCALER_16_MIXED))
    assert cli.trainer.precision == "16-mixed" and cli.trainer.precision_plugin.scaler is not None
    assert cli.trainer.global_step == 2 and cli.model.nonfinite_skipped == 0


def test_a_truncated_last_ckpt_is_one_train_py_error_naming_the_checkpoints_to_resume_from(workdir, monkeypatch,
                                                                                            tmp_path, capsys):
    from mardini.cli import library_error
    from mardini.user_errors import run_reporting_user_errors

    save = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--checkpoint_every=1"]
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    folder = tmp_path / STAGES[0] / "checkpoints"
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # e.g. a copy cut short
    code = run_reporting_user_errors("train.py", lambda: _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save)),
                                     unwrap=library_error)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2, err
    assert err[0].startswith(f"train.py: error: {last} could not be read as a MarDini checkpoint"), err[0]
    assert "It may be truncated" in err[0] and "PytorchStreamReader" in err[0]
    assert f"({folder} also holds step00000002.ckpt: e.g. --ckpt_path {folder / 'step00000002.ckpt'})" in err[0]
    assert err[0].endswith("or start over with --ckpt_path null.")
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save, f"--ckpt_path={folder / 'step00000002.ckpt'}"))
    assert resumed.trainer.global_step == 3


def test_a_slurm_preemption_checkpoint_is_resumed_from_the_stage_s_folder(workdir, monkeypatch):
    import os
    import shutil

    save = ["--trainer.logger.init_args.save_dir=outputs/hpc"]
    first = _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    assert first.trainer.default_root_dir == os.path.join("outputs", "hpc", STAGES[0], "checkpoints")
    folder = workdir / first.trainer.default_root_dir
    shutil.copy(folder / "last.ckpt", folder / "step2.bak")
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save))  # step 3 ...
    os.replace(folder / "last.ckpt", folder / "hpc_ckpt_1.ckpt")  # ... as SIGUSR1 would have saved it, the newest
    os.replace(folder / "step2.bak", folder / "last.ckpt")
    os.utime(folder / "last.ckpt", (1, 1))  # the older file
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 4, *save))
    assert resumed.trainer.ckpt_path.endswith("hpc_ckpt_1.ckpt") and resumed.trainer.global_step == 4
    assert not (folder / "hpc_ckpt_1.ckpt").exists()  # step 4's save supersedes it
    shutil.copy(folder / "last.ckpt", folder / "hpc_ckpt_1.ckpt")  # a later preemption's
    with pytest.raises(ValueError, match="holds SLURM preemption checkpoints \\(hpc_ckpt_1.ckpt\\).*delete them"):
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 4, *save, "--ckpt_path=null"))


def test_a_preemption_checkpoint_goes_to_the_stage_s_folder_whatever_default_root_dir(workdir, monkeypatch, tmp_path):
    """SIGTERM at step 2's start (tests/preemption_run.py's SignalOneRank) saves hpc_ckpt_1.ckpt at step 3 into the
    stage's checkpoint folder, though --trainer.default_root_dir names another: the rerun resumes it, and so does
    --ckpt_path hpc. Before, Lightning's save went to default_root_dir, where the CLI did not look: the rerun resumed
    the older last.ckpt."""
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path / 'root'}"]
    folder = tmp_path / STAGES[0] / "checkpoints"
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    sigterm = '{"class_path": "preemption_run.SignalOneRank", "init_args": {"rank": 0, "scenario": "term"}}'
    with pytest.raises(SystemExit) as exited:
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 10, *save, f"--trainer.callbacks+={sigterm}"))
    assert exited.value.code == 143 and sorted(p.name for p in folder.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 2
    saved = (folder / "hpc_ckpt_1.ckpt").read_bytes()
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 4, *save))
    assert resumed.trainer.ckpt_path == str(folder / "hpc_ckpt_1.ckpt") and resumed.trainer.global_step == 4
    assert not list((tmp_path / "root").glob("hpc_ckpt_*"))
    (folder / "hpc_ckpt_1.ckpt").write_bytes(saved)
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 4, *save, "--ckpt_path=hpc"))
    assert resumed.trainer.ckpt_path == str(folder / "hpc_ckpt_1.ckpt")


def test_preemption_checkpoints_are_deleted_once_a_resumed_run_saves_past_them(workdir, monkeypatch, tmp_path):
    """hpc_ckpt_N.ckpt files (one full checkpoint per preemption) are deleted by the first regular save of a step at
    least theirs; before, they piled up, one per requeue, never deleted."""
    import shutil

    save = [f"--trainer.logger.init_args.save_dir={tmp_path}"]
    folder = tmp_path / STAGES[0] / "checkpoints"
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    shutil.copy(folder / "last.ckpt", folder / "hpc_ckpt_1.ckpt")  # an earlier preemption's, at step 2
    sigterm = '{"class_path": "preemption_run.SignalOneRank", "init_args": {"rank": 0, "scenario": "term"}}'
    with pytest.raises(SystemExit):  # resumes hpc_ckpt_1.ckpt, SIGTERM at step 2's start: hpc_ckpt_2.ckpt of step 3
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 10, *save, f"--trainer.callbacks+={sigterm}"))
    assert sorted(p.name for p in folder.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 4, *save))
    assert resumed.trainer.ckpt_path == str(folder / "hpc_ckpt_2.ckpt") and resumed.trainer.global_step == 4
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step00000004.ckpt"]
    # what a resume could still need stays: a preemption checkpoint of a later step, one that cannot be read
    from mardini.lit.step_checkpoint import drop_superseded_preemption_checkpoints

    torch.save({"global_step": 5}, folder / "hpc_ckpt_3.ckpt")
    (folder / "hpc_ckpt_4.ckpt").write_bytes(b"cut short")
    torch.save({"global_step": 4}, folder / "hpc_ckpt_5.ckpt")
    assert drop_superseded_preemption_checkpoints(folder, 4) == ["hpc_ckpt_5.ckpt"]
    assert sorted(p.name for p in folder.glob("hpc_ckpt_*")) == ["hpc_ckpt_3.ckpt", "hpc_ckpt_4.ckpt"]


def test_a_kill_between_the_step_checkpoint_and_last_ckpt_resumes_the_step_checkpoint(workdir, monkeypatch, tmp_path):
    """StepCheckpoint writes stepN.ckpt, then last.ckpt: a kill between the two leaves the step checkpoint beside an
    older last.ckpt, or alone (the first save of a run) with a torn temp file. --ckpt_path last resumes the checkpoint
    of the highest step; before, it took the older last.ckpt, or found none and set the step checkpoint aside as an
    earlier run's (checkpoints/earlier.1/) and trained from step 0."""
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--checkpoint_every=2"]
    folder = tmp_path / STAGES[0] / "checkpoints"
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 1, *save))
    step1 = (folder / "last.ckpt").read_bytes()
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    (folder / "last.ckpt").write_bytes(step1)  # killed after step00000002.ckpt, before last.ckpt of step 2
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save))
    assert resumed.trainer.ckpt_path == str(folder / "step00000002.ckpt") and resumed.trainer.global_step == 3
    (folder / "last.ckpt").unlink()  # killed after step00000003.ckpt, before the run's first last.ckpt
    (folder / ".last.ckpt.x1y2z3.tmp").write_bytes(b"")
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 4, *save))
    assert resumed.trainer.ckpt_path == str(folder / "step00000003.ckpt") and resumed.trainer.global_step == 4
    assert not (folder / "earlier.1").exists() and read_checkpoint(folder / "last.ckpt")["global_step"] == 4


def test_a_logger_without_a_version_is_refused_and_a_fixed_version_resumes_in_its_folder(workdir, monkeypatch,
                                                                                         tmp_path):
    """A logger whose version is null (Lightning's default) logs each run in a new version_N folder: --ckpt_path last
    is refused naming version: "" (before, every rerun trained from scratch in the next version_N, silently); with
    --ckpt_path null it trains there. A fixed version resumes in version_N/checkpoints, where preemption checkpoints
    go too."""
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}"]
    unset = ["--trainer.logger.init_args.version=null"]
    with pytest.raises(ValueError, match=r"trainer.logger's version is null.*set the logger's version: \"\" \(the "
                                         r"stage configs' choice.*--ckpt_path null to train a new run"):
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 1, *save, *unset))
    new = _fit(workdir, monkeypatch, *_stage(STAGES[0], 1, *save, *unset, "--ckpt_path=null"))
    assert Path(new.trainer.checkpoint_callback.dirpath) == tmp_path / STAGES[0] / "version_0" / "checkpoints"
    fixed = ["--trainer.logger.init_args.version=3"]
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 1, *save, *fixed))
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save, *fixed))
    folder = tmp_path / STAGES[0] / "version_3" / "checkpoints"
    assert resumed.trainer.ckpt_path == str(folder / "last.ckpt") and resumed.trainer.global_step == 2
    assert Path(resumed.trainer.default_root_dir) == folder


def test_a_fit_without_a_logger_of_fixed_version_is_refused_not_trained_anew_each_run(workdir, monkeypatch, tmp_path):
    """A stage config without a logger (or --trainer.logger true) gets Lightning's default one, whose version is unset:
    each run logs in a new lightning_logs/version_N, so --ckpt_path last is refused naming a fixed version (before,
    every rerun trained from scratch in the next version_N, silently); --ckpt_path null trains a new run there.
    --trainer.logger false is refused too (before, the fit crashed at its start in LearningRateMonitor)."""
    config = yaml.safe_load((TINY / f"{STAGES[0]}.yaml").read_text())
    del config["trainer"]["logger"]
    (tmp_path / "no_logger.yaml").write_text(yaml.safe_dump(config))
    stage = ["--config", str(TINY / "common.yaml"), "--config", str(tmp_path / "no_logger.yaml"),
             "--trainer.max_steps=1", *FAST, f"--trainer.default_root_dir={tmp_path}"]
    default = (r"trainer.logger is unset \(or true\).*lightning_logs/version_N.*set trainer.logger to a "
               r"TensorBoardLogger with a save_dir, a name and a fixed version.*--ckpt_path null to train a new run")
    for extra in ([], ["--trainer.logger=true"]):
        with pytest.raises(ValueError, match=default):
            _fit(workdir, monkeypatch, *stage, *extra)
    new = _fit(workdir, monkeypatch, *stage, "--ckpt_path=null")
    assert Path(new.trainer.checkpoint_callback.dirpath) == tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    with pytest.raises(ValueError, match=r"trainer.logger is false, but a fit needs a logger.*a fixed version"):
        _fit(workdir, monkeypatch, *stage, "--trainer.logger=false", "--ckpt_path=null")


def test_an_int_batch_limit_counts_batches_and_a_float_is_a_fraction(monkeypatch, tmp_path):
    """The Trainer annotates limit_*_batches Union[float, int, None], float first, and jsonargparse took an int for a
    float: --trainer.limit_train_batches 1 and configs/debug.yaml's `limit_val_batches: 1` (one validation batch)
    became 1.0, all the batches. An int stays an int, as Lightning reads it; a float stays a fraction."""
    from mardini.cli import BATCH_LIMITS

    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(REPO / "configs" / "debug.yaml"), "--trainer.limit_train_batches=1",
                "--trainer.limit_test_batches=1.0", "--trainer.limit_predict_batches=0.5"], run=False)
    limits = [cli.config["trainer"][name] for name in BATCH_LIMITS]
    assert limits == [1, 1, 1.0, 0.5] and [type(v) for v in limits] == [int, int, float, float]
    assert (cli.trainer.limit_train_batches, cli.trainer.limit_val_batches) == (1, 1)
    assert type(cli.trainer.limit_train_batches) is int and type(cli.trainer.limit_val_batches) is int


def test_a_fresh_fit_and_a_resume_warn_of_no_missing_checkpoint_nor_an_unresumable_loader(workdir, monkeypatch):
    save = ["--trainer.logger.init_args.save_dir=outputs/quiet"]
    for steps in (2, 3):  # a fresh fit, then a resume in the data epoch's middle
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli = _fit(workdir, monkeypatch, *_stage(STAGES[0], steps, *save))
        said = [str(w.message) for w in caught]
        assert not [m for m in said if "no last checkpoint available" in m or "dataloader is not resumable" in m]
        saved = yaml.safe_load((workdir / "outputs/quiet" / STAGES[0] / "config.yaml").read_text())
        assert saved["ckpt_path"] == "last"  # both configs keep "last": rerunning either resumes
    assert cli.trainer.ckpt_path.endswith("last.ckpt") and cli.trainer.global_step == 3


def test_seed_everything_seeds_the_training_draws_unless_the_model_or_data_sets_its_own(workdir, monkeypatch):
    """Masks, times and noise (``model.init_args.seed``) and the clips' order and crops (``data.init_args.seed``)
    follow ``seed_everything`` where left unset; before, both stayed 0 whatever ``seed_everything`` said."""
    monkeypatch.chdir(workdir)

    def draws(*extra: str):
        cli = main(["--config", str(TINY / "common.yaml"), "--config", str(TINY / f"{STAGES[0]}.yaml"), *FAST, *extra],
                   run=False)
        cli.datamodule.setup("fit")
        batch = next(iter(cli.datamodule.train_dataloader()))
        noise = torch.randn(8, generator=cli.model.step_generator(0))  # what step 0 draws its masks and noise from
        return (cli.model.hparams.seed, cli.datamodule.state.seed), batch["video"], noise

    one, two, again = draws("--seed_everything=1"), draws("--seed_everything=2"), draws("--seed_everything=1")
    assert one[0] == (1, 1) and two[0] == (2, 2)
    assert not torch.equal(one[1], two[1]) and not torch.equal(one[2], two[2])  # other clips, other noise
    assert torch.equal(one[1], again[1]) and torch.equal(one[2], again[2])
    own = draws("--seed_everything=2", "--model.init_args.seed=1", "--data.init_args.seed=1")
    assert own[0] == (1, 1) and torch.equal(own[1], one[1]) and torch.equal(own[2], one[2])  # an explicit seed wins


def test_a_mask_template_of_one_s_own_trains_from_the_config(workdir, monkeypatch, tmp_path):
    """--model.init_args.mask_sampler names a MaskSampler subclass (tests/user_extensions.py) whose ``every_other``
    template a Curriculum milestone turns on: it is trained and logged (train/loss_every_other), recorded in the
    checkpoint and config.yaml, and resumed; a resume without it fails at the fit's start naming the milestone."""
    extra = tmp_path / "every_other.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"log_every_n_steps": 1, "callbacks": [{
        "class_path": "mardini.lit.curriculum.Curriculum",
        "init_args": {"milestones": [{"step": 1, "templates": {"every_other": 1.0}}]}}]}}))
    args = ["--config", str(extra), f"--trainer.logger.init_args.save_dir={tmp_path}"]
    sampler = "--model.init_args.mask_sampler=user_extensions.EveryOtherSampler"
    cli = _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *args, sampler))
    assert type(cli.model.mask_sampler).__name__ == "EveryOtherSampler"
    assert cli.model.mask_sampler.template_probs == {"every_other": 1.0}  # the milestone's, from step 1
    assert "train/loss_every_other" in cli.trainer.callback_metrics
    folder = tmp_path / STAGES[0]
    assert read_checkpoint(folder / "checkpoints" / "last.ckpt")["hyper_parameters"]["mask_sampler"] == \
        "user_extensions.EveryOtherSampler"
    assert yaml.safe_load((folder / "config.yaml").read_text())["model"]["init_args"]["mask_sampler"] == \
        "user_extensions.EveryOtherSampler"
    assert _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *args, sampler)).trainer.global_step == 3  # resumed
    with pytest.raises(ValueError, match=r"curriculum milestone at step 1: templates \['every_other'\] are not "
                                         r"declared by the model's mask sampler MaskSampler"), \
            pytest.warns(UserWarning, match=r"other settings .*\(mask_sampler 'user_extensions.EveryOtherSampler' "
                                            r"-> None\)"):
        _fit(workdir, monkeypatch, *_stage(STAGES[0], 4, *args))


# --------------------------------------------------------------------------------------------------
# Resume parity: N + M steps in one run == N steps, save, resume, M steps
# --------------------------------------------------------------------------------------------------


def _parity_config(tmp: Path, name: str) -> Path:
    cfg = {
        "seed_everything": 3,
        "checkpoint_every": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "limit_val_batches": 0, "log_every_n_steps": 1,
            "gradient_clip_val": 1.0,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp), "name": name, "version": ""}},
            "callbacks": [{"class_path": "mardini.lit.curriculum.Curriculum", "init_args": {
                "interpolate": True,
                "milestones": [{"step": 0, "keep_ratio": [0.5, 1.0]},
                               {"step": 5, "keep_ratio": [0.2, 0.5], "templates": {"random": 1.0, "interpolation": 1.0}}],
            }}],
        },
        "model": {"class_path": "mardini.lit.MarDiniModule", "init_args": {
            "size": "tiny", "planner_resolution": 8, "generator": {"patch_size": 2}, "lr": 1e-3, "warmup_steps": 2,
            "decay_steps": 8, "ema_decay": 0.9, "templates": {"random": 1.0},
            "keep_ratio": [0.5, 1.0]}},  # milestone 0's (else the Curriculum warns that it replaces the model's)
        "data": {"class_path": "mardini.data.datamodule.VideoDataModule", "init_args": {
            "train_shards": "data/shards/synthetic/train", "val_shards": None, "frames": 9, "fps": 8,
            # 16 px: what a resume restores does not depend on the clip size, and steps are cheaper (32 px: 3x)
            "resolution": 16, "batch_size": 2, "num_workers": 0, "epoch_size": 10, "shuffle_buffer": 8}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def one_run(workdir, tmp_path_factory, seed_variables_kept):
    """The parity config's 8 steps in one run (its CLI): what the resume tests compare their resumed runs with."""
    with seed_variables_kept(), pytest.MonkeyPatch.context() as mp:
        return _fit(workdir, mp, "--config", str(_parity_config(tmp_path_factory.mktemp("parity"), "one")),
                    "--trainer.max_steps=8", *QUIET)


def test_resume_gives_the_same_weights_as_one_run(workdir, monkeypatch, tmp_path, one_run):
    """8 steps at once vs 3 + resume + 5 (crossing a data-epoch boundary at step 5 and a milestone)."""
    quiet, one = QUIET, one_run
    _fit(workdir, monkeypatch, "--config", str(_parity_config(tmp_path, "two")), "--trainer.max_steps=3", *quiet)
    two = _fit(workdir, monkeypatch, "--config", str(_parity_config(tmp_path, "two")), "--trainer.max_steps=8", *quiet)
    assert one.trainer.global_step == two.trainer.global_step == 8
    a, b = one.model.state_dict(), two.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert one.model.mask_sampler.keep_ratio == two.model.mask_sampler.keep_ratio == (0.2, 0.5)  # the YAML's Curriculum ran
    opt_a = one.trainer.optimizers[0].state_dict()["state"]
    opt_b = two.trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    assert one.trainer.lr_scheduler_configs[0].scheduler.last_epoch == two.trainer.lr_scheduler_configs[0].scheduler.last_epoch
    # EMA and raw weights are different tensors and both survived the resume
    raw = two.model.networks.state_dict()
    ema = two.model.ema.module.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_a_fit_ending_between_checkpoints_saves_its_last_step_and_resumes_exactly(workdir, monkeypatch, tmp_path,
                                                                                   one_run):
    """checkpoint_every=3, max_steps=4: step 4 is saved at train end (not lost), and resuming to 8 matches one run."""
    quiet, one = QUIET, one_run
    _fit(workdir, monkeypatch, "--config", str(_parity_config(tmp_path, "two")), "--trainer.max_steps=4", *quiet)
    ckpts = tmp_path / "two" / "checkpoints"
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 4
    assert (ckpts / "step00000004.ckpt").is_file()
    two = _fit(workdir, monkeypatch, "--config", str(_parity_config(tmp_path, "two")), "--trainer.max_steps=8", *quiet)
    assert two.trainer.global_step == 8
    a, b = one.model.state_dict(), two.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming from the train-end checkpoint"


# --------------------------------------------------------------------------------------------------
# Impossible settings fail at start, naming the key
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.init_args.planner_resolution=64", r"model.planner_resolution=64 is larger than .*data.resolution=32"),
        ("--data.init_args.resolution=30", r"data.resolution=30 is not divisible by 4"),
        ("--model.init_args.planner_resolution=7", r"model.planner_resolution=7 is not divisible by 4 \(the autoencoder's factor 2 x the planner's patch size 2\)"),
        ("--model.init_args.keep_ratio=[0.0, 0.5]", r"model.keep_ratio.*0 < min <= max <= 1"),
        ("--model.init_args.frames=1", r"model.frames=1 is impossible"),
        ("--model.init_args.frames=12", r"model.frames=12 is more than data.frames=9"),
        ("--model.init_args.plan_dropout=1.0", r"model.plan_dropout=1.0 is impossible"),
        ("--checkpoint_every=0", r"checkpoint_every=0 is impossible"),
    ],
)
def test_impossible_settings_fail_before_training(workdir, monkeypatch, tmp_path, override, message):
    save = f"--trainer.logger.init_args.save_dir={tmp_path}"
    with pytest.raises(ValueError, match=message):
        _fit(workdir, monkeypatch, *_stage("04_joint_model", 1, save, "--model.init_args.planner_ckpt=null",
                                          "--model.init_args.generator_ckpt=null", SHIPPED_SIZE, override))
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained, nothing written


def test_a_resolution_whose_plan_grid_has_another_aspect_ratio_fails_before_training():
    """52x64 splits into 13x16 generator tokens, but its planner copy 16x20 into 8x10: the generator cannot lay the
    plan out on its grid (the check sampling uses too, mardini.data.transforms.unsplit_input)."""
    from mardini.lit import MarDiniModule

    model = MarDiniModule(size="tiny", planner_resolution=16, generator={"patch_size": 2})
    with pytest.raises(ValueError, match=r"data.resolution=\(52, 64\) gives the generator a 13x16 token grid.*a 8x10 one"):
        model.check_data_settings((52, 64), None)
    model.check_data_settings((48, 60), None)  # 12x15 and 8x10


def test_a_16_9_resolution_that_does_not_fit_names_the_settings_that_do():
    """A 16:9 data.resolution with the tiny chain's planner (short side 16) cannot keep the plan grid's aspect ratio;
    the error names a planner_resolution that fits these frames and the nearest data.resolution at 16 (it said only
    "e.g. a square one"), and both suggestions pass the check."""
    from mardini.lit import MarDiniModule

    model = MarDiniModule(size="tiny", planner_resolution=16)
    with pytest.raises(ValueError, match=r"data.resolution to \[32, 64\].*model.planner_resolution to 18 ") as err:
        model.check_data_settings((36, 64), None)
    assert "square" not in str(err.value)
    model.check_data_settings((32, 64), None)
    MarDiniModule(size="tiny", planner_resolution=18).check_data_settings((36, 64), None)
    patch2 = MarDiniModule(size="tiny", planner_resolution=16, generator={"patch_size": 2})
    with pytest.raises(ValueError, match=r"data.resolution=\(36, 62\) is not divisible by 4.*"
                                         r"data.resolution \[36, 64\] with model.planner_resolution 18"):
        patch2.check_data_settings((36, 62), None)


# --------------------------------------------------------------------------------------------------
# TensorBoard: sample grids of interpolation and image-to-video
# --------------------------------------------------------------------------------------------------


def test_sample_grids_reach_tensorboard(workdir, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mardini.data.datamodule import VideoDataModule
    from mardini.lit import MarDiniModule
    from mardini.lit.sample_grids import SampleGrids

    shards = workdir / "data" / "shards" / "synthetic"
    dm = VideoDataModule(train_shards=str(shards / "train"), val_shards=str(shards / "val"), frames=9, fps=8,
                         resolution=32, batch_size=2, num_workers=0, epoch_size=8, val_clips=2)
    model = MarDiniModule(size="tiny", planner_resolution=16, generator={"patch_size": 2}, lr=1e-3)
    grids = SampleGrids(every_n_steps=2, clips=2, steps=2,
                        tasks={"every_other": [0, 2, 4, 6, -1], "too_long": [0, 2, 4, 6, 8, 10]})
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=TensorBoardLogger(tmp_path, name="tb", version=""),
                        callbacks=[grids], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"too_long.*its grid is skipped while the window has 9 frames"):
        trainer.fit(model, dm)
    assert grids.last_logged_step == 2
    assert all(net.training for net in model.networks.values())  # sampling left train mode as it was
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["images"]
    assert {"samples/interpolation", "samples/image_to_video", "samples/every_other"} <= set(tags)
    assert "samples/too_long" not in tags  # indices outside the 9-frame window: skipped, the fit goes on
    image = events.Images("samples/interpolation")[0]
    # at the step of the scalars of global step 2 (its loss), not at 2: before, grids were a step ahead of them
    assert image.step == events.Scalars("train/loss")[-1].step == 1 and image.height > 0 and image.width > 0


def test_sample_grids_go_to_the_first_logger_that_takes_images_or_say_they_are_off(workdir, tmp_path):
    """Grids reach TensorBoard when it is the second logger, after a CSV logger; with a CSV logger alone the fit
    warns once, at its start, that grids are off; a WandbLogger takes them through its log_image. Before, only the
    first logger was asked: under CSV, W&B or TensorBoard second the grids were skipped without a word."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mardini.data.datamodule import VideoDataModule
    from mardini.lit import MarDiniModule
    from mardini.lit.sample_grids import SampleGrids

    def fit(logger) -> SampleGrids:
        shards = workdir / "data" / "shards" / "synthetic"
        dm = VideoDataModule(train_shards=str(shards / "train"), val_shards=str(shards / "val"), frames=9, fps=8,
                             resolution=32, batch_size=2, num_workers=0, epoch_size=8, val_clips=2)
        model = MarDiniModule(size="tiny", planner_resolution=16, generator={"patch_size": 2}, lr=1e-3)
        grids = SampleGrids(every_n_steps=2, clips=1, steps=1)
        trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=logger, callbacks=[grids], limit_val_batches=0,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, dm)
        return grids

    grids = fit([CSVLogger(tmp_path, name="csv", version=""), TensorBoardLogger(tmp_path, name="tb", version="")])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert grids.last_logged_step == 2 and {"samples/interpolation", "samples/image_to_video"} <= set(
        events.Tags()["images"])
    with pytest.warns(UserWarning, match=r"SampleGrids logs no grid in this fit: none of its loggers \(CSVLogger\) "
                                         r"takes images; add a TensorBoardLogger or WandbLogger to trainer.logger"):
        grids = fit(CSVLogger(tmp_path, name="alone", version=""))
    assert grids.last_logged_step is None

    from mardini.lit.sample_grids import image_writer

    class Wandb(WandbLogger):  # W&B's log_image without wandb (not installed here): what it is handed
        def __init__(self):
            self.images = []

        def log_image(self, key, images, step=None, **kwargs):
            self.images.append((key, [image.shape for image in images], step))

    wandb = Wandb()
    write = image_writer(L.Trainer(logger=[CSVLogger(tmp_path, name="w", version=""), wandb]))
    write("samples/x", torch.zeros(4, 6, 3, dtype=torch.uint8).numpy(), 5)
    assert wandb.images == [("samples/x", [(4, 6, 3)], 5)]


def test_sample_grids_refuse_impossible_extra_tasks():
    from mardini.lit.sample_grids import SampleGrids, given_mask

    with pytest.raises(ValueError, match="give a new name"):
        SampleGrids(tasks={"interpolation": [0]})
    with pytest.raises(ValueError, match=r"indices must lie in \[-4, 4\)"):
        given_mask([0, 4], 4, "x")
    with pytest.raises(ValueError, match="leave a frame to generate"):
        given_mask([0, 1, 2, -1], 4, "x")
    assert given_mask([0, -1], 5, "x").tolist() == [False, True, True, True, False]


def _fails_at(monkeypatch, step: int) -> None:
    """The generator warm-up's training step raises once the fit reaches global step ``step``."""
    from mardini.lit import GenerationModule

    real = GenerationModule.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step >= step:
            raise RuntimeError(f"failed at step {self.global_step}")
        return real(self, batch, batch_idx)

    monkeypatch.setattr(GenerationModule, "training_step", training_step)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _interrupted_at(monkeypatch, step: int) -> None:
    """A callback raises KeyboardInterrupt (what Ctrl-C raises) at the start of the training batch of global step
    ``step``; Lightning's ``trainer.fit`` takes it and exits (``sys.exit(1)``, after its ``on_exception`` hooks)."""
    from mardini.lit.step_checkpoint import FitStarted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= step:
            raise KeyboardInterrupt

    monkeypatch.setattr(FitStarted, "on_train_batch_start", on_train_batch_start, raising=False)


@pytest.fixture
def sigint_kept():
    """SIGINT's handler put back after the test: Lightning ignores SIGINT from an interrupt on (SIG_IGN)."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "CSVLogger"])
@pytest.mark.parametrize("ending", ["exception", "ctrl-c"])
def test_a_new_run_that_fails_before_saving_puts_the_earlier_run_back(workdir, monkeypatch, tmp_path, sigint_kept,
                                                                      logger, ending):
    """--ckpt_path null where a run is, then an exception during training, or Ctrl-C (a KeyboardInterrupt), before
    the new run saved anything: the stage's folder is as the fit found it, byte for byte, and --ckpt_path last
    resumes the earlier run. Before, the earlier run stayed in checkpoints/earlier.1/ beside the failed run's event
    file and config: the folder looked empty and `last` trained from scratch (after an exception until session 32,
    after Ctrl-C until session 33, which Lightning turns into sys.exit(1)); a CSV logger's hparams.yaml, which the
    fit rewrites as it starts, held the new run's settings."""
    save = [f"--trainer.logger.class_path=lightning.pytorch.loggers.{logger}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.log_every_n_steps=1"]
    stage = tmp_path / STAGES[0]
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    before = _files(stage)
    assert "checkpoints/last.ckpt" in before and "config.yaml" in before and "hparams.yaml" in before
    with monkeypatch.context() as m:
        if ending == "exception":
            _fails_at(m, 1)
            expected = pytest.raises(RuntimeError, match="failed at step 1")
        else:
            _interrupted_at(m, 1)
            expected = pytest.raises(SystemExit)
        with expected:
            _fit(workdir, m, *_stage(STAGES[0], 3, *save, "--model.init_args.lr=2e-3", "--ckpt_path=null"))
    assert _files(stage) == before
    assert sorted(p.name for p in stage.rglob("*") if p.is_dir()) == ["checkpoints"]  # no earlier.1/ left
    resumed = _fit(workdir, monkeypatch, *_stage(STAGES[0], 3, *save))
    assert resumed.trainer.ckpt_path == str(stage / "checkpoints" / "last.ckpt")


@pytest.mark.slow  # two spawned workers and a train.py process: about a minute
def test_ctrl_c_during_a_ddp_spawn_fit_puts_the_earlier_run_back(workdir, monkeypatch, tmp_path):
    """--ckpt_path null where a run is, on 2 ddp_spawn workers, then Ctrl-C (SIGINT to the whole process group, as a
    terminal sends it) once the new run's training started, before it saved: the stage's folder is as the fit found
    it, byte for byte, and the fit says it was interrupted. Before, each worker's KeyboardInterrupt ended it silently
    (torch's spawn wrapper swallows it) and the main process, which never trained, printed "the fit failed before
    training: .../events.out.tfevents... deleted (they recorded nothing)", deleting the new run's event file, and
    left the earlier run in checkpoints/earlier.1/."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    save = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.log_every_n_steps=1"]
    stage = tmp_path / STAGES[0]
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    before = _files(stage)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, str(REPO / "train.py"), "fit", *_stage(STAGES[0], 10_000, *save), "--ckpt_path=null",
               "--checkpoint_every=100000", "--trainer.strategy=ddp_spawn", "--trainer.devices=2"]
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the SIGINT reaches its workers too
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("A new run in "):  # the training starts: the earlier run is set aside (rank 0)
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(240), "the ddp_spawn fit never started training:\n" + "".join(lines)[-3000:]
        time.sleep(1)  # past the set-aside's return, into the training
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 1, out[-3000:]
    assert "The fit was interrupted before saving a checkpoint: the earlier run's files" in out, out[-3000:]
    assert "failed" not in out, out[-3000:]
    assert _files(stage) == before
    assert sorted(p.name for p in stage.rglob("*") if p.is_dir()) == ["checkpoints"]  # no earlier.1/ left


RANK_1_FAILS_RANK_0_HANGS = """
import sys, time
from mardini.lit import GenerationModule

real = GenerationModule.training_step


def training_step(self, batch, batch_idx):
    if self.global_step >= 2 and self.global_rank == 1:
        raise RuntimeError("a bad batch on rank 1")
    if self.global_step >= 2:  # rank 0, stuck where the launcher's SIGTERM does not stop it (an NCCL collective)
        time.sleep(600)
    return real(self, batch, batch_idx)


GenerationModule.training_step = training_step  # in the spawned workers too: they import this file as __mp_main__
if __name__ == "__main__":
    from mardini.cli import main
    main(sys.argv[1:])
"""


@pytest.mark.slow  # two spawned workers, the launcher's 30 s before it SIGKILLs rank 0: about a minute
def test_a_ddp_spawn_fit_whose_rank_1_fails_while_rank_0_hangs_puts_the_earlier_run_back(workdir, tmp_path):
    """--ckpt_path null where a run is, on 2 ddp_spawn workers: rank 1 raises at step 2 while rank 0 hangs; torch's
    launcher SIGTERMs rank 0, then SIGKILLs it 30 s later, before its clean-up ran. The main process cleans up from
    what rank 0 recorded: the stage's folder is as the fit found it, byte for byte. Before, the earlier run stayed in
    checkpoints/earlier.1/ (config.yaml rotated to config.1.yaml, the new run's event file and hparams.yaml left),
    and --ckpt_path last trained from scratch."""
    import os
    import subprocess
    import sys

    save = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.log_every_n_steps=1"]
    stage = tmp_path / STAGES[0]
    script = tmp_path / "rank_1_fails.py"
    script.write_text(RANK_1_FAILS_RANK_0_HANGS)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    first = subprocess.run([sys.executable, str(script), "fit", *_stage(STAGES[0], 2, *save)], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _files(stage)
    command = [sys.executable, str(script), "fit", *_stage(STAGES[0], 10_000, *save), "--ckpt_path=null",
               "--checkpoint_every=100000", "--trainer.strategy=ddp_spawn", "--trainer.devices=2"]
    failed = subprocess.run(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=400)
    out = failed.stdout
    assert failed.returncode == 1 and "a bad batch on rank 1" in out, out[-3000:]
    assert "forcefully exiting via SIGKILL" in out, out[-3000:]  # rank 0 never reached its clean-up
    assert "The fit failed before saving a checkpoint: the earlier run's files" in out, out[-3000:]
    assert _files(stage) == before
    assert sorted(p.name for p in stage.rglob("*") if p.is_dir()) == ["checkpoints"]  # no earlier.1/ left


def test_a_new_run_that_fails_after_saving_keeps_the_earlier_run_aside(workdir, monkeypatch, tmp_path):
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--checkpoint_every=1"]
    folder = tmp_path / STAGES[0] / "checkpoints"
    _fit(workdir, monkeypatch, *_stage(STAGES[0], 2, *save))
    earlier = _files(folder)
    said: list[str] = []
    monkeypatch.setattr("mardini.lit.step_checkpoint.rank_zero_info", said.append)
    with monkeypatch.context() as m:
        _fails_at(m, 1)
        with pytest.raises(RuntimeError, match="failed at step 1"):
            _fit(workdir, m, *_stage(STAGES[0], 3, *save, "--ckpt_path=null"))
    aside = _files(folder / "earlier.1")
    assert {k: v for k, v in aside.items() if k.endswith(".ckpt")} == earlier  # the earlier run, as it was, aside
    assert any(k.startswith("events.out.tfevents.") for k in aside)  # with its logs
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 1  # the new run's save
    assert said[-1].startswith(f"The fit failed after saving last.ckpt, step00000001.ckpt: the earlier run stays in "
                               f"{folder / 'earlier.1'} (--ckpt_path {folder / 'earlier.1' / 'last.ckpt'} resumes it")

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


@pytest.mark.parametrize("chain", ["mardini-s", "mardini-l"])
def test_each_paper_stage_draws_with_its_own_seed(capsys, chain):
    """One seed for every stage would replay the stage before's masks, noise and clip order at the same steps."""
    stages = [p for p in PAPER if p.parent.name == chain]
    seeds = []
    for stage in stages:
        cfg = _printed(capsys, stage, CONFIGS / "paper" / "cluster.yaml")
        seeds.append((cfg["seed_everything"], cfg["model"]["init_args"]["seed"], cfg["data"]["init_args"]["seed"]))
    assert len({s[0] for s in seeds}) == len(stages), seeds
    # the model's draws and the clip order follow it (None: take seed_everything,
    # mardini.cli_settings.take_seed_everything)
    assert all(s[1] in (None, s[0]) and s[2] in (None, s[0]) for s in seeds), seeds


def test_the_large_planner_stages_say_to_launch_with_fsdp():
    """A 2.7B planner with its gradients, AdamW state and EMA does not fit one 80 GB GPU under DDP."""
    for stage in PAPER:
        launch = next(line for line in stage.read_text().splitlines() if "python train.py fit" in line)
        assert launch.endswith("configs/paper/fsdp.yaml" if "mardini-l" in str(stage) else "configs/paper/cluster.yaml")


@pytest.mark.parametrize("cluster", ["cluster.yaml", "fsdp.yaml"])
@pytest.mark.parametrize("stage", PAPER, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_stage_parses(capsys, stage, cluster):
    cfg = _printed(capsys, stage, CONFIGS / "paper" / cluster)
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["trainer"]["max_steps"] > 0
    strategy = cfg["trainer"]["strategy"]["class_path"]
    assert strategy.endswith("FSDPStrategy" if cluster == "fsdp.yaml" else "DDPStrategy")
    assert cfg["model"]["init_args"]["size"].startswith("mardini-")
    if isinstance(cfg["trainer"]["val_check_interval"], int):  # batches: may exceed one epoch of a rank on many GPUs,
        assert cfg["trainer"]["check_val_every_n_epoch"] is None  # which Lightning refuses unless counted across epochs


@pytest.mark.parametrize("stage", TINY, ids=lambda p: p.stem)
def test_tiny_stage_parses(capsys, stage):
    cfg = _printed(capsys, CONFIGS / "tiny" / "common.yaml", stage)
    assert cfg["model"]["init_args"]["size"] == "tiny" and cfg["trainer"]["accelerator"] == "cpu"


@pytest.mark.parametrize("stage", [*TINY, CONFIGS / "debug.yaml"], ids=lambda p: p.stem)
def test_tiny_stage_builds_its_model(capsys, stage):
    """The settings checked at construction (planner_resolution against the planner's patches ...) hold for every
    stage of the demo chain; the checkpoints a stage starts from are left out (written by the stages before it)."""
    import importlib

    from mardini.autoencoders import build_autoencoder

    common = [] if stage.name == "debug.yaml" else [CONFIGS / "tiny" / "common.yaml"]
    model = _printed(capsys, *common, stage)["model"]
    args = {k: v for k, v in model["init_args"].items() if k not in ("init_from", "planner_ckpt", "generator_ckpt")}
    if args.get("autoencoder"):
        args["autoencoder"] = build_autoencoder(args["autoencoder"])
    module, _, name = model["class_path"].rpartition(".")
    built = getattr(importlib.import_module(module), name)(**args)
    assert built.hparams.planner_resolution == model["init_args"]["planner_resolution"]


def test_the_gpu_overlay_changes_only_device_batch_and_log_dir(capsys):
    stage = CONFIGS / "tiny" / "05_joint_task.yaml"
    cpu = _printed(capsys, CONFIGS / "tiny" / "common.yaml", stage)
    gpu = _printed(capsys, CONFIGS / "tiny" / "common.yaml", stage, CONFIGS / "tiny" / "gpu" / "batch128.yaml")
    assert gpu["trainer"]["accelerator"] == "gpu" and gpu["data"]["init_args"]["batch_size"] == 128
    assert gpu["trainer"]["logger"]["init_args"]["save_dir"] == "outputs/gpu"
    assert gpu["trainer"]["logger"]["init_args"]["name"] == "05_joint_task"  # the stage's name stays
    changed = {"batch_size", "num_workers", "pin_memory", "epoch_size"}
    assert {k for k, v in gpu["data"]["init_args"].items() if cpu["data"]["init_args"][k] != v} == changed
    assert gpu["model"] == cpu["model"]
    assert {k for k in gpu["trainer"] if gpu["trainer"][k] != cpu["trainer"][k]} == {"accelerator", "logger"}


def _printed_with(capsys, stage: Path, *extra: str) -> dict:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(CONFIGS / "tiny" / "common.yaml"), "--config", str(stage), *extra, "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_the_readme_s_dotted_network_overrides_merge_into_the_stage_s_dict(capsys):
    """Each ``--model.init_args.{generator,planner}.FIELD VALUE`` that README.md shows changes that field and keeps the
    stage YAML's others; the dict form (``--model.init_args.generator '{abs_pos: true}'``) replaces the whole dict,
    dropping the stage's width, patch and attention, as README.md says."""
    import re

    readme = (CONFIGS.parent / "README.md").read_text()
    shown = re.findall(r"`--model\.init_args\.(generator|planner)\.(\w+) ([^`\s]+)`", readme)
    assert ("generator", "abs_pos", "true") in shown, shown
    stage = CONFIGS / "tiny" / "05_joint_task.yaml"
    declared = yaml.safe_load(stage.read_text())["model"]["init_args"]
    for network, field, value in shown:
        cfg = _printed_with(capsys, stage, f"--model.init_args.{network}.{field}", value)
        assert cfg["model"]["init_args"][network] == {**declared[network], field: yaml.safe_load(value)}, (field, value)
    replaced = _printed_with(capsys, stage, "--model.init_args.generator", "{abs_pos: true}")
    assert replaced["model"]["init_args"]["generator"] == {"abs_pos": True}


@pytest.mark.parametrize("subcommand, said", [
    ("fit", ["resume from the newest checkpoint in the stage's folder", "null: start over in the same folder",
             "never unpickles code"]),
    ("validate", ["score the stage's newest checkpoint", "null: score the weights the stage starts from",
                  "never unpickles code"]),
])
def test_help_describes_what_ckpt_path_and_weights_only_do_here(capsys, subcommand, said):
    """``train.py fit --help`` says what ``--ckpt_path`` (default ``last``: the stage's folder) and ``--weights_only``
    (default true) do under this CLI. Before, Lightning's text: "last: the last model checkpoint from the previous
    trainer.fit call", and ``--weights_only`` "Defaults to None" beside its default True."""
    import re

    with pytest.raises(SystemExit) as stop:
        main([subcommand, "--help"])
    assert stop.value.code in (0, None)
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for phrase in said:
        assert phrase in text, phrase
    assert "previous ``trainer.fit`` call" not in text and "Defaults to ``None``. If ``True``" not in text



@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_help_says_what_seed_everything_true_does_here(capsys, subcommand):
    """``train.py fit --help`` says what ``--seed_everything true`` (the default) does here, as README.md's "Seeds"
    does: ``PL_GLOBAL_SEED``, else 0. Before, Lightning's text: "Set to True to use a random seed"."""
    import re

    with pytest.raises(SystemExit):
        main([subcommand, "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "true (the default): PL_GLOBAL_SEED from the environment, else 0 (no random seed" in text
    assert "model.init_args.seed and data.init_args.seed left unset take" in text
    assert "random seed." not in text and "Set to True" not in text
    readme = " ".join((CONFIGS.parent / "README.md").read_text().split())
    assert "`seed_everything: true` takes `PL_GLOBAL_SEED` from the environment, else 0" in readme

def test_the_readme_s_rules_for_composing_configs_hold(capsys, tmp_path):
    """README.md's "Composing configs": files and overrides apply in the order given (an override before a later
    ``--config`` is overwritten by it), and a later file replaces a dict or list field whole (the stage's generator
    fields, its Curriculum and SampleGrids gone), where the dotted override merges (the test above)."""
    readme = " ".join((CONFIGS.parent / "README.md").read_text().split())
    assert "An override placed before a later `--config` is overwritten by that file's value" in readme
    assert "a field whose value is a dict or a list is replaced whole" in readme
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model: {init_args: {generator: {depth: 3}}}\n"
                       "trainer: {callbacks: [{class_path: lightning.pytorch.callbacks.ModelCheckpoint}]}\n")
    stage = CONFIGS / "tiny" / "05_joint_task.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "tiny" / "common.yaml"), "--model.init_args.lr", "7e-4",
              "--config", str(stage), "--config", str(overlay), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["init_args"]["lr"] == yaml.safe_load(stage.read_text())["model"]["init_args"]["lr"]
    assert cfg["model"]["init_args"]["generator"] == {"depth": 3}
    assert [c["class_path"] for c in cfg["trainer"]["callbacks"]] == ["lightning.pytorch.callbacks.ModelCheckpoint"]


def test_the_saved_config_leaves_the_derived_default_root_dir_unset(monkeypatch, tmp_path):
    """The Trainer's ``default_root_dir`` is the stage's checkpoint folder (where Lightning looks for preemption
    checkpoints), but ``config.yaml`` keeps it as given (unset), so the file rerun with another logger folder derives
    that folder's. Before, it recorded ``default_root_dir: <old folder>/checkpoints``: a rerun with another save_dir
    kept it, and under SLURM Lightning resumed the old folder's ``hpc_ckpt_N.ckpt`` into the new run."""
    from mardini.cli import KEEP_NONE, KeepEarlierConfig, MarDiniCLI

    monkeypatch.setattr(MarDiniCLI, "fit", lambda self, model, **kwargs: None)  # the settings, not a training
    cli = main(["fit", "--config", str(CONFIGS / "debug.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert cli.trainer.default_root_dir == str(tmp_path / "joint" / "checkpoints")
    saver = next(cb for cb in cli.trainer.callbacks if isinstance(cb, KeepEarlierConfig))
    saved = yaml.safe_load(saver.parser.dump(saver.config, **KEEP_NONE))  # as config.yaml is written
    assert saved["trainer"]["default_root_dir"] is None


def test_help_without_a_subcommand_says_what_the_command_does(capsys):
    """``train.py --help`` describes this CLI (a stage's fit or validate, how configs compose, where the options are
    listed). Before, Lightning's "Lightning Trainer command line tool"."""
    import re

    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code in (0, None)
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "Train a MarDini stage (fit) or score its newest checkpoint (validate)" in text
    assert "fit --help and validate --help list the options" in text
    assert "Lightning Trainer command line tool" not in text

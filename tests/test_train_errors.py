"""train.py reports a setup mistake as the library's message and where it was raised, not jsonargparse's wrapping."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mardini.autoencoders import FrameAutoencoder, SpaceToDepthAutoencoder
from mardini.cli import library_error, main
from mardini.models.registry import UnknownSize
from mardini.user_errors import where_raised

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs/tiny/common.yaml"), "--config", str(ROOT / "configs/tiny/01_dm_warmup_4f.yaml")]
KEEP_RATIO = "--model.init_args.keep_ratio=[0.5, 1.5]"


class NoSpecAE(SpaceToDepthAutoencoder):
    """A user's autoencoder that does not say how to rebuild itself (the base class's ``spec()``)."""

    def spec(self) -> dict:
        return FrameAutoencoder.spec(self)


def _raised(monkeypatch, tmp_path, *args: str) -> BaseException:
    monkeypatch.chdir(tmp_path)  # relative paths of the configs (data, logs, weights) resolve to nothing here
    with pytest.raises(ValueError) as caught:
        main(["fit", *args])
    return caught.value


@pytest.mark.parametrize("args, error, message, where", [
    ([*TINY, KEEP_RATIO], ValueError,
     r"^model.keep_ratio / model.templates: keep_ratio must satisfy .* got \(0.5, 1.5\)$", "lit/base.py"),
    ([*TINY, "--data.init_args.batch_size=0"], ValueError, r"^data.batch_size=0 is impossible: it must be >= 1$",
     "data/datamodule.py"),
    # a class inside a class (the VAE inside the model): two nested jsonargparse errors around the library's
    (["--config", str(ROOT / "configs/paper/mardini-s/01_dm_warmup_a.yaml"), "--trainer.accelerator=cpu",
      "--trainer.devices=1"], FileNotFoundError, r"^no AutoencoderKL at weights/vae-16ch \(config.json missing\)",
     "autoencoders/diffusers_kl.py"),
    # an autoencoder that cannot say how to rebuild itself: refused before training, not at the first checkpoint
    ([*TINY, "--model.init_args.autoencoder=test_train_errors.NoSpecAE"], ValueError,
     r"^model.autoencoder: NoSpecAE does not implement spec\(\) .*; implement it", "lit/base.py"),
    # a mask sampler of one's own (tests/user_extensions.py) that does not import, or is none; a template that the
    # model's sampler does not declare
    ([*TINY, "--model.init_args.mask_sampler=user_extensions.NoSuchSampler"], ValueError,
     r"^model.mask_sampler='user_extensions.NoSuchSampler' does not import \(.*\); give the class path", "class_paths.py"),
    ([*TINY, "--model.init_args.mask_sampler=user_extensions.WindowSchedule"], ValueError,
     r"^model.mask_sampler='user_extensions.WindowSchedule' is .*, not a MaskSampler subclass", "class_paths.py"),
    ([*TINY, "--model.init_args.templates={every_other: 1.0}"], ValueError,
     r"^model.keep_ratio / model.templates: unknown task templates \['every_other'\]; allowed: \[.*\] "
     r"\(MaskSampler.templates\); a new template needs a MaskSampler subclass", "lit/base.py"),
    # an unknown size: a KeyError, which jsonargparse wrapped ("raised at" jsonargparse, the message quoted)
    ([*TINY, "--model.init_args.size=huge"], UnknownSize,
     r"^unknown model size 'huge'; registered sizes: \['tiny', ", "models/registry.py"),
], ids=["model-setting", "data-setting", "missing-vae-folder", "autoencoder-without-spec", "mask-sampler-not-found",
        "mask-sampler-not-one", "template-not-declared", "unknown-size"])
def test_the_library_s_error_is_found_under_jsonargparse_s_wrapping(monkeypatch, tmp_path, args, error, message, where):
    wrapped = _raised(monkeypatch, tmp_path, *args)
    assert "Does not validate against any of the Union subtypes" in str(wrapped)  # what the user saw before
    err = library_error(wrapped)
    assert type(err) is error
    assert re.search(message, str(err)), str(err)
    assert where in where_raised(err).replace("\\", "/")


def test_a_jsonargparse_error_without_a_library_error_keeps_only_its_meaningful_lines():
    from jsonargparse._typehints import raise_union_unexpected_value

    try:  # a class whose construction failed on a bug (not a user error): nothing to unwrap, only noise to drop
        raise_union_unexpected_value(["Model", type(None)], "Namespace(x=1)",
                                     [TypeError("Model.__init__() got an unexpected keyword 'x'"),
                                      ValueError("Expected a <class 'NoneType'>")])
    except ValueError as e:
        err = library_error(e)
    assert str(err) == "Model.__init__() got an unexpected keyword 'x'"
    assert "jsonargparse" in where_raised(err)  # where it was raised: still the truth


def test_train_py_exits_2_with_one_message_and_the_switch_shows_the_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "train.py"), "fit", *TINY, KEEP_RATIO]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr.strip().splitlines()
    assert err[-2] == ("train.py: error: model.keep_ratio / model.templates: keep_ratio must satisfy "
                       "0 < min <= max <= 1, got (0.5, 1.5)")
    assert "lit/base.py:" in err[-1] and "in __init__" in err[-1] and "MARDINI_TRACEBACK=1" in err[-1]
    assert "Traceback" not in done.stderr and "NoneType" not in done.stderr
    shown = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env={**env, "MARDINI_TRACEBACK": "1"},
                           timeout=300)
    assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_of_unexpected_member_names_are_one_train_py_error_with_and_without_loader_workers(tmp_path, workers):
    """Every sample's video renamed (``*.frames.npy``): the stream's "bad samples in a row" stop is a data error like
    the others, one line and exit status 2, also when a loader worker raises it (PyTorch re-raises it in the main
    process with the worker's traceback as its message). Before, a RuntimeError: 40 lines of traceback, exit status
    1; with a worker, the process then never exited (the worker held alive by that traceback, outliving the one
    SIGTERM that multiprocessing sends at exit)."""
    from mardini.data.sharding import atomic_tar

    meta = b'{"fps": 8.0, "frames": 24}'  # fits the debug stage's 9 frames at 8 fps: setup lets it through
    with atomic_tar(tmp_path / "renamed-000000.tar") as sink:
        for i in range(10):
            sink.write({"__key__": f"clip{i}", "frames.npy": b"not read", "json": meta})
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/debug.yaml"),
            "--trainer.max_steps=2", f"--data.init_args.train_shards={tmp_path}", "--data.init_args.val_shards=null",
            f"--data.init_args.num_workers={workers}"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr.strip().splitlines()
    assert err[-2].startswith("train.py: error: 1000 bad samples in a row (counts {'bad sample': 1000}; "), err[-2]
    assert err[-2].endswith("check data.latents and data.frames, or rebuild / re-cache the shards"), err[-2]
    worker = ", DataLoader worker process 0" if workers else ""
    assert err[-1].startswith("  (raised at ") and "mardini/data/skip_log.py:" in err[-1], err[-1]
    assert f" in add{worker}; MARDINI_TRACEBACK=1" in err[-1], err[-1]
    assert "Traceback" not in done.stderr


def test_a_ckpt_path_that_is_a_directory_names_the_checkpoints_inside_it(monkeypatch, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.ckpt").touch()
    err = _raised(monkeypatch, tmp_path, *TINY, f"--ckpt_path={tmp_path / 'run'}")
    assert str(err).startswith("--ckpt_path: checkpoint ") and "is a directory" in str(err)
    assert str(err).endswith(f"e.g. {tmp_path / 'run' / 'last.ckpt'} (it holds last.ckpt)")


@pytest.mark.parametrize("arg, expected", [
    ("--data.init_args.batch_size=abc", "Parser key \"batch_size\": Expected a <class 'int'>. Got value: abc"),
    ("--trainer.max_stepz=3", "unrecognized arguments: --trainer.max_stepz=3"),
], ids=["wrong-type", "unknown-option"])
def test_a_parse_error_is_one_message_without_the_usage_of_every_option(monkeypatch, tmp_path, capsys, arg, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *TINY, arg])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err[:5]  # jsonargparse's own: the usage of every option, 100+ lines
    assert " fit: error: " in err[0] and err[0].endswith(expected), err[0]  # the program is pytest's here
    assert "NoneType" not in err[0] and "Given value" not in err[0]
    assert err[1].startswith("  (") and err[1].endswith(" fit --help lists the options)"), err[1]
    monkeypatch.setenv("MARDINI_TRACEBACK", "1")  # the switch keeps jsonargparse's full report
    with pytest.raises(SystemExit):
        main(["fit", *TINY, arg])
    assert "usage:" in capsys.readouterr().err


def test_a_spawning_strategy_shares_tensors_through_files(monkeypatch, tmp_path):
    """ddp_spawn pickles the module to its workers; with PyTorch's default (file descriptors) that fails where they
    cannot be resized, as in this project's CI containers."""
    import torch.multiprocessing

    before = torch.multiprocessing.get_sharing_strategy()
    monkeypatch.setattr(torch.multiprocessing, "_sharing_strategy", "file_descriptor")
    try:
        _raised(monkeypatch, tmp_path, *TINY, KEEP_RATIO, "--trainer.strategy=ddp")  # fails after the CLI's checks
        assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"
        _raised(monkeypatch, tmp_path, *TINY, KEEP_RATIO, "--trainer.strategy=ddp_spawn")
        assert torch.multiprocessing.get_sharing_strategy() == "file_system"
    finally:
        torch.multiprocessing.set_sharing_strategy(before)


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_test_and_predict_are_refused_with_what_to_use_instead(tmp_path, subcommand):
    """No stage module has a test or predict step (nor the datamodule a test split): Lightning crashed with a
    MisconfigurationException after building everything."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "train.py"), subcommand, "--config", str(ROOT / "configs/debug.yaml")]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr.strip().splitlines()
    assert len(err) == 2, err[:5]
    assert err[0].startswith(f"train.py: error: argument subcommand: invalid choice: '{subcommand}'"), err[0]
    assert "no test split" in err[0] and "`validate`" in err[0] and "evaluate.py" in err[0], err[0]
    assert "Traceback" not in done.stderr


def test_a_trainer_setting_lightning_refuses_is_one_train_py_error(tmp_path):
    """Lightning's ``MisconfigurationException`` (a negative ``max_steps``; ``--trainer.accelerator gpu`` without a
    GPU) is a setup mistake like the library's: one message, exit status 2. Before, a traceback and exit status 1."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/debug.yaml"),
            "--trainer.max_steps=-3"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    message = "train.py: error: `max_steps` must be a non-negative integer or -1"
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]


def test_an_option_a_subcommand_does_not_accept_points_to_that_subcommand_s_help(monkeypatch, tmp_path, capsys):
    """An unknown key under ``fit:`` in a config given before the subcommand is refused by the top-level parser on
    behalf of ``fit``: the pointer is to ``fit --help``, whose options are the ones meant."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MARDINI_TRACEBACK", raising=False)
    (tmp_path / "top.yaml").write_text("fit:\n  bogus_key: 1\n")
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(tmp_path / "top.yaml"), "fit", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[0].endswith(" fit: error: Subcommand 'fit' does not accept option 'bogus_key'")
    assert err[1].endswith(" fit --help lists the options)"), err[1]


def test_meaningful_lines_drops_repeats_and_keeps_a_message_of_noise_alone():
    """Nested Unions repeat their sub-errors (each said once); a message of noise alone is kept whole, not emptied."""
    from mardini.cli_parser import meaningful_lines

    repeated = "Errors:\n  - bad size: 3\n  - bad size: 3\n  - Expected a <class 'NoneType'>"
    assert meaningful_lines(repeated) == "bad size: 3"
    noise = "Does not validate against any of the Union subtypes\nSubtypes: [int, NoneType]"
    assert meaningful_lines(noise) == noise

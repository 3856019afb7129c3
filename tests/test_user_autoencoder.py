"""A model trained with one's own FrameAutoencoder (outside mardini.autoencoders): refused by default when a
checkpoint names it, sampled and evaluated once the user allows its class path."""

from __future__ import annotations

import json

import pytest
import torch

from mardini.data.testing import tiny_synthetic
from mardini.evaluation import cli as evaluate_cli
from mardini.pipeline import MarDiniPipeline
from mardini.pipeline.cli import main as sample_main
from pipeline_helpers import make_checkpoint, one_thread  # noqa: F401 (fixture)
from user_extensions import AvgPoolAutoencoder

pytestmark = pytest.mark.usefixtures("one_thread")

T, S = 5, 16  # window and frame side of the test checkpoint
CLASS_PATH = f"{AvgPoolAutoencoder.__module__}.AvgPoolAutoencoder"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("user_ae")
    return make_checkpoint(root / "joint.ckpt", "joint", frames=T, size=S,
                           model_args={"autoencoder": AvgPoolAutoencoder()})


def test_refused_by_default_with_the_option_that_allows_it(ckpt):
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["mardini"]
    assert meta["autoencoder_spec"]["class_path"] == CLASS_PATH  # what train.py records for one's own autoencoder
    with pytest.raises(ValueError, match=rf"refusing to import it.*--allow-autoencoder {CLASS_PATH} .*"
                                         rf"allow_autoencoders=\['{CLASS_PATH}'\]"):
        MarDiniPipeline.from_checkpoint(ckpt)
    with pytest.raises(ValueError, match="refusing to import it"):  # allowing another class allows not this one
        MarDiniPipeline.from_checkpoint(ckpt, allow_autoencoders=["user_extensions.Other"])


def test_allowed_it_samples_through_the_python_api(ckpt):
    pipe = MarDiniPipeline.from_checkpoint(ckpt, allow_autoencoders=[CLASS_PATH])
    assert type(pipe.autoencoder) is AvgPoolAutoencoder and pipe.window == T
    video = torch.rand(1, T, 3, S, S, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, T, 3, H, W)
    out = pipe.interpolate(video[:, 0], video[:, -1], steps=1, progress=False)  # (1, T, 3, H, W)
    assert out.shape == (1, T, 3, S, S) and torch.isfinite(out).all()
    assert type(MarDiniPipeline.from_checkpoint(ckpt, allow_autoencoders=CLASS_PATH).autoencoder) is AvgPoolAutoencoder


def test_an_allowed_path_that_is_no_autoencoder_or_cannot_be_imported_is_refused():
    from mardini.autoencoders.base import autoencoder_class

    with pytest.raises(ValueError, match="'torch.nn.Linear' is <class 'torch.nn.modules.linear.Linear'>, not a FrameAutoencoder subclass"):
        autoencoder_class("torch.nn.Linear", allow=["torch.nn.Linear"])
    with pytest.raises(ValueError, match="the allowed autoencoder class 'no_such_pkg.AE' does not import.*PYTHONPATH"):
        autoencoder_class("no_such_pkg.AE", allow=["no_such_pkg.AE"])


def test_sample_py_refuses_it_by_default_and_samples_it_with_allow_autoencoder(ckpt, tmp_path):
    tiny_synthetic(tmp_path / "data", train=1, val=1, frames=T, size=S)
    argv = ["interpolate", "--ckpt", str(ckpt), "--shards", str(tmp_path / "data" / "val"), "--steps", "1",
            "--no-progress", "--resolution", str(S), "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=f"--allow-autoencoder {CLASS_PATH} "):
        sample_main(argv)
    record = sample_main([*argv, "--allow-autoencoder", CLASS_PATH])
    assert record["frames"] == T and (tmp_path / "out" / "interpolate_000.mp4").is_file()


def test_evaluate_py_refuses_it_by_default_and_scores_it_with_allow_autoencoder(ckpt, tmp_path, capsys):
    shards = tiny_synthetic(tmp_path / "data", train=1, val=2, frames=T, size=S) / "val"
    argv = ["--data", str(shards), "--tasks", "interpolation", "--frames", str(T), "--resolution", str(S),
            "--num-clips", "2", "--metrics", "midf", "--checkpoint", str(ckpt), "--steps", "1", "--cache-dir", "",
            "--out", str(tmp_path / "report")]
    assert evaluate_cli.main(argv) == 2  # a message, not a traceback
    assert f"--allow-autoencoder {CLASS_PATH} " in capsys.readouterr().err
    assert evaluate_cli.main([*argv, "--allow-autoencoder", CLASS_PATH]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "midf_psnr" in report["tasks"]["interpolation"]["results"]["mardini"]


@pytest.mark.parametrize("tool", ["found_by_gap", "plan_usage"])
def test_the_evaluation_tools_take_the_opt_in_too(ckpt, tool, monkeypatch):
    """The refusal names --allow-autoencoder for these tools as well: they pass it to the pipeline (the synthetic set
    they read is not built here, so the run stops right after the checkpoint is loaded)."""
    import importlib

    module = importlib.import_module(f"mardini.evaluation.{tool}")
    loaded = []

    original = MarDiniPipeline.from_checkpoint

    def stop_after_loading(path, **kw):
        loaded.append(original(path, **kw))
        raise KeyboardInterrupt  # the checkpoint loaded: enough

    with pytest.raises(ValueError, match=f"--allow-autoencoder {CLASS_PATH} .*{tool}"):
        module.main(["--checkpoint", str(ckpt)])
    monkeypatch.setattr(MarDiniPipeline, "from_checkpoint", staticmethod(stop_after_loading))
    with pytest.raises(KeyboardInterrupt):
        module.main(["--checkpoint", str(ckpt), "--allow-autoencoder", CLASS_PATH])
    assert isinstance(loaded[0].autoencoder, AvgPoolAutoencoder)


def test_make_reproduce_loads_a_chain_with_it_under_allow_autoencoder(ckpt, tmp_path, monkeypatch):
    """``python -m mardini.reproduce --checkpoints DIR --allow-autoencoder PATH``: Table 2's four model readings,
    Fig. 6a's sweep and the parameter line all load the chain's own autoencoder (scoring itself is not run here)."""
    from mardini.reproduce import main as reproduce_main
    from mardini.reproduce import quality

    chain = {"02_dm_warmup_9f": "generation", "03_mar_warmup": "planning", "05_joint_task": "joint"}
    ckpts = {stage: make_checkpoint(tmp_path / f"{stage}.ckpt", kind, frames=T, size=S,
                                    model_args={"autoencoder": AvgPoolAutoencoder()}) for stage, kind in chain.items()}
    scored = []
    monkeypatch.setattr(quality, "score", lambda task, args, samplers: scored.append(samplers))
    refused = quality.eval_args(2, 1, ["midf"], tmp_path / "stats")
    with pytest.raises(ValueError, match=f"--allow-autoencoder {CLASS_PATH} "):
        quality.table2(ckpts, refused)
    args = quality.eval_args(2, 1, ["midf"], tmp_path / "stats", [CLASS_PATH])
    quality.table2(ckpts, args)
    quality.fig6a(ckpts["05_joint_task"], args, [1])
    models = [s for samplers in scored for name, s in samplers.items() if name not in ("linear_blend", "nearest_frame")]
    assert len(models) == 4 + 2  # mar_only, dm_only, dm_only_null_plan, mar_dm; steps_1 on both tasks
    for sampler in models:
        assert isinstance(getattr(sampler, "pipeline", sampler).autoencoder, AvgPoolAutoencoder)
    assert reproduce_main.parse_args(["--allow-autoencoder", CLASS_PATH]).allow_autoencoder == [CLASS_PATH]
    assert "generator" in reproduce_main._params(ckpts, [CLASS_PATH])

"""The CUDA path: attention kernels, sampling and a bf16-mixed Lightning fit on a GPU (skipped without one).

CI has no GPU, so these skip there; run them on a GPU machine with ``python -m pytest -m cuda``.
Each compares the GPU result with the CPU reference, so a device-specific break (a kernel choice, a dtype, a
tensor left on the wrong device, seeds that depend on the device) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mardini.masking import interpolation_mask
from mardini.models import attention as A
from pipeline_helpers import make_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cuda")


@pytest.mark.parametrize("scope", ["token", "frame"])
@pytest.mark.parametrize("rows", [
    [[True, False, False, True], [False, True, False, False], [False] * 4, [True] * 4],  # mixed rows
    [[False, True, False, False, True, False, True]] * 2,  # one shared mask: the sliced path
], ids=["mixed_rows", "shared_mask"])
def test_identity_attention_bf16_on_gpu_matches_the_fp64_oracle(device, scope, rows):
    n = 16  # tokens per frame
    ref = torch.tensor(rows).repeat_interleave(n, dim=1)  # (B, L)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(rows), 4, ref.shape[1], 64, generator=g, dtype=torch.float64) for _ in range(3))
    oracle = A.dense_identity_attention_oracle(q, k, v, ref, scope, tokens_per_frame=n)  # (B, H, L, d)
    qg, kg, vg = (x.to(device, torch.bfloat16).requires_grad_(True) for x in (q, k, v))
    out = A.identity_attention(qg, kg, vg, ref.to(device), scope, tokens_per_frame=n)
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double().cpu(), oracle, rtol=0, atol=3e-2)
    out.float().sum().backward()  # the backward kernels run and give finite gradients
    assert all(torch.isfinite(x.grad).all() for x in (qg, kg, vg))


def test_plain_attention_picks_a_working_backend_on_gpu(device):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 300, 64, generator=g) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v  # (B, H, L, d)
    backend = A.select_backend(q.to(device, torch.bfloat16))
    assert backend == ("flash" if A.flash_attn_available() else "sdpa")
    out = A.attention(*(x.to(device, torch.bfloat16) for x in (q, k, v)))
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0, atol=3e-2)


@pytest.fixture(scope="module")
def joint_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cuda") / "joint.ckpt", "joint", frames=5, size=16)


def test_gpu_samples_equal_cpu_samples_for_the_same_seed(joint_ckpt, device):
    from mardini.pipeline import MarDiniPipeline

    video = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1  # (B, T, 3, H, W)
    mask = interpolation_mask(5)[None].expand(2, -1)  # (B, T)
    kw = dict(steps=4, guidance_scale=2.0, seed=3, eta=1.0, progress=False)
    cpu = MarDiniPipeline.from_checkpoint(joint_ckpt).generate(video, mask, **kw)
    gpu_pipe = MarDiniPipeline.from_checkpoint(joint_ckpt, device="cuda")
    gpu = gpu_pipe.generate(video.to(device), mask.to(device), **kw)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=2e-3)  # noise is drawn on the CPU: device-free seeds
    assert torch.equal(gpu[:, 0].cpu(), video[:, 0]) and torch.equal(gpu[:, -1].cpu(), video[:, -1])  # given frames
    bf16 = MarDiniPipeline.from_checkpoint(joint_ckpt, device="cuda", dtype="bfloat16").generate(video, mask, **kw)
    assert torch.isfinite(bf16).all() and (bf16 - cpu).abs().mean() < 0.05


def test_bf16_mixed_fit_on_gpu_writes_a_checkpoint_that_samples_on_cpu(tmp_path, monkeypatch):
    from mardini.cli import main
    from mardini.data.testing import tiny_synthetic
    from mardini.pipeline import MarDiniPipeline

    tiny_synthetic(tmp_path / "data" / "shards" / "synthetic", train=24, val=8, frames=18, size=32)
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(REPO / "configs" / "debug.yaml"), "--trainer.accelerator=gpu",
                "--trainer.precision=bf16-mixed", "--trainer.max_steps=4", "--trainer.enable_progress_bar=false",
                "--data.init_args.epoch_size=32"])
    assert cli.trainer.global_step == 4
    assert cli.trainer.strategy.root_device.type == "cuda"  # (Lightning moves the module back to the CPU at the end)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    pipe = MarDiniPipeline.from_checkpoint(tmp_path / "outputs" / "debug" / "joint" / "checkpoints" / "last.ckpt")
    video = torch.rand(1, 9, 3, 32, 32) * 2 - 1  # (B, T, 3, H, W)
    out = pipe.generate(video, interpolation_mask(9)[None], steps=2, progress=False)
    assert out.device.type == "cpu" and torch.isfinite(out).all()


def test_evaluation_on_gpu_scores_like_on_cpu(joint_ckpt, tmp_path):
    from mardini.data.testing import tiny_synthetic
    from mardini.evaluation import cli

    shards = tiny_synthetic(tmp_path / "synth", train=2, val=4, frames=12, size=16) / "val"
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert cli.main(["--data", str(shards), "--tasks", "interpolation", "--frames", "5", "--resolution", "16",
                         "--num-clips", "4", "--metrics", "midf", "traj", "--checkpoint", str(joint_ckpt),
                         "--steps", "3", "--device", device, "--cache-dir", "", "--out", str(out)]) == 0
        results[device] = json.loads((out / "report.json").read_text())["tasks"]["interpolation"]["results"]
    for method in ("linear_blend", "nearest_frame", "mardini"):
        for key, value in results["cpu"][method].items():
            assert results["cuda"][method][key] == pytest.approx(value, rel=1e-3, abs=1e-3), (method, key)


# ------------------------------------------------------------------------------------------------
# Code added since the last GPU run (2026-11-27): run these first on a GPU (README, Tests)
# ------------------------------------------------------------------------------------------------
def validate_scores(tmp_path: Path, accelerator: str) -> dict[str, float]:
    """``val/loss`` (each clip's draws from a CPU generator seeded by its key) and the ``InterpolationEval`` scores
    (the pipeline over the live EMA networks, each clip's noise seeded by its key) of one validation of a fresh tiny
    joint module on ``accelerator``."""
    import lightning as L

    from mardini.data.datamodule import VideoDataModule
    from mardini.data.testing import tiny_synthetic
    from mardini.evaluation import InterpolationEval
    from mardini.lit import MarDiniModule

    shards = tiny_synthetic(tmp_path / "synth", train=4, val=4, frames=12, size=16)
    L.seed_everything(0)
    module = MarDiniModule(size="tiny", planner_resolution=8)
    cb = InterpolationEval(sampler="pipeline", num_clips=4, frames=9, metrics=["midf"], steps=2, cache_dir=None)
    dm = VideoDataModule(train_shards=str(shards / "train"), val_shards=str(shards / "val"), frames=9, fps=None,
                         resolution=16, batch_size=2, num_workers=0, shuffle_buffer=0, epoch_size=4, val_clips=4)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path / accelerator, callbacks=[cb])
    logged = trainer.validate(module, datamodule=dm)[0]
    return {**{k: float(v) for k, v in logged.items()}, **cb.last_results}


def test_validation_on_gpu_draws_and_scores_like_on_cpu(tmp_path):
    cpu, gpu = validate_scores(tmp_path / "cpu", "cpu"), validate_scores(tmp_path / "gpu", "gpu")
    assert set(gpu) == set(cpu) and "val/loss" in cpu and cpu["clips"] == 4
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


def fit_with(tmp_path: Path, accelerator: str, options: list[str]):
    """A few ``bf16-mixed`` steps of ``configs/debug.yaml`` with ``options``; returns the CLI."""
    from mardini.cli import main
    from mardini.data.testing import tiny_synthetic

    tiny_synthetic(tmp_path / "data" / "shards" / "synthetic", train=24, val=8, frames=18, size=32)
    return main(["fit", "--config", str(REPO / "configs" / "debug.yaml"), f"--trainer.accelerator={accelerator}",
                 "--trainer.precision=bf16-mixed", "--trainer.max_steps=4", "--trainer.enable_progress_bar=false",
                 "--data.init_args.epoch_size=32", *options])


OPTIONS_SINCE_THE_LAST_GPU_RUN = {  # training options that have only run on a CPU
    "element_reduction_accumulated": ["--model.init_args.loss_reduction=element",
                                      "--trainer.accumulate_grad_batches=2"],
    "motion_anchor_self_cond": ["--model.init_args.loss_weighting=motion", "--model.init_args.anchor=nearest",
                                '--model.init_args.generator={"self_cond": true}'],
    "min_snr_plan_recon": ["--model.init_args.loss_weighting=min_snr", "--model.init_args.plan_recon_weight=0.5"],
}


@pytest.mark.parametrize("options", OPTIONS_SINCE_THE_LAST_GPU_RUN.values(), ids=OPTIONS_SINCE_THE_LAST_GPU_RUN)
def test_bf16_mixed_fit_on_gpu_with_the_options_added_since_the_last_gpu_run(tmp_path, monkeypatch, options):
    monkeypatch.chdir(tmp_path)
    cli = fit_with(tmp_path, "gpu", options)
    assert cli.trainer.global_step == 4 and cli.trainer.strategy.root_device.type == "cuda"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_attention_over_more_rows_than_a_cuda_grid_takes_equals_the_cpu_result(device):
    """``attention`` cuts a batch of more than 65535 rows (the /T temporal layers' B x positions, x2 with guidance)
    into calls the CUDA kernels launch; the result is the CPU's."""
    rows = A.CUDA_MAX_BATCH + 100
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(rows, 2, 5, 16, generator=g) for _ in range(3))  # (B, H, T, d)
    expected = A.attention(q, k, v)  # (B, H, T, d), one CPU call
    out = A.attention(*(x.to(device, torch.bfloat16) for x in (q, k, v)))
    assert out.shape == expected.shape
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0, atol=3e-2)


def test_a_gpu_time_out_of_0_1_fails_at_the_next_sync_and_one_inside_passes():
    """``check_t`` checks a GPU tensor's range with ``torch._assert_async`` (no host sync): a time inside [0, 1]
    passes, one outside stops the process at the next sync (a device-side assert, which ends the CUDA context: run
    in a child process). Prints what the child printed (does the assert carry the message?)."""
    import subprocess
    import sys

    code = ("import torch; from mardini.diffusion.checks import check_t; "
            "check_t(torch.tensor([0.0, 0.5, 1.0], device='cuda')); torch.cuda.synchronize(); print('inside ok'); "
            "check_t(torch.tensor([1.5], device='cuda')); torch.cuda.synchronize(); print('outside passed')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    print(run.stdout, run.stderr[-2000:])
    assert "inside ok" in run.stdout and "outside passed" not in run.stdout and run.returncode != 0

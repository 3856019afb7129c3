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

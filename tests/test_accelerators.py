"""What labs on accelerators other than NVIDIA's meet, faked on this CPU machine: Intel GPUs (``xpu``), AMD GPUs
under ROCm (which torch calls ``cuda``), pre-Ampere NVIDIA GPUs. Apple's MPS: ``tests/test_platforms.py``."""

from __future__ import annotations

import types

import pytest
import torch


def _fake_xpu(monkeypatch, count: int = 1, fp64: bool = True, name: str = "Intel(R) Data Center GPU Max 1100"):
    """torch.xpu as it answers on a machine with ``count`` Intel GPUs of ``name``, float64 or not."""
    monkeypatch.setattr(torch.xpu, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: count)
    monkeypatch.setattr(torch.xpu, "get_device_properties", lambda device=None: types.SimpleNamespace(has_fp64=fp64))
    monkeypatch.setattr(torch.xpu, "get_device_name", lambda device=None: name)


def test_an_xpu_device_is_checked_as_a_cuda_one_is(monkeypatch):
    """``--device xpu`` (sample.py, evaluate.py, the latent cache) was returned unchecked: without an Intel GPU it
    failed later in ``.to()`` with torch's "Torch not compiled with XPU enabled", ``xpu:3`` past the visible GPUs and
    ``meta`` were taken too, and an Arc GPU (no float64) failed at the diffusion schedule's first float64 tensor. Each
    is refused now, naming the fix; an Intel GPU with float64 is taken."""
    from mardini.devices import resolve_device

    _fake_xpu(monkeypatch, count=0)
    with pytest.raises(ValueError, match=r"^device xpu asked for, but torch finds no Intel GPU \(XPU\) here .*"
                                         r"use --device cpu or auto"):
        resolve_device("xpu")
    with pytest.raises(ValueError, match=r"^device meta: the code runs on cpu, cuda .* use --device cpu or auto"):
        resolve_device("meta")
    _fake_xpu(monkeypatch, count=1, fp64=False, name="Intel(R) Arc(TM) A770 Graphics")
    with pytest.raises(ValueError, match=r"^device xpu \(Intel\(R\) Arc\(TM\) A770 Graphics\) is not supported: it "
                                         r"has no float64, .*; use --device cpu"):
        resolve_device("xpu")
    _fake_xpu(monkeypatch, count=1, fp64=True)
    with pytest.raises(ValueError, match=r"^device xpu:3: only 1 Intel GPU \(XPU\)\(s\) are visible; use xpu:0 \.\. "
                                         r"xpu:0"):
        resolve_device("xpu:3")
    assert resolve_device("xpu") == torch.device("xpu")
    assert resolve_device("xpu:0") == torch.device("xpu:0")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as before


def test_a_rocm_build_without_a_gpu_is_named_as_rocm(monkeypatch):
    """Torch calls AMD GPUs ``cuda``; on a ROCm build without a GPU the message said "CUDA build: None"."""
    from mardini.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    with pytest.raises(ValueError, match=r"finds no CUDA GPU here \(torch .*, ROCm build: 6\.2\.41133\); use --device"):
        resolve_device("cuda")


def test_sampling_timings_wait_for_an_intel_gpu_and_reports_name_it(monkeypatch):
    """``MarDiniPipeline.last_timings`` waited for the queued work on CUDA only: on an Intel GPU each stage's time
    was its launches', the GPU's work landing in whichever stage read a tensor back. And ``evaluate.py``'s report
    recorded the CPU's machine line as ``device_name`` of an XPU run. Both treat the XPU as the CUDA GPU now."""
    from mardini.evaluation.run_setup import device_name
    from mardini.pipeline import MarDiniPipeline

    _fake_xpu(monkeypatch, name="Intel(R) Data Center GPU Max 1550")
    waited = []
    monkeypatch.setattr(torch.xpu, "synchronize", lambda device=None: waited.append(device))
    MarDiniPipeline._now(types.SimpleNamespace(device=torch.device("xpu:0")))
    assert waited == [torch.device("xpu:0")]
    MarDiniPipeline._now(types.SimpleNamespace(device=torch.device("cpu")))
    assert len(waited) == 1  # nothing to wait for on the CPU
    assert device_name(torch.device("xpu:0")) == "Intel(R) Data Center GPU Max 1550"
    assert "threads" in device_name(torch.device("cpu"))  # the machine line, as before


def _fake_nvidia_gpu(monkeypatch, major: int, minor: int, name: str) -> None:
    """torch.cuda.get_device_properties as it answers for an NVIDIA GPU of compute capability ``major.minor``."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(major=major, minor=minor, name=name))


@pytest.mark.parametrize("major, minor, name, hip, warned", [
    (7, 0, "Tesla V100-SXM2-16GB", None, True),
    (7, 5, "Tesla T4", None, True),
    (8, 0, "NVIDIA A100-SXM4-80GB", None, False),
    (9, 0, "NVIDIA H100 80GB HBM3", None, False),
    (9, 4, "AMD Instinct MI300X", "6.2.41133", False),  # ROCm: torch reports gfx942 as 9.4; it has bf16
], ids=["V100", "T4", "A100", "H100", "MI300X"])
def test_bf16_on_an_nvidia_gpu_older_than_ampere_warns_and_names_the_fix(monkeypatch, major, minor, name, hip,
                                                                            warned):
    """``sample.py --bf16`` and a ``bf16-mixed`` fit warned where a CPU emulates bf16 and said nothing on a V100 or
    T4, which emulate it too (slower than fp32, and without SDPA's fused bf16 kernels). Both warn there now, naming
    the fix; Ampere and newer, and AMD GPUs, get no warning."""
    import warnings

    from mardini.lit import GenerationModule
    from mardini.pipeline.cli import warn_if_bf16_is_emulated

    _fake_nvidia_gpu(monkeypatch, major, minor, name)
    monkeypatch.setattr(torch.version, "hip", hip)
    module = GenerationModule(size="tiny", frames=4, generator={"depth": 1}, planner_resolution=8)
    module._trainer = types.SimpleNamespace(precision="bf16-mixed", strategy=types.SimpleNamespace(
        root_device=torch.device("cuda:0")), accumulate_grad_batches=1, datamodule=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_bf16_is_emulated(True, torch.device("cuda:0"))
        warn_if_bf16_is_emulated(False, torch.device("cuda:0"))  # no --bf16: nothing to say
        module.setup("fit")
    said = [str(w.message) for w in caught if "native bf16" in str(w.message)]
    if not warned:
        assert said == []
        return
    assert len(said) == 2
    assert said[0].startswith(f"--bf16 on cuda:0 ({name}, compute capability {major}.{minor}): this GPU has no "
                              "native bf16") and said[0].endswith("leave --bf16 out")
    assert said[1].startswith("bf16-mixed on cuda:0") and "--trainer.precision 32-true" in said[1]

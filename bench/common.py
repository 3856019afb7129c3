"""Helpers shared by the benchmarks: matmul peaks, timers, FLOP counting, result files.

Absolute times on a shared machine are noisy, so every bench measures the quantities it compares in the
same run, interleaved, and reports ratios (medians over rounds).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mardini import cpu_kernels
from mardini.run_info import command_line

RESULTS = Path("bench/results")


def command(module: str, argv: list[str] | None) -> str:
    """The shell command that reproduces a bench run (quoted)."""
    return command_line([".venv/bin/python", "-m", module], argv)


def machine() -> dict:
    """What the figures were measured on."""
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_avg_1min": os.getloadavg()[0], "cpu_bf16_matmul": cpu_kernels.describe()}


def write_result(name: str, result: dict) -> Path:
    """``bench/results/<name>.json``."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float))
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device = torch.device("cpu")) -> float:
    """Wall seconds of one ``fn()``."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 3) -> float:
    """Best achieved FLOP/s of an ``n x n`` square matmul (the hardware's practical peak for ``dtype``)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * n**3 / best


# --------------------------------------------------------------------------------------------------
# FLOP counting: torch's counter + the CPU SDPA kernels it does not know
# --------------------------------------------------------------------------------------------------


def _sdpa_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    b, h, lq, d = query  # shapes: the counter passes tensor shapes, not tensors
    return 4 * b * h * lq * key[-2] * d  # QK^T and PV


def _sdpa_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_fwd(query, key, value)  # dQ, dK, dV, dP: twice the forward (no recomputation counted)


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU flash-attention kernels (model FLOPs, not recomputation)."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_bwd
    return FlopCounterMode(display=False, custom_mapping=mapping)


def op_breakdown(prof) -> dict[str, float]:
    """Self CPU seconds of a torch.profiler run grouped into matmul / attention / copy / elementwise / other."""
    groups = {"matmul": ("mm", "addmm", "bmm", "baddbmm", "matmul", "_mkldnn", "mkldnn_"),
              "attention": ("scaled_dot_product", "flash_attention"),
              "copy_layout": ("copy_", "_to_copy", "cat", "stack", "clone", "contiguous", "index", "gather",
                              "scatter", "masked_fill", "where", "repeat", "fill_", "zero_")}
    out = {k: 0.0 for k in (*groups, "elementwise_other")}
    for ev in prof.key_averages():
        name = ev.key.replace("aten::", "")
        sec = ev.self_cpu_time_total / 1e6
        for g, keys in groups.items():
            if any(name == k or name.startswith(k) or k in name for k in keys):
                out[g] += sec
                break
        else:
            out["elementwise_other"] += sec
    return out

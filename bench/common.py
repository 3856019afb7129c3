"""Helpers shared by the benchmarks: matmul peaks, timers, FLOP counting, result files.

Absolute times on a shared machine are noisy, so every bench measures the quantities it compares in the
same run and reports ratios (interleaved over rounds, medians, where bench/README.md says so; the others run
them one after another).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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
MMAP_THRESHOLD = 65536  # bytes: glibc serves larger buffers with their own mmap, returned to the OS on free
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


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
    path.write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
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


CUDA_PEAK_N, CUDA_PEAK_WARMUP, CUDA_PEAK_ITERS = 8192, 5, 20  # one 2048^2 bf16 mm lasts ~44 us on an H100


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int | None = None, repeats: int = 3) -> float:
    """Best achieved FLOP/s of an ``n x n`` square matmul (the hardware's practical peak for ``dtype``).

    CPU: ``n`` 2048, the best of ``repeats`` single calls after one warm-up. CUDA: ``n`` ``CUDA_PEAK_N``,
    ``CUDA_PEAK_WARMUP`` calls, then the best of ``repeats`` blocks of ``CUDA_PEAK_ITERS`` back-to-back calls
    timed with CUDA events (a single short call measures its launch and the host's timer as much as the GPU)."""
    cuda = device.type == "cuda"
    n = n or (CUDA_PEAK_N if cuda else 2048)
    a = torch.randn(n, n, device=device).to(dtype)  # (n, n)
    b = torch.randn(n, n, device=device).to(dtype)  # (n, n)
    if not cuda:
        torch.mm(a, b)
        best = min(timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
        return 2 * n**3 / best
    with torch.cuda.device(device):  # the events' stream is the current device's
        for _ in range(CUDA_PEAK_WARMUP):
            torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(CUDA_PEAK_ITERS):
                torch.mm(a, b)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / CUDA_PEAK_ITERS)  # ms -> s per call
    return 2 * n**3 / best


# --------------------------------------------------------------------------------------------------
# Loader benches: which shards they stream
# --------------------------------------------------------------------------------------------------

QUICK_CLIPS, QUICK_PER_SHARD = 32, 8  # --quick's stand-in for the demo set: 4 training shards, seconds to write


def loader_shards(path: Path) -> Path:
    """``--shards``: the demo's synthetic set at its default path, written (or completed) when missing; any other
    folder is read as it is (a ValueError naming ``--shards`` when it has no ``train/`` folder)."""
    from mardini.demo import SHARDS, build_synthetic

    if path.resolve() == SHARDS.resolve():
        build_synthetic(SHARDS, progress=False)
    elif not (path / "train").is_dir():
        raise ValueError(f"--shards {path}: no train/ folder of shards there; give a folder holding train/*.tar (as "
                         f"data/make_synthetic.py --out DIR writes) or leave --shards out for the demo's set")
    return path


def quick_shards(folder: Path) -> Path:
    """A ``QUICK_CLIPS``-clip synthetic training split at the demo's render settings under ``folder``
    (``--quick``: the demo's full set takes minutes to write)."""
    from mardini.data.synthetic_shards import write_synthetic_split

    write_synthetic_split(folder, "train", QUICK_CLIPS, QUICK_PER_SHARD, progress=False)
    return folder


def train_stream(shards: Path, batch_size: int, workers: int):
    """``VideoDataModule`` at the demo's loader settings over ``shards/train`` (set up; no validation split needed);
    the loader's error, prefixed with ``--shards``, when those shards cannot feed it."""
    from mardini.demo import demo_datamodule

    try:
        dm = demo_datamodule(shards, batch_size=batch_size, num_workers=workers)
        dm.val_shards = None  # the benches stream the training split only
        dm.setup("fit")
    except (ValueError, FileNotFoundError) as err:  # the loader's own message, about data.train_shards
        raise type(err)(f"--shards {shards}: {err}") from None
    return dm


# --------------------------------------------------------------------------------------------------
# CPU peak memory: the resident set's high-water mark over one call
# --------------------------------------------------------------------------------------------------


def proc_status(field: str) -> int:
    """``field`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes
    raise RuntimeError(f"{field} not in /proc/self/status")


def mmap_large_buffers() -> None:
    """From now on glibc serves every buffer above ``MMAP_THRESHOLD`` with its own mmap (unmapped on free), and
    the free pages it holds now go back to the OS, so :func:`rss_peak_bytes` counts every large temporary instead
    of reusing earlier calls' freed memory unseen. Called after the timed calls: it slows allocation down."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        raise RuntimeError("glibc's mallopt refused M_MMAP_THRESHOLD: CPU peak memory needs glibc")
    libc.malloc_trim(0)


def rss_peak_bytes(fn) -> int:
    """Bytes ``fn()`` adds to the resident set at its peak: ``VmHWM`` (reset to the current resident set by
    writing 5 to ``/proc/self/clear_refs``) minus ``VmRSS`` before the call (Linux)."""
    gc.collect()
    base = proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    fn()
    return max(proc_status("VmHWM") - base, 0)


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

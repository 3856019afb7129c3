"""Peak memory and time of identity attention: mask-free vs dense L x L mask vs plain SDPA.

    .venv/bin/python -m bench.attention_memory [--lengths 1024 2048 4096 8192 16384] [--dtypes fp32 bf16]

Setting: one clip of ``--frames`` frames (L / frames tokens each), first and last frames given
(interpolation), ``--heads`` x ``--head-dim``; forward pass only.

Methods:
    sdpa            plain SDPA without any mask (the cost floor: no identity rule at all)
    identity_token  ``identity_attention`` scope "token" (generator temporal/ST layers)
    identity_frame  ``identity_attention`` scope "frame" (planner default)
    dense_token     the test oracle: an explicit (B, 1, L, L) bool mask + SDPA

Peak memory is what the call adds on top of its inputs:
    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    * CPU: the process's resident-set high-water mark (``VmHWM``), reset before each call by writing 5
      to ``/proc/self/clear_refs``, minus the resident set before the call. ``main`` runs the bench in a
      child process with ``MALLOC_MMAP_THRESHOLD_=65536`` so every tensor buffer above 64 KiB is its own mmap
      that glibc returns to the OS on free; freed memory is then never silently reused and the
      high-water mark counts every large temporary. Small allocations (< 64 KiB) are not resolved.

Writes ``bench/results/attention_memory.json`` (``--out``), prints a table with ratios taken in this one run and
returns the result (``main(argv)`` honours ``argv`` from a notebook or test, and returns).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import command, proc_status
from mardini.models.attention import attention, dense_identity_attention_oracle, identity_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"

# --------------------------------------------------------------------------------------------------
# Peak-memory probes
# --------------------------------------------------------------------------------------------------


def peak_bytes(fn, device: torch.device) -> int:
    """Extra bytes the call ``fn()`` needs at its peak, beyond what was resident before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        base = proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        out = fn()
        peak = proc_status("VmHWM") - base
    del out
    gc.collect()
    return max(int(peak), 0)


def seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def make_case(length: int, frames: int, heads: int, head_dim: int, dtype, device, seed: int = 0):
    if length % frames:
        raise ValueError(f"sequence length {length} must be a multiple of --frames {frames}")
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=g).to(device, dtype) for _ in range(3))
    n = length // frames
    frame_ref = torch.zeros(1, frames, dtype=torch.bool)
    frame_ref[:, [0, frames - 1]] = True  # interpolation: first and last given
    ref = frame_ref.repeat_interleave(n, dim=1).to(device)  # (1, L)
    methods = {
        "sdpa": lambda: attention(q, k, v),
        "identity_token": lambda: identity_attention(q, k, v, ref, "token"),
        "identity_frame": lambda: identity_attention(q, k, v, ref, "frame", n),
        "dense_token": lambda: dense_identity_attention_oracle(q, k, v, ref, "token"),
    }
    return methods, (q, k, v, ref)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for dtype_name in args.dtypes:
        for length in args.lengths:
            methods, _ = make_case(length, args.frames, args.heads, args.head_dim, DTYPES[dtype_name], device)
            for name, fn in methods.items():
                with torch.inference_mode():
                    sec = seconds(fn, device, args.repeats)  # includes a warm-up, so one-time setup is
                    mem = peak_bytes(fn, device)  # not counted as peak memory
                row = {"dtype": dtype_name, "tokens": length, "method": name, "peak_mib": mem / 2**20, "seconds": sec}
                rows.append(row)
                line = f"  {dtype_name} L={length:6d} {name:15s} {row['peak_mib']:9.1f} MiB {sec * 1e3:10.1f} ms"
                print(line, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One line per (dtype, L): absolute figures of the identity kernel and ratios against the others."""
    by = {(r["dtype"], r["tokens"], r["method"]): r for r in rows}
    head = (
        f"{'dtype':5s} {'tokens':>6s} | {'identity MiB':>12s} {'dense MiB':>10s} {'sdpa MiB':>9s} | "
        f"{'dense/id mem':>12s} {'id/sdpa mem':>11s} | {'id ms':>8s} {'dense/id t':>10s} {'id/sdpa t':>9s} "
        f"{'id_frame/sdpa t':>15s}"
    )
    lines = [head, "-" * len(head)]
    for dtype, length in sorted({(r["dtype"], r["tokens"]) for r in rows}):
        i, d, s, f = (by[(dtype, length, m)] for m in ("identity_token", "dense_token", "sdpa", "identity_frame"))
        ratio = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731
        lines.append(
            f"{dtype:5s} {length:6d} | {i['peak_mib']:12.1f} {d['peak_mib']:10.1f} {s['peak_mib']:9.1f} | "
            f"{ratio(d['peak_mib'], i['peak_mib']):12.1f} {ratio(i['peak_mib'], s['peak_mib']):11.2f} | "
            f"{i['seconds'] * 1e3:8.1f} {ratio(d['seconds'], i['seconds']):10.2f} "
            f"{ratio(i['seconds'], s['seconds']):9.2f} {ratio(f['seconds'], s['seconds']):15.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="bench/results/attention_memory.json")
    args = p.parse_args(argv)

    if torch.device(args.device).type == "cpu" and os.environ.get(MMAP_ENV) != "65536":
        # run again with a fixed mmap threshold so the RSS high-water mark sees every large buffer: a child
        # process given this call's arguments (not sys.argv, which is a notebook's or test runner's)
        root = str(Path(__file__).resolve().parents[1])  # bench/ importable from any working directory
        env = {**os.environ, MMAP_ENV: "65536",
               "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
        argv = sys.argv[1:] if argv is None else list(argv)
        done = subprocess.run([sys.executable, "-m", "bench.attention_memory", *argv], env=env)
        if done.returncode:
            raise RuntimeError(f"bench.attention_memory failed in its child process (exit code {done.returncode}); "
                               "see its messages above")
        return json.loads(Path(args.out).read_text(encoding="utf-8"))
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"identity attention benchmark on {args.device} ({torch.get_num_threads()} threads)", flush=True)
    rows = run(args)
    report = table(rows)
    print("\n" + report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items()}
    meta.update(torch=torch.__version__, machine=platform.machine(), processor=platform.processor(),
                cpu_threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
                memory_method="cuda max_memory_allocated" if args.device.startswith("cuda")
                else "VmHWM reset via /proc/self/clear_refs, MALLOC_MMAP_THRESHOLD_=65536")
    result = {"command": command("bench.attention_memory", argv), "settings": meta, "rows": rows, "table": report}
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()

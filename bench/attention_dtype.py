"""CPU attention under bf16 autocast: torch's bf16 flash kernel vs the same call in fp32 (and the math backend).

    .venv/bin/python -m bench.attention_dtype [--repeats 4] [--quick]

Each shape is one the networks run (tiny/small planner and generator: spatial, cross, temporal, ST); forward +
backward of ``attention()`` on inputs in the projection layout ``(B, L, H, d)`` viewed as ``(B, H, L, d)``:

* ``bf16``: the kernel under ``torch.autocast("cpu", bfloat16)`` as torch dispatches it (bf16 inside);
* ``fp32``: the same call with autocast off and fp32 inputs, what ``attention()`` does below
  ``CPU_FP32_BELOW_HEAD_DIM`` (mardini/models/attention.py);
* ``math``: the bf16 call forced onto torch's math backend (explicit QK^T, softmax, PV).

Writes ``bench/results/attention_dtype.json``; the ratio bf16 / fp32 > 1 means fp32 is faster. Also the kernels'
GFLOP/s (forward 4 B H L^2 d, backward twice that) against the bf16 2048^2 matmul peak measured in the same run:
the attention ceiling of the training MFU (bench/train_mfu.py). Median of ``--repeats`` runs after one warm-up,
all shapes in one process (ratios, not absolute times, are the figure).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import command, machine, matmul_peak, write_result

# (label, B, H, L, d)
SHAPES = [
    ("tiny generator spatial / cross (d 24)", 144, 4, 64, 24),
    ("tiny generator spatial / cross, dim 192 (d 48)", 144, 4, 64, 48),
    ("tiny generator /T temporal (d 48)", 1024, 4, 9, 48),
    ("tiny planner, 9 frames (d 32)", 16, 4, 576, 32),
    ("small planner, 9 frames (d 64)", 2, 8, 576, 64),
    ("small generator /ST, 9 frames (d 64)", 2, 6, 2304, 64),
    ("small generator /ST, 128-d heads (d 128)", 2, 3, 2304, 128),
]
MODES = ("bf16", "fp32", "math")


def _time(shape: tuple[int, int, int, int], mode: str, repeats: int) -> float:
    b, h, length, d = shape
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(b, length, h, d, generator=g, requires_grad=True) for _ in range(3)]  # (B, L, H, d)

    def run() -> None:
        q, k, v = (x.transpose(1, 2) for x in leaves)  # (B, H, L, d) views, as SelfAttentionProj.qkv returns
        backend = SDPBackend.MATH if mode == "math" else SDPBackend.FLASH_ATTENTION
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"), sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d)
        o.float().sum().backward()

    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="two small shapes, one repeat (smoke test)")
    args = p.parse_args(argv)
    shapes = SHAPES[:1] + SHAPES[2:3] if args.quick else SHAPES
    repeats = 1 if args.quick else args.repeats
    peak = matmul_peak(torch.bfloat16, torch.device("cpu"))
    rows = []
    for label, *shape in shapes:
        b, h, length, d = shape
        gflop = 12 * b * h * length * length * d / 1e9  # forward + backward
        sec = {mode: _time(tuple(shape), mode, repeats) for mode in MODES}
        row = {"shape": label, "bhld": shape, "gflop": gflop, "bf16_over_fp32": sec["bf16"] / sec["fp32"]}
        for mode in MODES:
            row[f"{mode}_ms"] = sec[mode] * 1e3
            row[f"{mode}_gflop_per_s"] = gflop / sec[mode]
        row["best_of_bf16_peak"] = max(row[f"{mode}_gflop_per_s"] for mode in MODES) * 1e9 / peak
        rows.append(row)
        print(f"{label:48s} B,H,L,d={shape}  " + "  ".join(
            f"{mode} {sec[mode] * 1e3:7.1f} ms ({row[f'{mode}_gflop_per_s']:.0f} GFLOP/s)" for mode in MODES)
            + f"  bf16/fp32 {row['bf16_over_fp32']:.2f}x  best {row['best_of_bf16_peak']:.0%} of the bf16 peak",
            flush=True)
    write_result("attention_dtype", {"command": command("bench.attention_dtype", argv), "machine": machine(),
                                     "peak_bf16": peak, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

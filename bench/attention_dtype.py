"""CPU attention under bf16 autocast: torch's bf16 flash kernel vs the same call in fp32, by head dim.

    .venv/bin/python -m bench.attention_dtype [--repeats 4] [--quick]

Each shape is one the networks run (tiny/small planner and generator: spatial, cross, temporal, ST); forward +
backward of ``attention()`` on inputs in the projection layout ``(B, L, H, d)`` viewed as ``(B, H, L, d)``:

* ``bf16``: the kernel under ``torch.autocast("cpu", bfloat16)`` as torch dispatches it (bf16 inside);
* ``fp32``: the same call with autocast off and fp32 inputs, what ``attention()`` does below
  ``CPU_FP32_BELOW_HEAD_DIM`` (mardini/models/attention.py).

Writes ``bench/results/attention_dtype.json``; the ratio bf16 / fp32 > 1 means fp32 is faster. Median of
``--repeats`` runs after one warm-up, all shapes in one process (ratios, not absolute times, are the figure).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import command, machine, write_result

# (label, B, H, L, d)
SHAPES = [
    ("tiny generator spatial / cross (d 24)", 144, 4, 64, 24),
    ("tiny generator spatial / cross, dim 192 (d 48)", 144, 4, 64, 48),
    ("tiny generator /T temporal (d 48)", 1024, 4, 9, 48),
    ("tiny planner, 9 frames (d 32)", 16, 4, 576, 32),
    ("small planner, 9 frames (d 64)", 2, 8, 576, 64),
    ("small generator /ST, 9 frames (d 64)", 2, 6, 2304, 64),
]


def _time(shape: tuple[int, int, int, int], fp32: bool, repeats: int) -> float:
    b, h, length, d = shape
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(b, length, h, d, generator=g, requires_grad=True) for _ in range(3)]  # (B, L, H, d)

    def run() -> None:
        q, k, v = (x.transpose(1, 2) for x in leaves)  # (B, H, L, d) views, as SelfAttentionProj.qkv returns
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fp32):
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
    rows = []
    for label, *shape in shapes:
        bf16, fp32 = _time(tuple(shape), False, repeats), _time(tuple(shape), True, repeats)
        rows.append({"shape": label, "bhld": shape, "bf16_ms": bf16 * 1e3, "fp32_ms": fp32 * 1e3,
                     "bf16_over_fp32": bf16 / fp32})
        print(f"{label:48s} B,H,L,d={shape}  bf16 {bf16 * 1e3:7.1f} ms  fp32 {fp32 * 1e3:7.1f} ms  "
              f"bf16/fp32 {bf16 / fp32:.2f}x", flush=True)
    write_result("attention_dtype", {"command": command("bench.attention_dtype", argv), "machine": machine(),
                                     "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

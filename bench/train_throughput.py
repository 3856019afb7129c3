"""Training throughput (clips/s) and MFU of a joint step for ``tiny`` and ``small``, bf16 and fp32, in one run.

    .venv/bin/python -m bench.train_throughput [--quick]

Each configuration is one :mod:`bench.train_mfu` measurement (same step, FLOP count and matmul peaks measured in
the same run); this bench lines them up. ``tiny`` runs at the demo's shapes (32 px clips -> 16x16 generator
latents with patch 1, 8x8 planner latents, batch 16); ``small`` at train_mfu's defaults.
"""

from __future__ import annotations

import argparse

from bench import train_mfu
from bench.common import command, machine, write_result

NAME = "train_throughput"
CONFIGS = {
    "tiny": ["--size", "tiny", "--batch", "16", "--frames", "9", "--high", "16", "--low", "8"],
    "small": ["--size", "small", "--batch", "2", "--frames", "9", "--high", "16", "--low", "8"],
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny only, fp32 and bf16, one round of small shapes")
    a = p.parse_args(argv)
    rows = []
    sizes = ["tiny"] if a.quick else a.sizes
    for size in sizes:
        for precision in ("bf16", "fp32"):
            args = CONFIGS[size] + ["--precision", precision, "--rounds", str(1 if a.quick else a.rounds),
                                    "--tag", f"{size}_{precision}"]
            if a.quick:
                args = ["--quick", "--precision", precision, "--tag", f"quick_{precision}"]
            r = train_mfu.main(args)
            batch = r["settings"]["batch"]
            m = r["median"]
            rows.append({"size": size, "precision": precision, "batch": batch, "step_s": m["step_s"],
                         "clips_per_s": batch / m["step_s"], "mfu_bf16": m["mfu_bf16"], "mfu_fp32": m["mfu_fp32"],
                         "gflop_per_step": r["flops_per_step"] / 1e9})
    print("\n| size | precision | batch | step s | clips/s | MFU of bf16 peak | MFU of fp32 peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['precision']} | {r['batch']} | {r['step_s']:.3f} | {r['clips_per_s']:.1f} | "
              f"{r['mfu_bf16']:.1%} | {r['mfu_fp32']:.1%} |")
    result = {"command": command(f"bench.{NAME}", argv), "machine": machine(), "rows": rows}
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()

"""The demo's training step on CPU, with and without this repository's CPU kernel choices, in one run.

    .venv/bin/python -m bench.tiny_step [--batches 12] [--rounds 3] [--shards DIR] [--quick]

The step is the last stage of ``make demo`` (``configs/tiny/common.yaml`` + ``configs/tiny/05_joint_task.yaml``:
planner and generator, batch 8, 9 frames of 32 px, bf16 autocast): forward, backward and the AdamW step over the
same fixed batches (the masks drawn as in training) for each variant, interleaved round by round:

* ``before``: RoPE by strided pair swaps (this repository's code before the complex product) and every CPU
  attention through torch's flash kernel (fp32 below head dim 64, as ``attention()`` did);
* ``rope``: RoPE as a complex product (``apply_rope_heads_last`` now);
* ``rope+math``: also bf16 attention with at most ``CPU_MATH_MAX_SCORES`` scores as two bf16 matmuls around the
  softmax (``attention()`` now): what ``make demo`` runs.

Writes ``bench/results/tiny_step.json``: the median seconds per step of each variant and its speed-up over
``before``. Run it on an idle machine (``OMP_WAIT_POLICY=PASSIVE``, the threads you train with).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from bench.common import command, machine, write_result

STAGE = ["--config", "configs/tiny/common.yaml", "--config", "configs/tiny/05_joint_task.yaml",
         "--model.init_args.init_from", "null"]
VARIANTS = ("before", "rope", "rope+math")


def _strided_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE as this repository ran it in eager mode before the complex product (now its torch.compile form)."""
    from mardini.models.rope import _rope_swapped_pairs

    sin, cos = (t[:, None] if t.dim() == 2 else t.transpose(-3, -2) for t in (sin, cos))  # (.., L, 1, d)
    return _rope_swapped_pairs(x, sin, cos)  # (B, L, H, d)


@contextlib.contextmanager
def variant(name: str):
    """Patch the kernels of ``name`` in, restore the repository's after."""
    from mardini.models import attention, layers

    saved = layers.apply_rope_heads_last, attention.CPU_MATH_MAX_SCORES
    if name == "before":
        layers.apply_rope_heads_last = _strided_rope
    if name in ("before", "rope"):
        attention.CPU_MATH_MAX_SCORES = 0
    try:
        yield
    finally:
        layers.apply_rope_heads_last, attention.CPU_MATH_MAX_SCORES = saved


def build(extra: list[str]):
    """The demo's last-stage module and its data module (``extra``: CLI overrides)."""
    from mardini.cli import main as cli_main

    cli = cli_main(STAGE + ["--trainer.logger", "false"] + extra, run=False)
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=12, help="training batches per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shards", default=None,
                   help="a synthetic set with train/ and val/ (default: the demo's, data/shards/synthetic)")
    p.add_argument("--quick", action="store_true", help="2 batches, 1 round, 16-px clips (smoke test)")
    a = p.parse_args(argv)
    extra = ["--data.init_args.resolution", "16", "--model.init_args.planner_resolution", "8"] if a.quick else []
    if a.shards:
        extra += ["--data.init_args.train_shards", f"{a.shards}/train", "--data.init_args.val_shards", f"{a.shards}/val"]
    batches, rounds = (2, 1) if a.quick else (a.batches, a.rounds)
    model, dm = build(extra)
    loader = iter(dm.train_dataloader())
    data = [next(loader) for _ in range(batches + 1)]  # the first one warms every variant up
    opt = torch.optim.AdamW(model.networks.parameters(), lr=1e-4)

    def step(batch: dict, i: int) -> None:
        gen = model.step_generator(i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.compute_loss(model.crop_frames(batch, gen), gen, train=True).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for name in VARIANTS:
            with variant(name):
                step(data[0], 0)
                t0 = time.perf_counter()
                for i, batch in enumerate(data[1:], start=1):
                    step(batch, i)
                times[name].append((time.perf_counter() - t0) / batches)
        print(f"round {r + 1}/{rounds}: " + "  ".join(f"{n} {times[n][-1]:.3f} s" for n in VARIANTS), flush=True)
    med = {n: statistics.median(times[n]) for n in VARIANTS}
    rows = [{"variant": n, "step_s": med[n], "speedup_over_before": med["before"] / med[n]} for n in VARIANTS]
    print("\n| variant | s / step | speed-up over before |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['step_s']:.3f} | {row['speedup_over_before']:.2f}x |")
    result = {"command": command("bench.tiny_step", argv), "machine": machine(), "batches": batches,
              "rounds": rounds, "rows": rows, "times": times}
    write_result("tiny_step", result)
    return result


if __name__ == "__main__":
    main()

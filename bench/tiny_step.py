"""The demo's training step on CPU with the RoPE of before and of now, in one run.

    .venv/bin/python -m bench.tiny_step [--batches 12] [--rounds 3] [--shards DIR] [--quick]

The step is the last stage of ``make demo`` (``configs/tiny/common.yaml`` + ``configs/tiny/05_joint_task.yaml``:
planner and generator, batch 8, 9 frames of 32 px, bf16 autocast): forward, backward and the AdamW step over the
same fixed batches (the masks drawn as in training) for each variant, interleaved round by round:

* ``before``: RoPE by strided pair swaps (``apply_rope_heads_last`` before the complex product; its
  ``torch.compile`` form now);
* ``rope``: RoPE as a complex product (``apply_rope_heads_last`` now): what ``make demo`` runs.

Also the RoPE op alone at the generator's shape in that step (q of 8 clips x 576 tokens x 4 heads x 48, a strided
view of the projection, bf16, float32 tables; forward + backward). Writes ``bench/results/tiny_step.json``: the
median seconds per step and per op call of each variant and their speed-ups over ``before``. Run it on an idle
machine (``OMP_WAIT_POLICY=PASSIVE``, the threads you train with).
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
VARIANTS = ("before", "rope")


def _strided_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE as this repository ran it in eager mode before the complex product (now its torch.compile form)."""
    from mardini.models.rope import _rope_swapped_pairs

    sin, cos = (t[:, None] if t.dim() == 2 else t.transpose(-3, -2) for t in (sin, cos))  # (.., L, 1, d)
    return _rope_swapped_pairs(x, sin, cos)  # (B, L, H, d)


@contextlib.contextmanager
def variant(name: str):
    """Patch the RoPE of ``name`` in, restore the repository's after."""
    from mardini.models import layers

    saved = layers.apply_rope_heads_last
    if name == "before":
        layers.apply_rope_heads_last = _strided_rope
    try:
        yield
    finally:
        layers.apply_rope_heads_last = saved


def rope_op_seconds(name: str, repeats: int = 20) -> float:
    """Median seconds of one forward + backward of the variant's RoPE at the tiny generator's q shape."""
    from mardini.models import layers
    from mardini.models.rope import AxialRope3d

    sin, cos = AxialRope3d(48, theta=16, max_freq=2.5)((9, 8, 8), torch.device("cpu"))  # (576, 48)
    qkv = torch.randn(8, 576, 3 * 4 * 48).bfloat16()  # (B, L, 3 H d)
    with variant(name):
        fn = layers.apply_rope_heads_last
        times = []
        for _ in range(repeats + 1):
            x = qkv.unflatten(-1, (3, 4, 48)).unbind(2)[0].requires_grad_()  # (B, L, H, d) strided view
            t0 = time.perf_counter()
            fn(x, sin, cos).float().sum().backward()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


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
        extra += ["--data.init_args.train_shards", f"{a.shards}/train",
                  "--data.init_args.val_shards", f"{a.shards}/val"]
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
    op = {n: rope_op_seconds(n, 2 if a.quick else 20) for n in VARIANTS}
    rows = [{"variant": n, "step_s": med[n], "speedup_over_before": med["before"] / med[n], "rope_ms": op[n] * 1e3,
             "rope_speedup_over_before": op["before"] / op[n]} for n in VARIANTS]
    print("\n| variant | s / step | step speed-up over before | RoPE fwd + bwd ms | RoPE speed-up |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['step_s']:.3f} | {row['speedup_over_before']:.2f}x | {row['rope_ms']:.2f} "
              f"| {row['rope_speedup_over_before']:.2f}x |")
    result = {"command": command("bench.tiny_step", argv), "machine": machine(), "batches": batches,
              "rounds": rounds, "rows": rows, "times": times}
    write_result("tiny_step", result)
    return result


if __name__ == "__main__":
    main()

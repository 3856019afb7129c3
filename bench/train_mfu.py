"""Model FLOPs utilisation (MFU) of one joint training step, against matmul peaks measured in the same run.

    .venv/bin/python -m bench.train_mfu [--size small] [--batch 2] [--frames 9] [--high 16] [--low 8]
                                        [--precision bf16] [--attention st|t] [--compile] [--profile] [--quick]

The step is what ``MarDiniModule.training_step`` + Lightning's bf16-mixed loop do: planner on the low-res
latents, plan dropout, generator on the noised high-res latents, masked v-loss (``compute_loss``) under
``torch.autocast``, backward, AdamW step, zero_grad, EMA update. Latents are fed directly (latent-cache
setting), so the autoencoder is not part of the step. Token ratio high/low = (high/low)^2 = 4 by default,
the paper's 512 vs 256 setting.

FLOPs: ``torch.utils.flop_counter`` over one step (matmuls) plus the CPU SDPA kernels it does not count
(``bench.common.flop_counter``: 4 B H Lq Lk d forward, twice that backward). Peaks: best 2048^2 matmul in
bf16 and fp32, measured each round right before the step; MFU = (FLOPs / step time) / peak, median over
rounds. ``--profile`` adds a torch.profiler pass, the time split matmul / attention / copies / rest, and the
MFU ceiling the attention kernels allow: their profiled time plus every other FLOP at the bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from bench.common import command, flop_counter, machine, matmul_peak, median, op_breakdown, timed, write_result
from mardini.lit.joint import MarDiniModule

NAME = "train_mfu"


def build(size: str, batch: int, frames: int, high: int, low: int, compile_blocks: bool, device: torch.device):
    """The joint module, a latent batch ``z_high (B, T, C, high, high)``, ``z_low (B, T, C, low, low)``, AdamW."""
    torch.manual_seed(0)
    module = MarDiniModule(size=size, planner_resolution=2 * low, keep_ratio=(0.15, 0.6),
                           templates={"random": 1.0, "interpolation": 1.0, "image_to_video": 1.0}).to(device)
    if compile_blocks:  # regional compilation: every block of a network shares one compiled graph
        # planner and generator blocks share code objects (attention, RoPE) at other shapes: without room for their
        # variants dynamo hits its recompile limit (8) and silently runs the rest eagerly
        torch._dynamo.config.recompile_limit = 64
        for net in module.networks.values():
            for blk in net.blocks:
                blk.compile()  # automatic dynamic shapes: the per-step masks change some sizes
    c = module.autoencoder.latent_channels
    data = {"z_high": torch.randn(batch, frames, c, high, high, device=device),
            "z_low": torch.randn(batch, frames, c, low, low, device=device)}
    opt = torch.optim.AdamW(module.networks.parameters(), lr=1e-4, betas=(0.9, 0.95))
    return module, data, opt


def make_step(module: MarDiniModule, data: dict, opt, precision: str, device: torch.device):
    """``step(i)`` runs training step ``i``; returns it with a dict of per-phase seconds."""
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    phases: dict[str, float] = {}

    def fwd(i):
        with amp:
            phases["loss"] = module.compute_loss(data, module.step_generator(i), train=True).mean()

    def step(i: int) -> None:
        phases["forward"] = timed(lambda: fwd(i), device)
        phases["backward"] = timed(lambda: phases.pop("loss").backward(), device)
        phases["optimizer"] = timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)), device)
        phases["ema"] = timed(lambda: module.ema.update(module.networks, step=i), device)

    return step, phases


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--high", type=int, default=16, help="generator latent side (tokens per frame = high^2)")
    p.add_argument("--low", type=int, default=8, help="planner latent side")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    p.add_argument("--attention", choices=["st", "t"], default=None,
                   help="generator attention: st (spatio-temporal) or t (temporal, the /T models and the late "
                        "curriculum); default: the size's")
    p.add_argument("--profile", action="store_true", help="also profile one step with torch.profiler")
    p.add_argument("--quick", action="store_true", help="tiny size and inputs, one round (smoke test)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.batch, a.frames, a.high, a.low, a.rounds = "tiny", 1, 4, 8, 4, 1
    device = torch.device(a.device)
    module, data, opt = build(a.size, a.batch, a.frames, a.high, a.low, a.compile, device)
    if a.attention:
        module.networks["generator"].set_attention(a.attention)
    step, phases = make_step(module, data, opt, a.precision, device)

    warmup = 4 if a.compile else 1  # compiled: the first steps also compile the dynamic-shape graphs
    for i in range(warmup):
        step(i)
    with flop_counter() as fc:
        step(warmup)
    flops = fc.get_total_flops()
    attn_flops = sum(n for op, n in fc.get_flop_counts().get("Global", {}).items()
                     if "scaled_dot_product" in str(op) or "flash_attention" in str(op))
    rounds = []
    for r in range(a.rounds):
        peak_bf16 = matmul_peak(torch.bfloat16, device)
        peak_fp32 = matmul_peak(torch.float32, device)
        sec = timed(lambda: step(warmup), device)  # the counted step's draws (masks set the attention FLOPs)
        rounds.append({"step_s": sec, "peak_bf16": peak_bf16, "peak_fp32": peak_fp32, **dict(phases),
                       "mfu_bf16": flops / sec / peak_bf16, "mfu_fp32": flops / sec / peak_fp32})
        print(f"  round {r}: step {sec:.2f} s, {flops / sec / 1e9:.0f} GFLOP/s, peaks bf16 {peak_bf16 / 1e9:.0f} "
              f"fp32 {peak_fp32 / 1e9:.0f} GFLOP/s, MFU bf16 {rounds[-1]['mfu_bf16']:.1%}", flush=True)
    summary = {k: median([r[k] for r in rounds]) for k in rounds[0]}
    result = {"command": command(f"bench.{NAME}", argv), "settings": vars(a), "machine": machine(),
              "params_M": {k: sum(x.numel() for x in n.parameters()) / 1e6 for k, n in module.networks.items()},
              "tokens": {"generator": a.batch * a.frames * a.high**2, "planner": a.batch * a.frames * a.low**2},
              "flops_per_step": flops, "achieved_flops": flops / summary["step_s"], "median": summary,
              "rounds": rounds}
    if a.profile and device.type != "cpu":  # CPU time on a GPU is kernel launches, not kernels
        print("  --profile: skipped off the CPU (its split is of CPU time)", flush=True)
    elif a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(warmup)
        split = op_breakdown(prof)
        total = sum(split.values())
        result["profile_split_s"] = split
        # Ceiling: the attention kernels at their profiled speed, every other FLOP at the bf16 matmul peak, and
        # no time at all for anything else (copies, norms, optimizer): the best MFU this attention kernel allows.
        peak = summary["peak_bf16"]
        best_s = split["attention"] * summary["step_s"] / total + (flops - attn_flops) / peak
        result["attention_flop_share"] = attn_flops / flops
        result["attention_gflop_per_s"] = attn_flops / 1e9 / (split["attention"] * summary["step_s"] / total)
        result["mfu_bf16_ceiling"] = flops / best_s / peak
        result["profile_top"] = [
            {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        ]
        print("  profile split: " + ", ".join(f"{k} {v / total:.0%}" for k, v in split.items()))
        print(f"  attention: {result['attention_flop_share']:.0%} of the FLOPs at "
              f"{result['attention_gflop_per_s']:.0f} GFLOP/s; MFU ceiling with every other FLOP at the bf16 peak "
              f"and nothing else costing time: {result['mfu_bf16_ceiling']:.1%}")
    path = write_result(NAME + (f"_{a.tag}" if a.tag else ""), result)
    print(f"MFU {summary['mfu_bf16']:.1%} of the bf16 matmul peak ({summary['peak_bf16'] / 1e9:.0f} GFLOP/s), "
          f"{summary['mfu_fp32']:.1%} of the fp32 peak ({summary['peak_fp32'] / 1e9:.0f}); step {summary['step_s']:.2f} s, "
          f"{flops / 1e9:.0f} GFLOP; wrote {path}")
    return result


if __name__ == "__main__":
    main()

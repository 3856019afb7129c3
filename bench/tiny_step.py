"""The demo's joint training step (``configs/tiny/05_joint_task.yaml``): what the planner's patch and OpenMP's wait
policy cost, each compared in one run (STUDIES.md, "The demo's step time").

    .venv/bin/python -m bench.tiny_step [--rounds 5] [--steps 10] [--planner-patch P] [--generator YAML]
        [--batch B] [--no-policy] [--kernels] [--quick]

1. the config's networks against a variant, built side by side in this process and timed in alternating rounds of
   ``--steps`` steps on the same random clips (forward, backward, AdamW step, bf16 autocast, the config's mask
   templates). The variant's planner has ``--planner-patch`` (default: 1 when the config has 2, else 2; patch 1
   gives the planner as many tokens as the generator); with ``--generator '{patch_size: 4}'`` (generator fields
   over the config's) or ``--batch B`` (its clips per step) the variant keeps the config's planner unless
   ``--planner-patch`` is given too;
2. the config's step in child processes with ``OMP_WAIT_POLICY`` unset (libgomp's default: waiting threads spin a
   while) and ``PASSIVE`` (they sleep at once), alternating; the variable only counts before torch loads, hence
   the children. Skipped with ``--no-policy``;
3. with ``--kernels``, the config's step in child processes on the CPU's own bf16 matmul kernels and with
   ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` (AVX-512 BF16 instead of AMX tiles where the CPU has them; the same
   kernels where it does not), alternating (:mod:`mardini.cpu_kernels`).

Reports medians over rounds and their ratios (``bench/results/tiny_step.json``); absolute times depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from bench.common import command, machine, median, timed, write_result
from mardini import cpu_kernels

NAME = "tiny_step"
CONFIG = Path("configs/tiny/05_joint_task.yaml")
CAP = "AVX512_CORE_BF16"  # oneDNN's cap for the kernels comparison: AVX-512 BF16, below AMX
ROOT = Path(__file__).resolve().parents[1]


def build(planner_patch: int | None = None, generator: dict | None = None):
    """The stage's :class:`MarDiniModule` (no checkpoint), optionally with another planner patch and generator
    fields over the config's."""
    from mardini.autoencoders.pixel import SpaceToDepthAutoencoder
    from mardini.lit import MarDiniModule

    cfg = yaml.safe_load((ROOT / CONFIG).read_text(encoding="utf-8"))["model"]["init_args"]
    cfg.pop("init_from", None)
    ae = cfg.pop("autoencoder")
    if planner_patch is not None:
        cfg["planner"] = {**cfg.get("planner", {}), "patch_size": planner_patch}
    if generator:
        cfg["generator"] = {**cfg.get("generator", {}), **generator}
    module = MarDiniModule(**cfg, autoencoder=SpaceToDepthAutoencoder(**ae["init_args"]))
    return module.train()


def clips(batch: int, frames: int, side: int, count: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"video": torch.rand(batch, frames, 3, side, side, generator=g) * 2 - 1} for _ in range(count)]


def stepper(module, batches: list[dict]):
    """``run(n)``: n training steps (seconds per step)."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    state = {"i": 0}

    def one() -> None:
        i = state["i"]
        state["i"] += 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.compute_loss(batches[i % len(batches)], torch.Generator().manual_seed(i), True).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(n: int) -> float:
        return timed(lambda: [one() for _ in range(n)]) / n

    return run


def settings() -> tuple[int, int, int]:
    data = yaml.safe_load((ROOT / "configs/tiny/common.yaml").read_text(encoding="utf-8"))["data"]["init_args"]
    return data["batch_size"], data["frames"], data["resolution"]


def child(steps: int) -> float:
    """Seconds per step of the config's step in this process (after one warm-up step)."""
    run = stepper(build(), clips(*settings()))
    run(1)
    return run(steps)


def child_round(steps: int, variable: str, value: str | None) -> dict:
    """One child process's ``{"s_per_step", "kernels"}`` with ``variable`` set to ``value`` (None: unset); such
    variables only count before torch loads."""
    env = {k: v for k, v in os.environ.items() if k != variable}
    if value:
        env[variable] = value
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "bench.tiny_step", "--child", "--steps", str(steps),
                          "--threads", str(torch.get_num_threads())], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def policy_round(steps: int, policy: str | None) -> float:
    return float(child_round(steps, "OMP_WAIT_POLICY", policy)["s_per_step"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, as the demo "
                   "sets them: up to 2 here)")
    p.add_argument("--planner-patch", type=int, default=None,
                   help="the planner patch compared with the config's (default: 1 when the config has 2, else 2)")
    p.add_argument("--generator", type=yaml.safe_load, default=None,
                   help="generator fields of the variant over the config's, as YAML, e.g. '{patch_size: 4}'")
    p.add_argument("--batch", type=int, default=None, help="the variant's batch (default: the config's)")
    p.add_argument("--no-policy", action="store_true", help="skip the wait-policy comparison (child processes)")
    p.add_argument("--kernels", action="store_true", help="compare the CPU's bf16 matmul kernels with "
                   f"{cpu_kernels.ISA_VARIABLE}={CAP} (child processes; AVX-512 BF16 instead of AMX)")
    p.add_argument("--quick", action="store_true", help="1 round of 1 step, no wait-policy comparison")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps({"s_per_step": child(a.steps), "kernels": cpu_kernels.describe()}))
        return {}
    rounds, steps = (1, 1) if a.quick else (a.rounds, a.steps)
    shape = settings()  # (batch, frames, side) of configs/tiny/common.yaml
    batches = clips(*shape)
    config = build()
    config_patch = config.networks["planner"].cfg.patch_size
    if a.generator is not None and not isinstance(a.generator, dict):
        raise ValueError(f"--generator takes a YAML mapping of generator fields, e.g. '{{patch_size: 4}}'; "
                         f"got {a.generator!r}")
    if a.batch is not None and a.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {a.batch}")
    if a.generator or a.batch:
        a.planner_patch = a.planner_patch or config_patch
    else:
        a.planner_patch = a.planner_patch or (1 if config_patch == 2 else 2)
    variant = build(planner_patch=a.planner_patch, generator=a.generator)
    variant_batch = a.batch or shape[0]
    variant_batches = batches if variant_batch == shape[0] else clips(variant_batch, *shape[1:])
    runs = {"config": stepper(config, batches), "variant": stepper(variant, variant_batches)}
    for run in runs.values():
        run(1)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(run(steps))
    result = {
        "command": command(f"bench.{NAME}", argv), "machine": machine(),
        "settings": {"config": str(CONFIG), "config_planner_patch": config_patch,
                     "variant_planner_patch": a.planner_patch, "variant_generator": a.generator or {},
                     "variant_batch": int(variant_batches[0]["video"].shape[0]),  # what its steps ran on
                     "generator_patch": {"config": config.networks["generator"].cfg.patch_size,
                                         "variant": variant.networks["generator"].cfg.patch_size},
                     "rounds": rounds, "steps": steps, "batch_frames_side": list(shape)},
        "rounds_s_per_step": times,
        "median": {k: median(v) for k, v in times.items()},
    }
    result["variant_over_config"] = result["median"]["variant"] / result["median"]["config"]
    if not (a.quick or a.no_policy):
        policy: dict[str, list[float]] = {"default": [], "PASSIVE": []}
        for _ in range(rounds):
            policy["default"].append(policy_round(steps, None))
            policy["PASSIVE"].append(policy_round(steps, "PASSIVE"))
        result["wait_policy_rounds_s_per_step"] = policy
        result["passive_over_default"] = median(policy["PASSIVE"]) / median(policy["default"])
    if a.kernels and not a.quick:
        kernels: dict[str, list[dict]] = {"own": [], "capped": []}
        for _ in range(rounds):
            kernels["own"].append(child_round(steps, cpu_kernels.ISA_VARIABLE, None))
            kernels["capped"].append(child_round(steps, cpu_kernels.ISA_VARIABLE, CAP))
        result["kernels_rounds"] = kernels
        result["kernels"] = {k: v[0]["kernels"] for k, v in kernels.items()}
        result["capped_over_own_kernels"] = (median([r["s_per_step"] for r in kernels["capped"]])
                                             / median([r["s_per_step"] for r in kernels["own"]]))
    write_result(NAME, result)
    m = result["median"]
    variant_name = (f"planner patch {a.planner_patch}" + (f", generator {a.generator}" if a.generator else "")
                    + (f", batch {variant_batch}" if variant_batch != shape[0] else ""))
    print(f"config (planner patch {config_patch}): {m['config']:.3f} s/step, {variant_name}: "
          f"{m['variant']:.3f} s/step -> the variant takes {result['variant_over_config']:.2f}x the time")
    if "passive_over_default" in result:
        print(f"OMP_WAIT_POLICY=PASSIVE / default: {result['passive_over_default']:.2f}x "
              f"(medians {median(policy['PASSIVE']):.3f} / {median(policy['default']):.3f} s/step)")
    if "capped_over_own_kernels" in result:
        print(f"{result['kernels']['capped']} / {result['kernels']['own']}: "
              f"{result['capped_over_own_kernels']:.2f}x the time per step")
    return result


if __name__ == "__main__":
    main()

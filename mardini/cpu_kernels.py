"""Which bf16 matrix-multiply kernels this CPU runs: why a bf16 run's last digits differ between CPUs.

torch's bf16 matrix multiplies on the CPU go through oneDNN, which picks the widest instruction set the CPU has:
AMX tiles where ``/proc/cpuinfo`` lists ``amx_bf16`` (Xeon since Sapphire Rapids), AVX-512 BF16 dot products where
it lists ``avx512_bf16``, and bf16 converted to float32 below that. The kernels round and accumulate differently,
so a seeded bf16 training run repeats itself to the last digit on one machine, while another CPU gives figures
within the spread of a rerun (README, "The demo"). ``ONEDNN_MAX_CPU_ISA`` caps the choice (read when torch first
calls oneDNN, so set it before the process starts): ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` makes an AMX CPU run
the AVX-512 BF16 kernels (``python -m bench.tiny_step --kernels`` times both). No torch import here: this only
reads the CPU's flags and the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"
# oneDNN caps below AVX-512 BF16 (they lack its bf16 dot products); caps naming AMX, AVX10 or ALL allow more.
_BELOW_AVX512_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
_BELOW_AMX = _BELOW_AVX512_BF16 | {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512"}


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags (``flags`` line of ``/proc/cpuinfo``); empty where the file is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def bf16_matmul_kernels(flags: frozenset[str] | None = None, env: Mapping[str, str] | None = None) -> str:
    """``"AMX"``, ``"AVX-512 BF16"``, ``"float32 (no native bf16)"`` or ``"unknown"`` (no flags to read): the
    kernels oneDNN picks for bf16 matrix multiplies, given the CPU's ``flags`` and the ``ONEDNN_MAX_CPU_ISA`` cap
    in ``env`` (default: this machine and ``os.environ``)."""
    flags = cpu_flags() if flags is None else flags
    env = os.environ if env is None else env
    if not flags:
        return "unknown"
    cap = env.get(ISA_VARIABLE, "ALL").strip().upper() or "ALL"
    if "amx_bf16" in flags and cap not in _BELOW_AMX:
        return "AMX"
    if "avx512_bf16" in flags and cap not in _BELOW_AVX512_BF16:
        return "AVX-512 BF16"
    return "float32 (no native bf16)"


def describe(flags: frozenset[str] | None = None, env: Mapping[str, str] | None = None) -> str:
    """One phrase for a report's machine line, e.g. ``bf16 matmul on AMX`` or ``bf16 matmul on AVX-512 BF16
    (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)``."""
    env = os.environ if env is None else env
    text = f"bf16 matmul on {bf16_matmul_kernels(flags, env)}"
    return text + (f" ({ISA_VARIABLE}={env[ISA_VARIABLE]})" if env.get(ISA_VARIABLE) else "")


def slow_bf16_advice(flags: frozenset[str] | None = None, env: Mapping[str, str] | None = None,
                     what: str = "bf16-mixed", fix: str = "pass --trainer.precision 32-true") -> str | None:
    """What to set where bf16 compute on this CPU is emulated (no AVX-512 BF16 or AMX, or flags that cannot be read:
    macOS, Windows), else None. There torch emulates bf16 matrix multiplies, slower than fp32's. ``what`` names the bf16
    setting and ``fix`` the fp32 one (default: training's; ``sample.py --bf16``: leave it out)."""
    kernels = bf16_matmul_kernels(flags, env)
    if kernels in ("AMX", "AVX-512 BF16"):
        return None
    where = ("this CPU has no native bf16 matrix multiplies" if kernels != "unknown" else
             "this CPU's bf16 support could not be read (no /proc/cpuinfo: macOS, Windows); where it has no native "
             "bf16 matrix multiplies")
    return (f"{what} on the CPU: {where}, torch emulates them, slower than fp32 (mardini.cpu_kernels); if the "
            f"steps are slow, {fix} (rounding differently, the figures then differ from the bf16 runs')")

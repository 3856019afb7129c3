"""OpenMP's wait policy for the demo, picked from how busy the machine is, before torch loads OpenMP.

Idle threads of torch's OpenMP (libgomp) spin for a while before they sleep. On an idle machine that is what the
tiny training step wants: its thousands of small kernels per step find the threads awake (``PASSIVE`` took 1.23x
the time per step in ``python -m bench.tiny_step``, STUDIES.md "The demo's step time"). When another process holds a
core, spinning threads steal its time and the step gets about 2x slower than with
``PASSIVE``, which puts waiting threads to sleep at once. So :func:`apply_wait_policy` reads the CPU counters of
``/proc/stat`` over a short interval: with at least ``threshold`` cores busy it sets ``PASSIVE``, otherwise it
leaves libgomp's default. A policy the user set is kept. No torch import here: the variable only counts before
torch starts OpenMP.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, MutableMapping

BUSY_THRESHOLD = 0.5  # busy cores (other processes) from which waiting threads should sleep


def read_cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """``(busy, total)`` jiffies of all CPUs from ``/proc/stat``; None where the file is missing (not Linux).

    Idle and iowait count as idle; user, nice, system, irq, softirq and steal (time the hypervisor gave to others)
    as busy."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


def busy_cores(interval: float = 0.5, read: Callable[[], tuple[int, int] | None] = read_cpu_times,
               cpus: int | None = None, sleep: Callable[[float], None] = time.sleep) -> float | None:
    """How many cores other processes kept busy over ``interval`` seconds (this process only sleeps); None if
    unknown."""
    first = read()
    if first is None:
        return None
    sleep(interval)
    second = read()
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])  # busy fraction of all CPUs
    return share * (cpus or os.cpu_count() or 1)


def apply_wait_policy(environ: MutableMapping[str, str] = os.environ, measure: Callable[[], float | None] = busy_cores,
                      threshold: float = BUSY_THRESHOLD) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` when the machine is busy; returns what was chosen and why."""
    if "OMP_WAIT_POLICY" in environ:
        return f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']} (set by the user)"
    busy = measure()
    if busy is None:
        return "OpenMP default wait policy (machine load unknown)"
    if busy >= threshold:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"OMP_WAIT_POLICY=PASSIVE ({busy:.1f} cores busy at start: waiting threads sleep)"
    return f"OpenMP default wait policy ({busy:.1f} cores busy at start: waiting threads spin briefly)"

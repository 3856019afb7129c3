"""OpenMP's wait policy for the demo, picked from how busy the machine is, before torch loads OpenMP.

Idle threads of torch's OpenMP (libgomp) spin for a while before they sleep. On an idle machine that is what the
tiny training step wants: its thousands of small kernels per step find the threads awake (``PASSIVE`` took 1.23x
the time per step in ``python -m bench.tiny_step``, STUDIES.md "The demo's step time"). When another process holds a
core the demo's threads need, spinning threads steal its time and the step gets about 2x slower than with
``PASSIVE``, which puts waiting threads to sleep at once. So :func:`apply_wait_policy` reads the CPU counters of
``/proc/stat`` over a short interval, on the CPUs this process may run on (``os.sched_getaffinity``): when the cores
other processes keep busy there plus the demo's threads exceed those CPUs by ``threshold`` cores or more, it sets
``PASSIVE``, otherwise it leaves libgomp's default (a background daemon on a 64-core machine changes nothing). A
policy the user set is kept. No torch import here: the variable only counts before torch starts OpenMP.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence

from mardini.threads import threads_in

BUSY_THRESHOLD = 0.5  # cores by which busy cores plus the demo's threads must exceed the CPUs for threads to sleep
DEFAULT_THREADS = min(2, os.cpu_count() or 1)  # the demo's --threads without OMP_NUM_THREADS (mardini.demo.main)


def read_cpu_times(path: str = "/proc/stat", cpus: Collection[int] | None = None) -> tuple[int, int] | None:
    """``(busy, total)`` jiffies from ``/proc/stat`` of all CPUs, or of the CPUs numbered ``cpus``; None where the
    file or those CPUs' lines are missing (not Linux).

    Idle and iowait count as idle; user, nice, system, irq, softirq and steal (time the hypervisor gave to others)
    as busy."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = {"cpu"} if cpus is None else {f"cpu{i}" for i in cpus}
    busy = total = 0
    found = False
    for line in lines:
        fields = line.split()
        if not fields or fields[0] not in wanted:
            continue
        ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + ticks[4]
        busy, total, found = busy + sum(ticks) - idle, total + sum(ticks), True
    return (busy, total) if found else None


def available_cpus() -> set[int]:
    """The CPUs this process may run on (``os.sched_getaffinity``; every CPU where that is missing)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


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


def demo_threads(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    """The torch threads ``python -m mardini.demo argv`` will run (``--threads``, else ``OMP_NUM_THREADS``, else
    :data:`DEFAULT_THREADS`), read before its parser, which reports a bad value."""
    return threads_in(argv, DEFAULT_THREADS, environ)


def apply_wait_policy(environ: MutableMapping[str, str] = os.environ,
                      measure: Callable[[], float | None] | None = None, threshold: float = BUSY_THRESHOLD,
                      threads: int = DEFAULT_THREADS, cores: int | None = None) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` when the cores other processes keep busy (``measure``, default
    :func:`busy_cores` on :func:`available_cpus`) plus the demo's ``threads`` exceed the ``cores`` it may run on
    (default: how many :func:`available_cpus`) by ``threshold`` or more; returns what was chosen and why."""
    if "OMP_WAIT_POLICY" in environ:
        return f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']} (set by the user)"
    cpus = available_cpus()
    if measure is None:
        def measure() -> float | None:
            return busy_cores(read=lambda: read_cpu_times(cpus=cpus), cpus=len(cpus))
    cores = cores or len(cpus)
    busy = measure()
    if busy is None:
        return "OpenMP default wait policy (machine load unknown)"
    load = f"{busy:.1f} cores busy at start + {threads} threads, {cores} cores"
    if busy + threads - cores >= threshold:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"OMP_WAIT_POLICY=PASSIVE ({load}: waiting threads sleep)"
    return f"OpenMP default wait policy ({load}: waiting threads spin briefly)"

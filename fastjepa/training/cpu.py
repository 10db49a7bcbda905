"""CPU threads for a run on a machine that other processes share.

torch starts one OpenMP thread per core of the process. When another process keeps some of
those cores busy, every parallel region waits at its barrier for the thread that shares a
core with it, and threads that spin while they wait take time from the other process: a
step slows far more than in proportion to the cores lost (docs/performance.md). The
command line therefore starts with one thread per *free* core (:func:`threads_for_free_cores`),
and OpenMP's threads sleep instead of spinning while they wait (``OMP_WAIT_POLICY=PASSIVE``,
set by ``python -m fastjepa.train`` before torch loads OpenMP). An ``OMP_NUM_THREADS`` or
``OMP_WAIT_POLICY`` in the environment wins over both.
"""

from __future__ import annotations

import os
import time


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """(idle, total) jiffies of each of ``cpus`` from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            cpu = int(name[3:])
            if cpu in cpus:
                values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                out[cpu] = (values[3] + values[4], sum(values))
    return out


def busy_cores(sample_s: float = 0.25) -> float | None:
    """How many of this process's cores other processes keep busy, measured over
    ``sample_s`` while this process sleeps (None where /proc/stat is not readable)."""
    try:
        cpus = os.sched_getaffinity(0)
        before = _cpu_times(cpus)
        time.sleep(sample_s)
        after = _cpu_times(cpus)
    except (OSError, AttributeError, ValueError):
        return None
    busy = 0.0
    for cpu, (idle0, total0) in before.items():
        idle1, total1 = after.get(cpu, (idle0, total0))
        if total1 > total0:
            busy += 1.0 - (idle1 - idle0) / (total1 - total0)
    return busy


def threads_for_free_cores(cores: int, busy: float | None) -> int:
    """One thread per core that is not busy (at least one, at most ``cores``); a core
    counts as busy from 60 % use, so a core that is mostly someone else's is left to them."""
    if busy is None:
        return cores
    return max(1, min(cores, cores - int(busy + 0.4)))

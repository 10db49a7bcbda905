"""CPU threads for a run on a machine that other processes share.

torch starts one OpenMP thread per core of the process. When another process keeps some of
those cores busy, every parallel region waits at its barrier for the thread that shares a
core with it, and threads that spin while they wait take time from the other process: a
step slows far more than in proportion to the cores lost (docs/performance.md). The
command line therefore measures the other processes' load once, before torch loads OpenMP
(:func:`plan_threads`), and starts with one thread per *free* core
(:func:`threads_for_free_cores`). Where some core is busy, OpenMP's threads also sleep instead
of spinning while they wait (``OMP_WAIT_POLICY=PASSIVE``: load that comes and goes then costs
in proportion). On an idle machine OpenMP keeps its default (spin, then sleep): sleeping at
every barrier slows an idle step (benchmarks/results, ``contention``). An ``OMP_NUM_THREADS``
or ``OMP_WAIT_POLICY`` in the environment wins.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


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


@dataclass(frozen=True)
class ThreadPlan:
    """What :func:`plan_threads` decided: torch threads (None: torch's default) and
    whether it set ``OMP_WAIT_POLICY=PASSIVE``."""

    busy: float | None
    threads: int | None
    passive: bool


def plan_threads(environ: dict | None = None, cores: int | None = None) -> ThreadPlan:
    """Measure the busy cores once and choose threads and OpenMP's wait policy.

    Call it before torch is imported: OpenMP reads ``OMP_WAIT_POLICY`` (set in ``environ``,
    default ``os.environ``, where some core is busy) when torch loads it. ``OMP_NUM_THREADS``
    in ``environ`` means the user chose: nothing is measured or set. The caller applies
    ``threads`` with ``torch.set_num_threads`` where it is below torch's default.
    """
    env = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in env:
        return ThreadPlan(None, None, False)
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    busy = busy_cores()
    threads = threads_for_free_cores(cores, busy)
    passive = threads < cores and "OMP_WAIT_POLICY" not in env
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return ThreadPlan(busy, threads, passive)

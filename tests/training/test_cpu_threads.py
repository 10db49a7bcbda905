"""Threads and OpenMP's wait policy on a shared CPU (fastjepa.training.cpu, docs/performance.md)."""

import os
import subprocess
import sys

import pytest

from fastjepa.training import cpu


@pytest.mark.parametrize(
    "cores, busy, want",
    [(2, 0.0, 2), (2, None, 2), (2, 0.5, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 2.0, 1), (1, 1.0, 1), (8, 2.5, 6), (8, 2.7, 5)],
)
def test_one_thread_per_free_core(cores, busy, want):
    assert cpu.threads_for_free_cores(cores, busy) == want


def test_busy_cores_is_a_share_of_this_process_cores():
    busy = cpu.busy_cores(0.05)
    if busy is None:
        pytest.skip("/proc/stat is not readable here")
    assert 0.0 <= busy <= len(os.sched_getaffinity(0))


def test_plan_on_an_idle_machine_keeps_openmp_default(monkeypatch):
    monkeypatch.setattr(cpu, "busy_cores", lambda *a, **k: 0.1)
    env = {}
    plan = cpu.plan_threads(env, cores=2)
    assert plan == cpu.ThreadPlan(busy=0.1, threads=2, passive=False)
    assert "OMP_WAIT_POLICY" not in env


def test_plan_with_a_busy_core_sleeps_instead_of_spinning(monkeypatch):
    monkeypatch.setattr(cpu, "busy_cores", lambda *a, **k: 1.0)
    env = {}
    plan = cpu.plan_threads(env, cores=2)
    assert plan == cpu.ThreadPlan(busy=1.0, threads=1, passive=True)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_users_settings_win(monkeypatch):
    def must_not_measure(*a, **k):
        raise AssertionError("measured although OMP_NUM_THREADS was set")

    monkeypatch.setattr(cpu, "busy_cores", must_not_measure)
    env = {"OMP_NUM_THREADS": "3"}
    assert cpu.plan_threads(env, cores=2) == cpu.ThreadPlan(None, None, False)
    assert env == {"OMP_NUM_THREADS": "3"}

    monkeypatch.setattr(cpu, "busy_cores", lambda *a, **k: 1.0)
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    plan = cpu.plan_threads(env, cores=2)
    assert plan.threads == 1 and not plan.passive and env["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("busy", [0.0, 1.0])
def test_the_cli_plans_before_torch_loads_openmp(busy):
    """``python -m fastjepa.train`` measures and sets the policy before torch is imported
    (OpenMP reads it once, when torch loads it)."""
    code = (
        "import os, sys\n"
        "import fastjepa.training.cpu as c\n"
        f"c.busy_cores = lambda *a, **k: {busy}\n"
        "from fastjepa.train import _plan_threads\n"
        "plan = _plan_threads()\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), plan.threads, 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    wait, threads, torch_loaded = out.split()
    cores = len(os.sched_getaffinity(0))
    want = cpu.threads_for_free_cores(cores, busy)
    assert int(threads) == want
    assert wait == ("PASSIVE" if want < cores else "None")
    assert torch_loaded == "False"


def test_an_in_process_call_plans_threads_but_leaves_the_environment(monkeypatch):
    """With torch already loaded the wait policy can no longer apply: the thread count
    still follows the free cores, and the environment stays as it was."""
    from fastjepa import train

    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu, "busy_cores", lambda *a, **k: 1.0)
    plan = train._plan_threads()
    assert plan.threads == cpu.threads_for_free_cores(len(os.sched_getaffinity(0)), 1.0)
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train._plan_threads() is None  # torchrun: each rank keeps torch's threads

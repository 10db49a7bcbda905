"""The default CPU step with the machine's other cores idle and with one busy: how much a
step slows when another process takes a core, fastjepa vs the reference step.

    python benchmarks/bench_contention.py [--steps 4] [--repeats 1] [--spinners 1] [--out benchmarks/results]

Each measurement is a fresh process (OpenMP reads its settings when torch loads) timing
``--steps`` optimizer steps of the packaged default config (``python -m fastjepa.train``
with no arguments: vit_tiny depth 6 on 32-px digits, batch 64) on one batch, after one
untimed step. Cases:

* path: ``fastjepa`` (the default step) or ``reference`` (``meta.reference_step=true``);
* threads: ``torch`` (torch's defaults: one OpenMP thread per core, OpenMP's default wait
  policy, which spins), ``passive`` (one thread per free core and ``OMP_WAIT_POLICY=PASSIVE``
  always) or ``fastjepa`` (what ``python -m fastjepa.train`` does,
  :func:`fastjepa.training.cpu.plan_threads`: one thread per free core, and
  ``OMP_WAIT_POLICY=PASSIVE`` only where some core was busy at the start);
* load: ``idle`` or ``busy`` (``--spinners`` processes spinning in a Python loop while the
  step is timed: "the other core busy" on a 2-core machine).

Proportional degradation on a machine of C cores with one taken is C / (C - 1) (2x on 2
cores); the report gives each case's busy / idle ratio beside it. The numbers mean
something only on a machine nothing else uses: the load average at the start is recorded
in the report. Writes ``cpu-<date>-contention.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("fastjepa") is None:  # a source checkout run as `python benchmarks/...`
    sys.path.insert(0, str(HERE.parent))

PATHS = {"fastjepa": [], "reference": ["meta.reference_step=true", "mask.compat=reference"]}
QUIET = ["optimization.time_budget_s=null", "logging.probe=false", "logging.plots=false", "logging.tensorboard=false"]


POLICIES = ("torch", "passive", "fastjepa")


def child(path: str, policy: str, steps: int) -> dict:
    """Time ``steps`` steps in this process (torch not yet imported: the policy applies)."""
    from fastjepa.training.cpu import busy_cores, plan_threads, threads_for_free_cores

    if policy == "fastjepa":
        plan = plan_threads()
        busy, threads = plan.busy, plan.threads
    else:
        busy = busy_cores()
        threads = threads_for_free_cores(len(os.sched_getaffinity(0)), busy) if policy == "passive" else None
    import torch

    if threads is not None and threads < torch.get_num_threads():
        torch.set_num_threads(threads)
    from fastjepa.config import load_config
    from fastjepa.training.trainer import Trainer

    cfg = load_config(None, [*QUIET, *PATHS[path]])
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp) / "run", quiet=True)
        udata, me, mp = next(iter(tr._loader()))
        batch = tr.stepper.to_device(udata, me, mp)
        times = []
        with tr.stepper.backend():
            for i in range(1 + steps):
                t0 = time.perf_counter()
                float(tr.stepper.step(*batch, index=0).loss)
                if i:
                    times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "threads": torch.get_num_threads(), "busy_cores_seen": busy,
            "wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}  # fmt: skip


def run_child(path: str, policy: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, __file__, "--child", path, policy, "--steps", str(steps)], env=env,
                       capture_output=True, text=True, timeout=3600)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"child {path}/{policy} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def spinners(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(1.0)  # let them take their cores
    return procs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="rounds over all cases (interleaved); the median counts")
    p.add_argument("--spinners", type=int, default=1, help="busy processes in the 'busy' cases")
    p.add_argument("--paths", default="fastjepa,reference")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--stem", default=None)
    p.add_argument("--child", nargs=2, metavar=("PATH", "POLICY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return 0
    from _report import cpu_name, write_report

    paths = args.paths.split(",")
    load_at_start = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for load in ("idle", "busy"):
            procs = spinners(args.spinners) if load == "busy" else []
            try:
                for path in paths:
                    for policy in POLICIES:
                        r = run_child(path, policy, args.steps)
                        rows.setdefault((path, policy, load), []).append(r)
                        print(f"{path:9} {policy:8} {load:4}: {r['step_s']:.3f} s/step, {r['threads']} thread(s), "
                              f"busy cores seen {r['busy_cores_seen']:.2f}, wait policy {r['wait_policy']}", file=sys.stderr, flush=True)  # fmt: skip
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
    result = {"cpu": cpu_name(), "cores": cores, "spinners": args.spinners, "steps": args.steps, "repeats": args.repeats,
              "load_average_at_start": load_at_start, "date": datetime.date.today().isoformat(), "cases": []}  # fmt: skip
    md = [f"# Contention: the default CPU step, idle and with {args.spinners} core(s) busy", "",
          f"{cpu_name()}, {cores} cores; load average at the start {load_at_start[0]:.2f} (0 on an idle machine: "
          "anything else means these numbers are contended); median of "
          f"{args.repeats} round(s) of {args.steps} steps. Proportional: {cores / max(1, cores - args.spinners):.2f}x.", "",
          "| path | threads | idle s/step | busy s/step | busy / idle | threads idle / busy | wait policy idle / busy |",
          "|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in paths:
        for policy in POLICIES:
            idle = statistics.median(r["step_s"] for r in rows[(path, policy, "idle")])
            busy = statistics.median(r["step_s"] for r in rows[(path, policy, "busy")])
            first_idle, first_busy = rows[(path, policy, "idle")][0], rows[(path, policy, "busy")][0]
            t_idle, t_busy = first_idle["threads"], first_busy["threads"]
            w_idle, w_busy = first_idle["wait_policy"], first_busy["wait_policy"]
            result["cases"].append({"path": path, "policy": policy, "idle_step_s": idle, "busy_step_s": busy, "ratio": busy / idle,
                                    "threads_idle": t_idle, "threads_busy": t_busy, "wait_policy_idle": w_idle,
                                    "wait_policy_busy": w_busy, "idle_rounds": [r["step_s"] for r in rows[(path, policy, "idle")]],
                                    "busy_rounds": [r["step_s"] for r in rows[(path, policy, "busy")]]})  # fmt: skip
            md.append(f"| {path} | {policy} | {idle:.3f} | {busy:.3f} | {busy / idle:.2f}x | {t_idle} / {t_busy} | {w_idle} / {w_busy} |")
    stem = args.stem or f"cpu-{result['date']}-contention"
    print("\n".join(md))
    print(f"wrote {write_report(args.out, stem, result, chr(10).join(md))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmarks still run: every pytest-benchmark case once (``--benchmark-disable``),
and the CPU report scripts end to end at tiny sizes, writing their .json + .md.

They say nothing about speed here; they guard the harness (each benchmark checks its fast
path against the reference before timing), so a refactor cannot leave the GPU session —
which has minutes, not hours — with a script that no longer starts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastjepa.ops import available

ROOT = Path(__file__).resolve().parents[2]
HAVE_EXT = bool(available()["cpp"])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_pytest_benchmark_cases_run_once():
    r = _run("-m", "pytest", "benchmarks", "--benchmark-disable", "-q", "-p", "no:cacheprovider")
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 20, summary  # collected: bench_*.py, not "no tests ran"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_EXT, reason="the CPU report scripts compare against fastjepa._C")
@pytest.mark.parametrize(
    "script, args, stem",
    [
        ("bench_mask_sampler.py", ["--batch", "4", "--seconds", "0.05"], "mask_sampler"),
        ("bench_mask_sampler3d.py", ["--batch", "2", "--frames", "4", "--crop", "64", "--seconds", "0.05",
                                     "--check-batches", "2"], "mask_sampler3d"),
        ("bench_cpu_ops.py", ["--batch", "1", "--dtypes", "float32", "--seconds", "0.02"], "cpu_ops"),
    ],
)
def test_cpu_report_scripts_write_json_and_markdown(tmp_path, script, args, stem):
    _run(f"benchmarks/{script}", *args, "--threads", "1", "--out", str(tmp_path))
    (md,) = tmp_path.glob(f"cpu-*-{stem}.md")
    (js,) = tmp_path.glob(f"cpu-*-{stem}.json")
    assert md.read_text().startswith("# ") and "|---" in md.read_text()
    result = json.loads(js.read_text())
    assert result["threads"] == 1 and result["cpu"]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left behind


@pytest.mark.slow
def test_data_benchmark_quick_writes_json_and_markdown(tmp_path):
    # --quick: four JPEGs, one round, the all-cores phase for a fraction of a second
    _run("benchmarks/bench_data.py", "--quick", "--out", str(tmp_path), "--stem", "d")
    result = json.loads((tmp_path / "d.json").read_text())
    s = result["sets"]["500x375"]
    assert s["files"] == 4 and s["check"]["psnr_min_db"] >= 30  # the fast path was checked against the reference
    assert {"reference", "fastjepa", "fastjepa-pillow", "uint8-only", "gpu-worker"} <= set(s["per_core"])
    assert all(v["images_per_s"] > 0 for v in s["per_core"].values()) and s["all_cores"]["fastjepa"]["images_per_s"] > 0
    md = (tmp_path / "d.md").read_text()
    assert md.startswith("# ") and "| fastjepa |" in md and "cores per GPU" in md


@pytest.mark.slow
def test_train_step_table_runs_one_child(tmp_path):
    # the script gpu_check.sh relies on: one child process, one step, the CPU model
    _run("benchmarks/train_step_table.py", "--out", str(tmp_path), "--name", "t", "--repeats", "1", "--steps", "1",
         "--warmup", "1", "--paths", "fastjepa")  # fmt: skip
    result = json.loads((tmp_path / "t.json").read_text())
    (row,) = result["rows"]
    assert row["path"] == "fastjepa" and row["result"]["batch"] == 32 and not row["result"]["errors"]
    assert row["result"]["imgs_per_s"] > 0 and row["result"]["check_loss"] > 0
    assert "| fastjepa |" in (tmp_path / "t.md").read_text()


@pytest.mark.slow
def test_ops_table_runs_and_checks_every_op(tmp_path):
    out = tmp_path / "ops.json"
    _run("benchmarks/ops_table.py", "--iters", "1", "--out", str(out))
    result = json.loads(out.read_text())
    ops = {r["op"] for r in result["rows"]}
    assert result["failures"] == [] and ops == {"gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss"}


@pytest.mark.parametrize("name", ["gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss"])
def test_gpu_benchmark_shapes_are_the_models_at_224(name):
    """The GPU tables are labelled ViT-B/16 and ViT-H/14 at 224 px: their token counts must
    be those models' (14x14 = 196 and 16x16 = 256 patches), blocks a plausible part of them."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        shapes = importlib.import_module(f"bench_{name}").GPU_SHAPES
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    widths = {"vitb16": (196, 768), "vith14": (256, 1280)}
    for model, s in shapes.items():
        N, D = widths[model.split("-")[0]]  # "vitb16-pe": the same model, another input layout
        assert s.get("N", N) == N, (model, s)
        assert s.get("D", D) == D, (model, s)
        for k in ("K", "Kc", "Kt"):
            if k in s:
                assert 0.1 * N <= s[k] <= 0.35 * N, (model, k, s)


@pytest.mark.slow
def test_gpu_check_dry_run_brings_back_what_the_device_tool_returns(tmp_path):
    """benchmarks/gpu_check.sh on the CPU (GPU_CHECK_DRY=1: tiny sizes, no build): what it
    leaves in $OUT fits the device tool's limits (at most 8 files of at most 16 MiB, no more
    than two folders down, plain names), every part ran and has its row, the logs are one
    tar.gz, and the summary says loudly that the CUDA kernel was neither built nor tested."""
    import re
    import tarfile

    out = tmp_path / "out"
    out.mkdir()
    env = {**ENV, "OUT": str(out), "GPU_CHECK_DRY": "1"}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3, rel  # $OUT/a/b/file at most
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
    for p in files:
        assert p.stat().st_size <= 16 * 2**20, (p, p.stat().st_size)
    names = {p.name for p in files}
    assert names == {"gpu_check.md", "logs.tar.gz", "ops_table.json", "ops_table.md", "train_step.json", "train_step.md",
                     "data.json", "data.md"}, names  # fmt: skip
    assert not any(n.endswith(".tmp") for n in names), names
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(m).name for m in tar.getnames()}
    assert {"preflight.log", "pytest_gpu.log", "ops_table.log", "train_step.log"} <= logs, logs
    summary = (out / "gpu_check.md").read_text()
    for part in ("preflight", "pytest -m gpu", "ops_table", "train_step_table", "bench_data"):
        assert f"| {part} | ok |" in summary, (part, summary)
    assert "**CUDA KERNEL (fastjepa._C, csrc/cuda): NOT BUILT, NOT TESTED.**" in summary, summary
    ops = json.loads((out / "ops_table.json").read_text())
    assert ops["meta"]["providers"] == ["reference", "fused"] and ops["failures"] == []  # no cold torch.compile by default
    # every op of the table at tiny shapes, one row per op, shape and pass, the training layout of gather_tokens included
    assert {r["op"] for r in ops["rows"]} == {"gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss"}
    assert ("gather_tokens", "tiny-pe", "fwd+bwd") in {(r["op"], r["shape"], r["pass"]) for r in ops["rows"]}
    assert all(r["fused"]["device_us"] > 0 and r["reference"]["device_us"] > 0 for r in ops["rows"])
    ts = json.loads((out / "train_step.json").read_text())
    assert ts["machine"]["in_process"] and ts["rows"][0]["result"]["imgs_per_s"] > 0  # the GPU's one-process code ran


@pytest.mark.slow
def test_gpu_check_correctness_part_alone(tmp_path):
    """``gpu_check.sh correctness``: preflight and the GPU tests only, nothing of the speed part."""
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "correctness"], cwd=ROOT, env={**ENV, "OUT": str(out), "GPU_CHECK_DRY": "1"},
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert _check_limits(out) == {"gpu_check.md", "logs.tar.gz"}
    summary = (out / "gpu_check.md").read_text()
    assert "| pytest -m gpu | ok |" in summary and "ops_table" not in summary and "GPU tests: 0 passed, 0 failed, 0 errors" in summary


def test_gpu_check_rejects_an_unknown_part():
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "sped"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip().splitlines() == [
        "gpu_check.sh: unknown part 'sped'; expected correctness, speed or nothing (both)"]


# -- the timing helpers, on the CPU with a fake device timer -------------------------------


class _FakeTimer:
    """Records what happens between two events; the 'device' takes 1 ms per call timed."""

    def __init__(self, log):
        self.log = log

    def sync(self):
        self.log.append("sync")

    def hold(self, seconds):
        self.log.append("hold")

    def start(self):
        self.log.append("start")

    def stop(self):
        calls = len(self.log) - 1 - max(i for i, e in enumerate(self.log) if e == "start")
        self.log.append("stop")
        return calls * 1e-3


def _common():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _common

        return _common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_time_calls_times_back_to_back_calls_between_one_event_pair_rotating_the_inputs():
    c = _common()
    log = []
    fns = [lambda i=i: log.append(i) for i in range(3)]
    t = c.time_calls(fns, calls=7, repeats=3, warmup=2, timer=_FakeTimer(log))
    # warm-up: every set twice, then a sync, before anything is timed
    assert log[:7] == [0, 1, 2, 0, 1, 2, "sync"]
    windows = []
    for i, e in enumerate(log):
        if e == "start":
            windows.append(log[i + 1 : log.index("stop", i)])
    assert len(windows) == 3 and all(w == [0, 1, 2, 0, 1, 2, 0] for w in windows)  # 7 launches, the sets in turn
    assert all(log[log.index("start", i) - 1] == "hold" for i, e in enumerate(log) if e == "start")  # GPU busy first
    assert t.device_s == pytest.approx(1e-3) and t.calls == 7 and t.sets == 3 and t.repeats == 3  # per call, not per window
    assert 0 < t.host_s < 1  # measured apart from the device time, on the host clock
    with pytest.raises(ValueError, match="no input sets"):
        c.time_calls([], timer=_FakeTimer([]))


def test_input_sets_exceed_twice_the_l2():
    c = _common()
    assert c.input_sets(10 * 2**20, 0) == 1  # no L2 (the CPU): one set
    for nbytes, l2 in ((21_600_000, 50 * 2**20), (84 * 2**20, 50 * 2**20), (2**10, 60 * 2**20)):
        n = c.input_sets(nbytes, l2)
        assert n >= 2 and (n * nbytes > 2 * l2 or n == 64), (nbytes, l2, n)
    assert c.input_sets(2**30, 50 * 2**20) == 2  # each set larger than the L2: two already evict each other


def test_ops_table_records_an_error_per_provider_and_goes_on(monkeypatch, tmp_path):
    """A RuntimeError in one op's fused path (not only a mismatch) is that cell's error; every
    other op and provider still runs, and the JSON and markdown hold every row."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # ops_table imports each bench_<op> as it goes
    import bench_target_tokens
    import ops_table

    real = bench_target_tokens.make_case

    def broken(shape, **kw):
        case = real(shape, **kw)

        def boom():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        case.run["fused"]["fwd"] = boom
        return case

    monkeypatch.setattr(bench_target_tokens, "make_case", broken)
    out = tmp_path / "ops.json"
    rc = ops_table.main(["--iters", "1", "--providers", "reference,fused", "--out", str(out)])
    assert rc == 1
    result = json.loads(out.read_text())
    ops = {r["op"] for r in result["rows"]}
    assert ops == set(ops_table.OPS)  # the ops after the broken one ran
    bad = [r for r in result["rows"] if r["op"] == "target_tokens"]
    assert bad and "RuntimeError: CUDA error" in bad[0]["fused"]["error"] and bad[0]["reference"]["device_us"] > 0
    assert len(result["failures"]) == 1 and "target_tokens" in result["failures"][0]
    assert {(r["op"], r["shape"]) for r in result["rows"]} >= {("gather_tokens", "tiny-pe")}  # the training layout
    md = out.with_suffix(".md").read_text()
    assert "ERROR: RuntimeError: CUDA error" in md and "| smooth_l1_loss |" in md


def _train_step_table():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_step_table

        return train_step_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_train_step_mfu_datasheet_peaks_are_named():
    t = _train_step_table()
    assert t.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == (989e12, "H100 datasheet bfloat16 dense 989 TFLOP/s")
    assert t.datasheet_peak("NVIDIA H100 PCIe", "bfloat16")[0] == 756e12
    assert t.datasheet_peak("NVIDIA H200", "bfloat16")[0] == 989e12
    assert t.datasheet_peak("NVIDIA A100-SXM4-80GB", "bfloat16")[0] == 312e12
    assert t.datasheet_peak("NVIDIA H100 80GB HBM3", "float32") is None and t.datasheet_peak("Intel Xeon", "bfloat16") is None


def test_compile_counter_counts_triton_compiles_and_restores_the_hook():
    triton = pytest.importorskip("triton")
    t = _train_step_table()
    knobs = getattr(triton, "knobs", None)
    before = knobs.runtime.jit_cache_hook if knobs else None
    with t.CompileCounter() as cc:
        hook = knobs.runtime.jit_cache_hook if knobs else triton.runtime.jit.JITFunction.cache_hook
        assert hook(key="k", repr="r") is False  # what Triton calls before compiling a new specialisation
        hook(key="k2", repr="r2")
    assert cc.triton == 2 and cc.graphs == 0
    assert (knobs.runtime.jit_cache_hook if knobs else triton.runtime.jit.JITFunction.cache_hook) is before


def _lease_fixture(root: Path, name: str, gpu: str, date: str, fj: float, ref: float) -> None:
    d = root / name
    d.mkdir(parents=True)
    res = lambda ips, **kw: {"batch": 128, "imgs_per_s": ips, "mfu": 0.4, "mfu_datasheet": 0.3, "peak_mem_gib": 20.0, **kw}  # noqa: E731
    (d / "train_step.json").write_text(json.dumps({
        "machine": {"device": gpu, "date_utc": date, "torch": "2.9.0"},
        "rows": [{"model": "ViT-B/16", "path": "fastjepa", "result": res(fj)}, {"model": "ViT-B/16", "path": "reference", "result": res(ref)},
                 {"model": "ViT-H/14", "path": "fastjepa", "result": {"error": "OutOfMemoryError: CUDA out of memory"}}]}))  # fmt: skip
    (d / "ops_table.json").write_text(json.dumps({
        "meta": {"device": gpu, "date_utc": date, "torch": "2.9.0", "triton": "3.5.0"},
        "rows": [{"op": "gather_tokens", "shape": "vitb16-pe", "pass": "fwd", "fused_vs_reference": 3.0,
                  "fused": {"device_us": 10.0, "host_us": 40.0, "pct_peak": 80.0}, "reference": {"device_us": 30.0, "host_us": 20.0}},
                 {"op": "smooth_l1_loss", "shape": "vitb16", "pass": "fwd", "fused": {"error": "RuntimeError: boom"},
                  "reference": {"device_us": 5.0}}]}))  # fmt: skip


def test_results_table_merges_leases_from_several_gpus_and_days(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import results_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    _lease_fixture(tmp_path, "gpu-2026-12-07-h100", "NVIDIA H100 80GB HBM3", "2026-12-07 10:00", 2000.0, 1000.0)
    _lease_fixture(tmp_path, "gpu-2026-12-09-h200", "NVIDIA H200", "2026-12-09 11:00", 2600.0, 1300.0)
    cpu = tmp_path / "cpu-run"
    cpu.mkdir()
    (cpu / "train_step.json").write_text(json.dumps({"machine": {"device": "Intel Xeon", "date_utc": "2026-12-10"}, "rows": []}))
    (cpu / "broken_ops_table.json").write_text("{not json")
    assert results_table.main([str(tmp_path)]) == 0
    md = capsys.readouterr().out
    ts = [ln for ln in md.splitlines() if "ViT-B/16" in ln]
    assert len(ts) == 2 and "NVIDIA H200" in ts[0] and "NVIDIA H100" in ts[1]  # newest first, one row per lease
    assert "| 2,600 | 1,300 | 2.00× | 40.0 % | 30.0 % |" in ts[0]
    assert sum("ViT-H/14" in ln and "error: OutOfMemoryError" in ln for ln in md.splitlines()) == 2
    ops = [ln for ln in md.splitlines() if "gather_tokens" in ln]
    assert len(ops) == 2 and "| 10.0 | 30.0 | 3.00× | 80 % | 40 |" in ops[0] and "2.9.0 / 3.5.0" in ops[0]
    assert "error: RuntimeError: boom" in md and "Intel Xeon" not in md
    assert results_table.main([str(tmp_path / "missing")]) == 2


# -- the done-when test: each part fails, hangs or raises in one op / one test; the others' files still come back


_FAULT_SITE = '''
import os, sys, time
_faults = {faults!r}
_script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
_what = _faults.get(_script)
if _what == "exit":
    os._exit(3)
if _what == "hang":
    time.sleep(600)
if _what in ("op-raise", "op-hang"):  # target_tokens, the third op of the table, raises or hangs
    import fastjepa.ops

    def _target_tokens(*args, **kwargs):
        if _what == "op-hang":
            time.sleep(600)
        raise RuntimeError("injected: an illegal memory access in one op")

    fastjepa.ops.target_tokens = _target_tokens
if _what == "raise-late":  # the data benchmark raises after its per-core rows (in the all-cores phase)
    import multiprocessing

    def _get_context(*args, **kwargs):
        raise RuntimeError("injected: the all-cores phase failed")

    multiprocessing.get_context = _get_context
'''

_FAULT_PLUGIN = '''
import time
import pytest

_calls = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _calls.append(item.nodeid)
    if {mode!r} == "raise" and len(_calls) == 1:
        raise RuntimeError("injected: one test raises")
    if {mode!r} == "hang" and len(_calls) == 2:
        time.sleep(600)
'''

_FAULT_CASES = {
    # each part in turn: one op raises, one test raises, a script exits, a script hangs at once
    "raise": dict(faults={"ops_table.py": "op-raise", "train_step_table.py": "exit", "bench_data.py": "hang"}, pytest="raise",
                  boxes={"DATA": 8}, rows={"pytest -m gpu": "exit 1", "ops_table": "exit 1", "train_step_table": "exit 3",
                                           "bench_data": "TIMED OUT"}),  # fmt: skip
    # hangs inside a part (the second test, the third op), and a raise late in the data benchmark
    "hang": dict(faults={"ops_table.py": "op-hang", "train_step_table.py": "hang", "bench_data.py": "raise-late"}, pytest="hang",
                 boxes={"PYTEST": 40, "OPS": 40, "TRAIN": 8}, rows={"pytest -m gpu": "TIMED OUT", "ops_table": "TIMED OUT",
                                                                    "train_step_table": "TIMED OUT", "bench_data": "exit 1"}),  # fmt: skip
    # the preflight fails: by design nothing else runs, and the summary and the logs still come back
    "preflight": dict(faults={"-": "exit"}, pytest=None, boxes={}, rows={"preflight": "exit 3"}),
}


def _check_limits(out: Path) -> set[str]:
    import re

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    names = {p.name for p in files}
    assert not any(n.endswith(".tmp") for n in names), names
    return names


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_FAULT_CASES))
def test_gpu_check_parts_survive_each_others_failures(tmp_path, case):
    """The dry run with each part made to fail, hang past its (tiny) time box, or raise in
    one op or one test: every part still gets its row, the files of the parts that ran come
    back within the device tool's limits, and what a broken part finished is kept."""
    import tarfile

    spec = _FAULT_CASES[case]
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "sitecustomize.py").write_text(_FAULT_SITE.format(faults=spec["faults"]))
    env = {**ENV, "OUT": str(tmp_path / "out"), "GPU_CHECK_DRY": "1", "PYTHONPATH": f"{faults}{os.pathsep}{ROOT}", "GPU_CHECK_KILL_AFTER": "2"}
    if spec["pytest"]:
        (faults / "gpu_check_fault.py").write_text(_FAULT_PLUGIN.format(mode=spec["pytest"]))
        env["PYTEST_ADDOPTS"] = "-p gpu_check_fault"
    env.update({f"GPU_CHECK_BOX_{k}": str(v) for k, v in spec["boxes"].items()})
    (tmp_path / "out").mkdir()
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = tmp_path / "out"
    names = _check_limits(out)
    summary = (out / "gpu_check.md").read_text()
    for step, result in spec["rows"].items():
        assert f"| {step} | {result} |" in summary, (step, result, summary, r.stdout[-3000:])
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(m.name).name: m for m in tar.getmembers()}
        pytest_log = tar.extractfile(logs["pytest_gpu.log"]).read().decode() if "pytest_gpu.log" in logs else ""
    if case == "preflight":
        assert r.returncode == 1 and "**PREFLIGHT FAILED**" in summary and names == {"gpu_check.md", "logs.tar.gz"}
        return
    assert {"preflight.log", "pytest_gpu.log", "ops_table.log", "train_step.log", "bench_data.log"} <= set(logs), logs
    for step in ("preflight",):
        assert f"| {step} | ok |" in summary
    # pytest: one line per test as it ends, so the tests before a kill are on record; a raise costs one test
    assert "tests/ops/test_cuda_ext.py::" in pytest_log and " SKIPPED" in pytest_log, pytest_log[-2000:]
    if case == "raise":
        assert pytest_log.count(" ERROR") >= 1 and "GPU tests: 0 passed, 0 failed, 1 errors" in summary, summary
    ops = json.loads((out / "ops_table.json").read_text())
    assert "ops_table.md" in names
    done = {r["op"] for r in ops["rows"]}
    if case == "raise":  # the op after the broken one still ran; the broken one's error is in its row
        assert done == {"gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss"}, done
        (bad,) = [r for r in ops["rows"] if r["op"] == "target_tokens"]
        assert "injected" in bad["fused"]["error"] and bad["reference"]["device_us"] > 0
        assert not {"train_step.json", "data.json"} & names
    else:  # cut short in the third op: the rows before it are kept (both ops' on an unhurried machine)
        assert "gather_tokens" in done and done <= {"gather_tokens", "predictor_tokens"}, done
        data = json.loads((out / "data.json").read_text())
        assert data["sets"]["500x375"]["per_core"]["fastjepa"]["images_per_s"] > 0  # written before the late raise
        assert "data.md" in names and "train_step.json" not in names


@pytest.mark.slow
def test_contention_benchmark_runs_each_case_once(tmp_path):
    # one step per case, fastjepa's path only: the harness, not the numbers
    _run("benchmarks/bench_contention.py", "--steps", "1", "--paths", "fastjepa", "--out", str(tmp_path), "--stem", "c")
    result = json.loads((tmp_path / "c.json").read_text())
    assert [(c["path"], c["policy"]) for c in result["cases"]] == [("fastjepa", p) for p in ("torch", "passive", "fastjepa")]
    assert all(c["idle_step_s"] > 0 and c["busy_step_s"] > 0 for c in result["cases"])
    policy = {c["policy"]: c for c in result["cases"]}
    assert policy["torch"]["wait_policy_busy"] == "(default)" and policy["passive"]["wait_policy_idle"] == "PASSIVE"
    assert policy["fastjepa"]["wait_policy_busy"] == "PASSIVE" and policy["fastjepa"]["threads_busy"] < policy["torch"]["threads_busy"]
    assert "| fastjepa | fastjepa |" in (tmp_path / "c.md").read_text()

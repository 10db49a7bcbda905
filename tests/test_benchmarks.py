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

ROOT = Path(__file__).resolve().parents[1]
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
        N, D = widths[model]
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
    assert {"gpu_check.md", "logs.tar.gz", "ops_table.json", "train_step.json", "train_step.md"} <= names, names
    assert not any(n.endswith(".tmp") for n in names), names
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(m).name for m in tar.getnames()}
    assert {"preflight.log", "pytest_gpu.log", "ops_table.log", "train_step.log"} <= logs, logs
    summary = (out / "gpu_check.md").read_text()
    for part in ("preflight", "pytest -m gpu", "ops_table", "train_step_table"):
        assert f"| {part} | ok |" in summary, (part, summary)
    assert "**CUDA KERNEL (fastjepa._C, csrc/cuda): NOT BUILT, NOT TESTED.**" in summary, summary
    ops = json.loads((out / "ops_table.json").read_text())
    assert ops["meta"]["providers"] == ["reference", "fused"] and ops["failures"] == []  # no cold torch.compile by default
    assert json.loads((out / "train_step.json").read_text())["rows"][0]["result"]["imgs_per_s"] > 0


@pytest.mark.slow
def test_contention_benchmark_runs_each_case_once(tmp_path):
    # one step per case, fastjepa's path only: the harness, not the numbers
    _run("benchmarks/bench_contention.py", "--steps", "1", "--paths", "fastjepa", "--out", str(tmp_path), "--stem", "c")
    result = json.loads((tmp_path / "c.json").read_text())
    assert [(c["path"], c["policy"]) for c in result["cases"]] == [("fastjepa", "torch"), ("fastjepa", "fastjepa")]
    assert all(c["idle_step_s"] > 0 and c["busy_step_s"] > 0 for c in result["cases"])
    assert "| fastjepa | fastjepa |" in (tmp_path / "c.md").read_text()

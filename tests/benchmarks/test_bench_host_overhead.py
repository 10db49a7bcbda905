"""benchmarks/bench_host_overhead.py runs here and measures what it says: the host side
of every fused op with its kernels stubbed, beside the plain path, and puts the kernels
back afterwards. (Its numbers are timings: nothing here asserts on them.)"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.triton


def _bench():
    spec = importlib.util.spec_from_file_location("bench_host_overhead", ROOT / "benchmarks" / "bench_host_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_op_and_pass_gets_a_row_and_the_kernels_come_back():
    b = _bench()
    from fastjepa.kernels import gather_tokens as g

    real = g._gather_tokens_fwd_kernel
    rows = b.measure(rounds=1, calls=1)
    assert g._gather_tokens_fwd_kernel is real  # un-stubbed after the run
    got = {(r["op"], r["pass"]) for r in rows}
    ops = {"gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss", "sorted_predictor_tokens+take", "rope_qk"}
    assert {op for op, _ in got} == ops
    assert ("target_tokens", "fwd+bwd") not in got and ("gather_tokens", "fwd+bwd") in got
    for r in rows:
        assert r["fused_us"] > 0 and r["plain_us"] > 0 and r["ratio"] == round(r["fused_us"] / r["plain_us"], 2)
    table = b.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "fused / plain" in table


def test_every_kernel_is_stubbed_inside_the_context():
    b = _bench()
    from fastjepa.kernels import gather_tokens, rope, sorted_predictor_tokens

    with b.stubbed_kernels():
        for mod in (gather_tokens, rope, sorted_predictor_tokens):
            names = [a for a in vars(mod) if a.endswith("_kernel")]
            assert names and all(isinstance(getattr(mod, a), b._StubKernel) for a in names), mod.__name__
    assert not isinstance(rope._rope_kernel, b._StubKernel)


def test_the_script_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "host.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_host_overhead.py", "--rounds", "1", "--calls", "1", "--op", "gather_tokens",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| gather_tokens | fwd |" in r.stdout and "| gather_tokens | fwd+bwd |" in r.stdout
    assert [row["op"] for row in json.loads(out.read_text())["rows"]] == ["gather_tokens", "gather_tokens"]

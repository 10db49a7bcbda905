"""Every Triton kernel compiles for A100 (sm_80) and H100/H200 (sm_90), checked on a CPU-only machine.

The interpreter runs the kernels' Python, not Triton's compiler, so type and lowering
errors, register spills and narrow memory accesses would first show up on a GPU. The
script ``tests/kernels/_aot_compile.py`` compiles each kernel ahead of time, with the tiles its
launcher picks on a GPU and the specialisation of a ViT-B/16 or ViT-H/14 call, using the
ptxas that ships with Triton, in a subprocess without ``TRITON_INTERPRET``. Here we read
its report: every kernel compiled for both targets, none spills registers, and the bf16
row copies move their rows with 64- or 128-bit loads and stores per thread (a static
stand-in for bandwidth until a GPU measures it).

The script supports Triton 3.6 (a CUDA torch 2.11's) to 3.9: inside that range any
failure fails this test; outside it the test skips, naming the version.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP = 3  # the script's exit status for a Triton outside the versions it is written for

KERNELS = {
    "_gather_tokens_fwd_kernel", "_gather_tokens_bwd_kernel", "_predictor_tokens_fwd_kernel",
    "_predictor_tokens_bwd_ctx_kernel", "_predictor_tokens_bwd_mask_kernel", "_target_tokens_kernel",
    "_smooth_l1_fwd_kernel", "_smooth_l1_bwd_kernel",
}  # fmt: skip
# sub-32-bit global accesses that are not row copies: the mask token (one P-vector per
# program) and the upstream gradient of the mean (one scalar)
NARROW_ALLOWED = {"_predictor_tokens_fwd_kernel": 1, "_smooth_l1_bwd_kernel": 1}


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kernels" / "_aot_compile.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode == SKIP:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("DONE"), lines[-3:]
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90(report):
    got = {(r["kernel"], r["arch"], r["dtype"]) for r in report}
    want = {(k, arch, dt) for k in KERNELS for arch in (80, 90) for dt in ("fp32", "bf16", "fp16")}
    assert got >= want, sorted(want - got)
    targets = {r["arch"]: r["ptx_target"] for r in report}
    assert targets[80].startswith("sm_80") and targets[90].startswith("sm_90"), targets


@pytest.mark.slow
def test_no_kernel_spills_registers(report):
    spilled = [(r["kernel"], r["arch"], r["model"], r["dtype"], r["consts"], r["regs"], r["spill_stores"], r["spill_loads"])
               for r in report if r["spill_stores"] or r["spill_loads"]]  # fmt: skip
    assert not spilled, "kernel, arch, model, dtype, tiles, registers, spill stores / loads (bytes):\n" + "\n".join(map(str, spilled))


@pytest.mark.slow
def test_bf16_row_copies_use_wide_global_accesses(report):
    """bf16 (int32 indices): every row load and store moves >= 64 bits per thread."""
    bad = []
    for r in (r for r in report if r["dtype"] == "bf16"):
        ld = {int(b): n for b, n in r["access_bits"]["ld"].items()}
        st = {int(b): n for b, n in r["access_bits"]["st"].items()}
        name, checks = r["kernel"], r["checks"]
        where = f"{name} sm_{r['arch']} {r['model']} {r['consts']}: loads {ld}, stores {st}"
        wide_loads = sum(n for b, n in ld.items() if b >= 64)
        if wide_loads < checks["loads"]:
            bad.append(f"{where}: {wide_loads} loads of >= 64 bits, expected at least {checks['loads']} (one per data tensor)")
        if checks["stores"] and (not st or min(st) < 64):
            bad.append(f"{where}: a store under 64 bits (or none) in a kernel that writes rows")
        narrow = sum(n for b, n in {**ld, **{-b: n for b, n in st.items()}}.items() if abs(b) < 32)
        if checks["narrow"] and narrow > NARROW_ALLOWED.get(name, 0):
            bad.append(f"{where}: {narrow} accesses under 32 bits, expected at most {NARROW_ALLOWED.get(name, 0)}")
    assert not bad, "\n".join(bad)


def test_access_widths_are_read_from_ptx():
    """The PTX reader behind the width test: vector and scalar forms, predicates, cache hints."""
    sys.path.insert(0, str(ROOT / "tests" / "kernels"))
    try:
        from _aot_compile import access_widths
    finally:
        sys.path.remove(str(ROOT / "tests" / "kernels"))
    ptx = "\n".join([
        "\t@%p9 ld.global.b32 { %r42 }, [ %rd35 + 0 ];",
        "\t@%p10 ld.global.v4.b32 { %r46, %r47, %r48, %r49 }, [ %rd39 + 0 ];",
        "\t@!%p3 ld.global.L1::evict_last.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ];",
        "\tld.global.b16 %rs1, [ %rd2 + 0 ];",
        "\t@%p14 st.global.v4.b32 [ %rd47 + 0 ], { %r78, %r79, %r80, %r81 };",
        "\t@%p1 st.global.b64 [ %rd3 + 0 ], %rd4;",
        "\t@%p2 red.global.add.f32 [ %rd5 + 0 ], %r9;",  # an atomic: not a plain store
        "\tld.shared.v4.b32 { %r1, %r2, %r3, %r4 }, [ %r5 + 0 ];",  # not global
    ])  # fmt: skip
    assert access_widths(ptx) == {"ld": {32: 1, 128: 1, 64: 1, 16: 1}, "st": {128: 1, 64: 1}}


@pytest.mark.slow
def test_gather_reads_the_patch_embeddings_transposed_layout_slots_fastest(report):
    """x with strides (N·D, 1, N) (training's layout): the forward's first 2-D load is x's
    (BLOCK_D, BLOCK_R) tile, and its thread layout runs along the slots (the last axis
    fastest, at least 8 threads of a warp side by side there), so that a warp reads
    neighbouring tokens of a channel, not one 32-byte sector per thread."""
    rows = [r for r in report if r["kernel"] == "_gather_tokens_fwd_kernel" and r["consts"]["SLOT_MAJOR"]]
    assert {(r["arch"], r["dtype"]) for r in rows} >= {(a, d) for a in (80, 90) for d in ("fp32", "bf16", "fp16")}
    for r in rows:
        first = r["load_orders"][0]
        c = r["consts"]
        assert first["shape"] == [c["BLOCK_D"], c["BLOCK_R"]], (r["arch"], r["dtype"], first)
        assert first["order"][0] == 1 and first["threads"][1] >= 8, (r["arch"], r["dtype"], first)

"""One table for all fused ops: time, GB/s against minimal bytes, speedups.

    python benchmarks/ops_table.py [--dtype bf16] [--ops gather_tokens,...] [--out FILE]

For every op, shape and pass (fwd, fwd+bwd) it checks each provider against the
reference once, then times the reference, the torch.compile'd reference and the fused
(Triton) path. It prints a markdown table and writes JSON (default
``benchmarks/results/ops_table_<device>.json``). GB/s counts the minimal bytes each op
must move (see each ``bench_<op>.py``); "% peak" compares with a measured device-to-device
copy. On a GPU the shapes are ViT-B/16 and ViT-H/14 at 224 (B=128, N=256, Kc=70, Kt=44,
P=384, npred=4); without one the kernels run through the Triton interpreter on tiny
shapes, which proves the harness, not the speed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from pathlib import Path

import torch
from _common import DEVICE, ON_GPU, PROVIDERS, check, measure, sync  # sets TRITON_INTERPRET on CPU

from fastjepa.checkpoint import atomic_write_text  # noqa: E402 — _common put the checkout on sys.path

OPS = ("gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def copy_bandwidth() -> float | None:
    """Measured device-to-device copy GB/s (read + write), the ceiling for these ops."""
    if not ON_GPU:
        return None
    src = torch.empty(256 * 2**20, dtype=torch.float32, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def run_op(op: str, dtype: torch.dtype, iters: int | None, peak: float | None,
           providers: tuple[str, ...] = PROVIDERS) -> tuple[list[dict], list[str]]:  # fmt: skip
    module = importlib.import_module(f"bench_{op}")
    rows, failures = [], []
    for shape in module.SHAPES:
        case = module.make_case(shape, dtype=dtype)
        for pass_ in case.passes:
            row = {"op": op, "shape": shape, "pass": pass_, "dtype": str(dtype).removeprefix("torch."), "min_bytes": case.bytes[pass_],
                   "providers": list(providers)}  # fmt: skip
            for provider in PROVIDERS:
                if provider not in providers:
                    row[provider] = None
                    continue
                try:
                    check(case, provider, pass_)
                except AssertionError as exc:
                    failures.append(f"{op}/{shape}/{pass_}/{provider}: {exc}")
                    row[provider] = None
                    continue
                seconds = measure(case.run[provider][pass_], iters=iters)
                gbs = case.bytes[pass_] / seconds / 1e9
                row[provider] = {"ms": seconds * 1e3, "GB/s": gbs, "pct_peak": (100 * gbs / peak) if peak else None}
            ref, comp, fused = (row[p] for p in PROVIDERS)
            row["speedup_vs_reference"] = ref["ms"] / fused["ms"] if ref and fused else None
            row["speedup_vs_compiled"] = comp["ms"] / fused["ms"] if comp and fused else None
            rows.append(row)
        del case  # free this shape's inputs before the next one
        sync()
        if ON_GPU:
            torch.cuda.empty_cache()
    return rows, failures


def markdown(rows: list[dict], peak: float | None) -> str:
    def cell(r, p):
        v = r[p]
        if v is None:
            return "mismatch" if p in r.get("providers", PROVIDERS) else "not run"
        pct = f", {v['pct_peak']:.0f}%" if v["pct_peak"] is not None else ""
        return f"{v['ms']:.3f} ms ({v['GB/s']:.3g} GB/s{pct})"

    def x(v):
        return "–" if v is None else f"{v:.2f}×"

    head = "| op | shape | pass | reference | compiled | fused | fused vs ref | fused vs compiled |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['pass']} | {cell(r, 'reference')} | {cell(r, 'compiled')} | {cell(r, 'fused')} "
            f"| {x(r['speedup_vs_reference'])} | {x(r['speedup_vs_compiled'])} |"
        )
    if peak:
        lines.append(f"\n% = share of the measured copy bandwidth ({peak:.0f} GB/s).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16" if ON_GPU else "fp32")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ", ".join(OPS))
    parser.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 50 on GPU, 3 on CPU)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/ops_table_<device>.json)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated subset of " + ", ".join(PROVIDERS) + " (reference is always checked against)")  # fmt: skip
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"--ops: unknown {', '.join(unknown)}; expected some of {', '.join(OPS)}")
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    bad = sorted(set(providers) - set(PROVIDERS))
    if bad or "reference" not in providers:
        parser.error(f"--providers: got {args.providers!r}; expected some of {', '.join(PROVIDERS)}, reference included")
    dtype = DTYPES[args.dtype]
    device = torch.cuda.get_device_name() if ON_GPU else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    out = args.out or Path(__file__).resolve().parent / "results" / f"ops_table_{DEVICE.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    triton = importlib.import_module("triton")
    peak = copy_bandwidth()
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype, "copy_GB/s": peak,
            "providers": list(providers)}  # fmt: skip
    rows, failures = [], []
    for op in ops:  # the JSON is rewritten after every op: a run cut short keeps the ops it finished
        r, f = run_op(op, dtype, args.iters, peak, providers)
        rows += r
        failures += f
        atomic_write_text(out, json.dumps({"meta": meta, "rows": rows, "failures": failures, "done": ops[: ops.index(op) + 1]}, indent=2))
    print(f"device: {device}; torch {torch.__version__}; dtype {args.dtype}\n")
    print(markdown(rows, peak))
    print(f"\nwrote {out}")
    for f in failures:
        print("MISMATCH", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

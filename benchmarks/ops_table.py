"""One table for all fused ops: device time, host time, GB/s against the copy peak, ratios.

    python benchmarks/ops_table.py [--dtype bf16] [--ops gather_tokens,...] [--out FILE]

For every op, shape and pass (fwd, fwd+bwd) it checks each provider against the
reference once, then times the reference, (optionally) the torch.compile'd reference and
the fused path with :func:`_common.time_calls`: many calls back to back between one pair
of CUDA events, behind a GPU sleep so the host's launch gaps are not timed, rotating input
sets that together exceed twice the L2 (so no call reads what the previous one left in
the cache). Reported per provider: device µs per call, host µs per call (Python, dispatch,
checks, launch: what the GPU waits for when the host is the bottleneck), GB/s of the
minimal bytes (see each ``bench_<op>.py``) and its share of the measured device-to-device
copy bandwidth; then fused vs reference (device times). On a GPU the shapes are ViT-B/16
and ViT-H/14 at 224, plus ``gather_tokens`` on the layout training feeds it (the patch
embedding's transposed view); without one the kernels run through the Triton interpreter
on tiny shapes, which proves the harness, not the speed.

Every op, shape, pass and provider records its own error (any exception) in its row and
the run goes on; the JSON (``--out``) and the markdown next to it (``.md``) are rewritten
after every row, so a run cut short keeps every row it finished.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
from _common import DEVICE, ON_GPU, PROVIDERS, check, copy_peak_gbs, input_sets, l2_bytes, sync, time_calls  # sets TRITON_INTERPRET on CPU

from fastjepa.checkpoint import atomic_write_text  # noqa: E402 — _common put the checkout on sys.path

OPS = ("gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _error(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {str(exc).strip()[:400]}{where}"


def _free() -> None:
    try:
        sync()
        if ON_GPU:
            torch.cuda.empty_cache()
    except Exception:  # a broken CUDA context: the next row records its own error
        pass


def run_op(op: str, dtype: torch.dtype, iters: int | None, peak: float | None, providers: tuple[str, ...] = PROVIDERS,
           emit=lambda row: None, l2: int | None = None, timer=None) -> list[dict]:  # fmt: skip
    """Rows of one op (every shape and pass); ``emit(row)`` after each. Errors are recorded
    in the row (``row[provider] = {"error": ...}`` or ``row["error"]``), never raised."""
    rows: list[dict] = []
    l2 = l2_bytes() if l2 is None else l2
    try:
        module = importlib.import_module(f"bench_{op}")
        shapes = list(module.SHAPES)
    except Exception as exc:
        row = {"op": op, "shape": "–", "pass": "–", "error": f"import bench_{op}: {_error(exc)}"}
        rows.append(row)
        emit(row)
        return rows
    for shape in shapes:
        cases = []
        try:
            cases.append(module.make_case(shape, dtype=dtype))
            sets = input_sets(min(cases[0].bytes.values()), l2)  # the pass that touches least: still past 2x L2
            cases += [module.make_case(shape, dtype=dtype) for _ in range(sets - 1)]
        except Exception as exc:
            row = {"op": op, "shape": shape, "pass": "–", "error": f"inputs: {_error(exc)}"}
            rows.append(row)
            emit(row)
            cases = []
            _free()
            continue
        for pass_ in cases[0].passes:
            row = {"op": op, "shape": shape, "pass": pass_, "dtype": str(dtype).removeprefix("torch."),
                   "min_bytes": cases[0].bytes[pass_], "providers": list(providers), "input_sets": len(cases),
                   "l2_bytes": l2}  # fmt: skip
            for provider in PROVIDERS:
                if provider not in providers:
                    row[provider] = None
                    continue
                try:
                    check(cases[0], provider, pass_)
                    t = time_calls([c.run[provider][pass_] for c in cases], calls=iters, timer=timer)
                    gbs = cases[0].bytes[pass_] / t.device_s / 1e9 if t.device_s > 0 else None
                    row[provider] = {"device_us": 1e6 * t.device_s, "host_us": 1e6 * t.host_s, "calls": t.calls, "GB/s": gbs,
                                     "pct_peak": (100 * gbs / peak) if peak and gbs else None}  # fmt: skip
                except Exception as exc:  # a mismatch, a kernel error, out of memory: this cell only
                    row[provider] = {"error": _error(exc)}
                    _free()
            ref, comp, fused = (row[p] if row[p] and "error" not in row[p] else None for p in PROVIDERS)
            row["fused_vs_reference"] = ref["device_us"] / fused["device_us"] if ref and fused and fused["device_us"] else None
            row["fused_vs_compiled"] = comp["device_us"] / fused["device_us"] if comp and fused and fused["device_us"] else None
            row["host_fused_vs_reference"] = fused["host_us"] / ref["host_us"] if ref and fused and ref["host_us"] else None
            rows.append(row)
            emit(row)
        del cases  # free this shape's inputs before the next one
        _free()
    return rows


def errors(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"{r['op']}/{r['shape']}: {r['error']}")
        for p in PROVIDERS:
            if isinstance(r.get(p), dict) and "error" in r[p]:
                out.append(f"{r['op']}/{r['shape']}/{r['pass']}/{p}: {r[p]['error']}")
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    def cell(r, p):
        v = r.get(p)
        if v is None:
            return "not run"
        if "error" in v:
            return "ERROR: " + v["error"][:80].replace("|", "/").replace("\n", " ")
        pct = f", {v['pct_peak']:.0f} %" if v.get("pct_peak") is not None else ""
        gbs = f"{v['GB/s']:.3g} GB/s{pct}" if v.get("GB/s") is not None else "–"
        return f"{v['device_us']:.1f} µs · {gbs} · host {v['host_us']:.0f} µs"

    def x(v):
        return "–" if v is None else f"{v:.2f}×"

    provs = [p for p in PROVIDERS if p in meta.get("providers", PROVIDERS)]
    head = "| op | shape | pass | " + " | ".join(provs) + " | fused vs reference | fused host / reference host |"
    lines = [head, "|" + "---|" * (5 + len(provs))]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['pass']} | ERROR: {r['error'][:120]} |" + " |" * (len(provs) + 1))
            continue
        lines.append(f"| {r['op']} | {r['shape']} | {r['pass']} | " + " | ".join(cell(r, p) for p in provs)
                     + f" | {x(r.get('fused_vs_reference'))} | {x(r.get('host_fused_vs_reference'))} |")  # fmt: skip
    peak = meta.get("copy_GB/s")
    lines += ["", f"Device: {meta['device']} · torch {meta['torch']} · Triton {meta['triton']} · {meta['dtype']}. "
              "Cells: device µs per call (calls back to back between one CUDA event pair, input sets rotated past 2× L2) · "
              "GB/s of the minimal bytes" + (f" (% of the measured copy peak, {peak:.0f} GB/s)" if peak else "")
              + " · host µs per call (issuing it, the GPU kept busy)."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16" if ON_GPU else "fp32")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ", ".join(OPS))
    parser.add_argument("--iters", type=int, default=None, help="calls between the two events (default 20 on GPU, 2 on CPU)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/ops_table_<device>.json); "
                        "the markdown goes next to it (.md)")  # fmt: skip
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
    md_out = out.with_suffix(".md")
    triton = importlib.import_module("triton")
    try:
        peak = copy_peak_gbs()
    except Exception as exc:
        print(f"copy peak not measured: {_error(exc)}", file=sys.stderr)
        peak = None
    meta = {"device": device, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype, "copy_GB/s": peak,
            "l2_bytes": l2_bytes(), "providers": list(providers), "timing": "device: CUDA events around back-to-back calls"
            if ON_GPU else "wall clock (Triton interpreter)"}  # fmt: skip
    rows: list[dict] = []

    def emit(row: dict) -> None:  # after every row: a run cut short keeps the rows it finished
        rows.append(row)
        atomic_write_text(out, json.dumps({"meta": meta, "rows": rows, "failures": errors(rows)}, indent=2))
        atomic_write_text(md_out, markdown(rows, meta) + "\n")
        print(f"{row['op']} {row['shape']} {row['pass']}: " + ", ".join(
            f"{p} {'ERROR' if isinstance(row.get(p), dict) and 'error' in row[p] else 'ok' if row.get(p) else '-'}"
            for p in providers) + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)  # fmt: skip

    for op in ops:
        run_op(op, dtype, args.iters, peak, providers, emit=emit)
    print(f"\ndevice: {device}; torch {torch.__version__}; dtype {args.dtype}\n")
    print(markdown(rows, meta))
    print(f"\nwrote {out} and {md_out}")
    failures = errors(rows)
    for f in failures:
        print("FAILED", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

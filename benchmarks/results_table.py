"""The README's GPU tables from every lease's results under benchmarks/results/.

    python benchmarks/results_table.py [RESULTS_DIR ...]   # markdown to stdout

Each lease's ``$OUT`` is kept as a folder of its own (e.g.
``benchmarks/results/gpu-2026-12-07-h100/``: ``gpu_check.md``, ``ops_table.json``,
``train_step.json``, ``data.json``); leases may be on different GPUs and days. This reads
every ``train_step.json`` and ``ops_table.json`` below the given folders (default
``benchmarks/results``) that ran on a GPU and prints, newest first:

* the training step: images/s of fastjepa and of the reference step per model, the
  speed-up, MFU against the measured and the datasheet peak, peak memory;
* the fused ops: device µs per call of the fused op and the reference, fused vs
  reference, the fused op's share of the measured copy bandwidth.

Rows carry the GPU, the date and torch / Triton, so numbers from different leases are
never mixed into one figure. A CPU run (no GPU in its device name) is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPU_WORDS = ("NVIDIA", "H100", "H200", "A100", "GH200", "L40", "RTX", "Tesla", "AMD Instinct")


def _is_gpu(name: str) -> bool:
    return any(w.lower() in name.lower() for w in GPU_WORDS)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _lease(path: Path, roots: list[Path]) -> str:
    for r in roots:
        try:
            rel = path.parent.relative_to(r)
        except ValueError:
            continue
        return str(rel) if str(rel) != "." else path.parent.name
    return path.parent.name


def train_step_rows(roots: list[Path]) -> list[dict]:
    rows = []
    for root in roots:
        for path in sorted(root.rglob("*train_step*.json")):
            data = _load(path)
            if not data or "machine" not in data or not _is_gpu(data["machine"].get("device", "")):
                continue
            m = data["machine"]
            by_model: dict[str, dict] = {}
            for r in data.get("rows", []):
                by_model.setdefault(r["model"], {})[r["path"]] = r["result"]
            for model, paths in by_model.items():
                fj, ref = paths.get("fastjepa", {}), paths.get("reference", {})
                ok = "error" not in fj and "imgs_per_s" in fj
                rows.append({
                    "gpu": m["device"], "date": m.get("date_utc", "?"), "torch": m.get("torch", "?"), "lease": _lease(path, roots),
                    "model": model, "batch": fj.get("batch"), "fastjepa": fj.get("imgs_per_s") if ok else None,
                    "reference": ref.get("imgs_per_s") if "error" not in ref else None, "mfu": fj.get("mfu") if ok else None,
                    "mfu_datasheet": fj.get("mfu_datasheet") if ok else None, "mem": fj.get("peak_mem_gib") if ok else None,
                    "ref_mem": ref.get("peak_mem_gib") if "error" not in ref else None,
                    "compiles": fj.get("timed_triton_compiles"), "error": fj.get("error") or ref.get("error"),
                })  # fmt: skip
    return sorted(rows, key=lambda r: (r["date"], r["gpu"]), reverse=True)


def ops_rows(roots: list[Path]) -> list[dict]:
    rows = []
    for root in roots:
        for path in sorted(root.rglob("*ops_table*.json")):
            data = _load(path)
            if not data or "meta" not in data or not _is_gpu(data["meta"].get("device", "")):
                continue
            meta = data["meta"]
            for r in data.get("rows", []):
                fused, ref = r.get("fused") or {}, r.get("reference") or {}
                rows.append({
                    "gpu": meta["device"], "date": meta.get("date_utc", "?"), "torch": meta.get("torch", "?"),
                    "triton": meta.get("triton", "?"), "op": r["op"], "shape": r["shape"], "pass": r["pass"],
                    "fused_us": fused.get("device_us"), "ref_us": ref.get("device_us"), "ratio": r.get("fused_vs_reference"),
                    "pct_peak": fused.get("pct_peak"), "host_us": fused.get("host_us"),
                    "error": r.get("error") or fused.get("error") or ref.get("error"),
                })  # fmt: skip
    return sorted(rows, key=lambda r: (r["date"], r["gpu"]), reverse=True)


def _f(v, fmt: str, unit: str = "") -> str:
    return "–" if v is None else f"{v:{fmt}}{unit}"


def markdown(roots: list[Path]) -> str:
    ts, ops = train_step_rows(roots), ops_rows(roots)
    out = []
    if ts:
        out += ["| GPU | date (UTC) | model | batch | fastjepa img/s | reference img/s | speed-up | MFU (measured peak) "
                "| MFU (datasheet) | peak mem GiB (fastjepa / reference) | torch |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in ts:
            if r["fastjepa"] is None:
                out.append(f"| {r['gpu']} | {r['date']} | {r['model']} | | error: {(r['error'] or '?')[:80]} | | | | | | {r['torch']} |")
                continue
            speed = r["fastjepa"] / r["reference"] if r["reference"] else None
            out.append(
                f"| {r['gpu']} | {r['date']} | {r['model']} | {_f(r['batch'], 'd')} | {r['fastjepa']:,.0f} | {_f(r['reference'], ',.0f')} "
                f"| {_f(speed, '.2f', '×')} | {_f(r['mfu'] and 100 * r['mfu'], '.1f', ' %')} "
                f"| {_f(r['mfu_datasheet'] and 100 * r['mfu_datasheet'], '.1f', ' %')} | {_f(r['mem'], '.1f')} / {_f(r['ref_mem'], '.1f')} | {r['torch']} |"
            )
    if ops:
        out += [""] if out else []
        out += ["| GPU | date (UTC) | op | shape | pass | fused µs | reference µs | fused vs reference "
                "| fused, % of copy peak | fused host µs | torch / Triton |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in ops:
            if r["error"]:
                out.append(f"| {r['gpu']} | {r['date']} | {r['op']} | {r['shape']} | {r['pass']} | error: {r['error'][:80]} | | | | | "
                           f"{r['torch']} / {r['triton']} |")  # fmt: skip
                continue
            out.append(
                f"| {r['gpu']} | {r['date']} | {r['op']} | {r['shape']} | {r['pass']} | {_f(r['fused_us'], '.1f')} | {_f(r['ref_us'], '.1f')} "
                f"| {_f(r['ratio'], '.2f', '×')} | {_f(r['pct_peak'], '.0f', ' %')} | {_f(r['host_us'], '.0f')} | {r['torch']} / {r['triton']} |"
            )
    if not out:
        return "No GPU results under " + ", ".join(str(r) for r in roots) + "."
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="*", type=Path, default=[HERE / "results"], help="folders to search (default benchmarks/results)")
    args = ap.parse_args(argv)
    missing = [str(r) for r in args.roots if not r.is_dir()]
    if missing:
        print(f"results_table.py: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(markdown(args.roots))
    return 0


if __name__ == "__main__":
    sys.exit(main())

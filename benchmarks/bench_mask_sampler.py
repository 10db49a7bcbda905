"""Multi-block mask sampler: Python collator loop vs the C++ extension (one call per batch).

    python benchmarks/bench_mask_sampler.py [--batch 128] [--grid 16] [--out benchmarks/results]

Published I-JEPA mask settings on the ViT-H/14 grid (224 / 14 = 16×16). Both paths sample
the default mode (inclusive corner range, seeded); before timing, both are checked for the
same invariants and for matching mean mask lengths over a few hundred batches. Reports
batches/s and images/s (one image = nenc context + npred target masks) and the speedup;
writes ``cpu-<date>-mask_sampler.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import time

import torch

if importlib.util.find_spec("fastjepa") is None:  # a source checkout run as `python benchmarks/...`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _report import cpu_name, write_report  # noqa: E402

from fastjepa.masks import MaskCollator  # noqa: E402

PUBLISHED = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10)


def timed(fn, min_seconds: float, min_calls: int) -> tuple[float, int]:
    """Seconds per call (median of 5 rounds), after one warm-up call."""
    fn()
    rounds = []
    for _ in range(5):
        calls, t0 = 0, time.perf_counter()
        while calls < min_calls or time.perf_counter() - t0 < min_seconds / 5:
            fn()
            calls += 1
        rounds.append((time.perf_counter() - t0) / calls)
    rounds.sort()
    return rounds[2], calls


def check_same_thing(col_py: MaskCollator, col_cpp: MaskCollator, B: int, batches: int = 200) -> dict:
    """Both paths give valid masks with matching mean lengths (the sizes follow one draw per batch)."""
    g = torch.Generator().manual_seed(0)
    stats = {}
    for name, sample in (
        ("python", lambda i: col_py.sample(B, g)),
        ("cpp", lambda i: col_cpp._sample_cpp(B, col_cpp.batch_seed(i))),
    ):
        kc, kt = [], []
        for i in range(batches if name == "cpp" else batches // 10):
            enc, pred = sample(i)
            assert len(enc) == 1 and len(pred) == 4 and enc[0].shape[0] == B
            t = torch.cat(pred, 1)
            for b in range(0, B, 16):
                assert not set(enc[0][b].tolist()) & set(t[b].tolist()), "context overlaps a target"
            kc.append(enc[0].size(1))
            kt.append(pred[0].size(1))
        stats[name] = {"mean_Kc": sum(kc) / len(kc), "mean_Kt": sum(kt) / len(kt), "batches": len(kc)}
    assert abs(stats["python"]["mean_Kt"] - stats["cpp"]["mean_Kt"]) < 6, stats
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per path (about)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a shared machine")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    B, patch = args.batch, 14
    kw = dict(input_size=args.grid * patch, patch_size=patch, seed=1, **PUBLISHED)
    col_py = MaskCollator(backend="python", **kw)
    col_cpp = MaskCollator(backend="cpp", **kw)
    check = check_same_thing(col_py, col_cpp, B)

    g = torch.Generator().manual_seed(1)
    t_py, _ = timed(lambda: col_py.sample(B, g), args.seconds, 2)
    counter = iter(range(10**9))
    t_cpp, _ = timed(lambda: col_cpp._sample_cpp(B, col_cpp.batch_seed(next(counter))), args.seconds, 50)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": B,
        "grid": f"{args.grid}x{args.grid}",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in PUBLISHED.items()},
        "python": {"s_per_batch": t_py, "images_per_s": B / t_py, "batches_per_s": 1 / t_py},
        "cpp": {"s_per_batch": t_cpp, "images_per_s": B / t_cpp, "batches_per_s": 1 / t_cpp},
        "speedup": t_py / t_cpp,
        "check": check,
    }
    table = [
        f"# Mask sampler, B={B}, {result['grid']} grid ({result['date']})",
        "",
        f"CPU: {result['cpu']}, {result['threads']} torch threads, torch {result['torch']}. Published I-JEPA settings "
        "(enc 0.85–1.0, pred 0.15–0.2, aspect 0.75–1.5, 1 context + 4 targets, min_keep 10).",
        "",
        "| path | ms / batch | batches / s | images / s |",
        "|---|---:|---:|---:|",
        f"| python (MaskCollator.sample) | {t_py * 1e3:.2f} | {1 / t_py:,.1f} | {B / t_py:,.0f} |",
        f"| cpp (fastjepa._C sample_masks) | {t_cpp * 1e3:.3f} | {1 / t_cpp:,.0f} | {B / t_cpp:,.0f} |",
        "",
        f"Speedup: **{result['speedup']:.0f}×** (target ≥ 20×). Check before timing: both valid and disjoint, "
        f"mean target length python {check['python']['mean_Kt']:.1f} vs cpp {check['cpp']['mean_Kt']:.1f}.",
    ]
    print("\n".join(table))
    write_report(args.out, f"cpu-{result['date'][:10]}-mask_sampler", result, "\n".join(table))


if __name__ == "__main__":
    main()

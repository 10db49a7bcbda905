"""3-D multi-block mask sampler (V-JEPA 2's masks): Python loop vs the C++ extension, per batch.

    python benchmarks/bench_mask_sampler3d.py [--batch 24] [--frames 16] [--crop 256] [--out benchmarks/results]

V-JEPA 2's published pretraining masks (8 blocks at 15 % and 2 blocks at 70 % of the frame,
all frames, aspect 0.75–1.5) on its ViT-L/16 clip: 16 frames, tubelet 2, 256 px -> an
8×16×16 token grid. One batch = both mask configurations for ``--batch`` clips. Three
paths in the same run: ``compat="reference"`` (V-JEPA 2's procedure, global RNG), the
Python fastjepa mode and the C++ sampler (same distribution). Before timing, the Python
fastjepa mode and C++ are checked for valid masks and matching mean mask lengths.
Writes ``cpu-<date>-mask_sampler3d.{json,md}``.
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

from fastjepa.masks.multiblock3d import MaskCollator3D  # noqa: E402

PUBLISHED = [
    dict(spatial_scale=(0.15, 0.15), temporal_scale=(1.0, 1.0), aspect_ratio=(0.75, 1.5), num_blocks=8, max_temporal_keep=1.0),
    dict(spatial_scale=(0.7, 0.7), temporal_scale=(1.0, 1.0), aspect_ratio=(0.75, 1.5), num_blocks=2, max_temporal_keep=1.0),
]


def timed(fn, min_seconds: float, min_calls: int) -> float:
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
    return rounds[2]


def masks_of(col: MaskCollator3D, B: int):
    (gens,) = col.mask_generators.values()
    return [gen(B) for gen in gens]  # per config (enc (B, Kc), pred (B, Kt))


def check_same_thing(col_py: MaskCollator3D, col_cpp: MaskCollator3D, B: int, N: int, batches: int) -> dict:
    """Both give valid, disjoint masks; mean context lengths agree (the target lengths too)."""
    stats = {}
    for name, col in (("python", col_py), ("cpp", col_cpp)):
        kc, kt = [[] for _ in PUBLISHED], [[] for _ in PUBLISHED]
        for _ in range(batches):
            for i, (enc, pred) in enumerate(masks_of(col, B)):
                assert enc.shape[0] == pred.shape[0] == B and enc.size(1) >= 1
                assert int(enc.max()) < N and int(pred.max()) < N
                assert not set(enc[0].tolist()) & set(pred[0].tolist()), "context overlaps the target"
                kc[i].append(enc.size(1))
                kt[i].append(pred.size(1))
        stats[name] = {"mean_Kc": [sum(v) / len(v) for v in kc], "mean_Kt": [sum(v) / len(v) for v in kt], "batches": batches}
    for i in range(len(PUBLISHED)):
        a, b = stats["python"]["mean_Kc"][i], stats["cpp"]["mean_Kc"][i]
        assert abs(a - b) <= 0.1 * max(a, b) + 5, stats  # loose: a harness check, the tests compare distributions
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per path (about)")
    ap.add_argument("--check-batches", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a shared machine")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    B = args.batch
    kw = dict(cfgs_mask=PUBLISHED, dataset_fpcs=[args.frames], crop_size=args.crop, patch_size=16, tubelet_size=2, seed=1)
    col_ref = MaskCollator3D(compat="reference", backend="python", **kw)
    col_py = MaskCollator3D(backend="python", **kw)
    col_cpp = MaskCollator3D(backend="cpp", **kw)
    T, H, W = args.frames // 2, args.crop // 16, args.crop // 16
    check = check_same_thing(col_py, col_cpp, B, T * H * W, args.check_batches)

    t_ref = timed(lambda: masks_of(col_ref, B), args.seconds, 2)
    t_py = timed(lambda: masks_of(col_py, B), args.seconds, 2)
    t_cpp = timed(lambda: masks_of(col_cpp, B), args.seconds, 20)
    paths = {"reference": t_ref, "python": t_py, "cpp": t_cpp}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": B,
        "grid": f"{T}x{H}x{W}",
        "settings": [{k: list(v) if isinstance(v, tuple) else v for k, v in c.items()} for c in PUBLISHED],
        **{name: {"s_per_batch": t, "clips_per_s": B / t, "batches_per_s": 1 / t} for name, t in paths.items()},
        "speedup_vs_reference": t_ref / t_cpp,
        "speedup_vs_python": t_py / t_cpp,
        "check": check,
    }
    table = [
        f"# 3-D mask sampler, B={B}, {result['grid']} grid ({result['date']})",
        "",
        f"CPU: {result['cpu']}, {result['threads']} torch threads, torch {result['torch']}. V-JEPA 2's published masks "
        "(8 blocks at 15 % + 2 blocks at 70 % of the frame, all frames, aspect 0.75–1.5); one batch = both configurations.",
        "",
        "| path | ms / batch | batches / s | clips / s |",
        "|---|---:|---:|---:|",
        f"| reference (V-JEPA 2's procedure) | {t_ref * 1e3:.2f} | {1 / t_ref:,.1f} | {B / t_ref:,.0f} |",
        f"| python (fastjepa mode) | {t_py * 1e3:.2f} | {1 / t_py:,.1f} | {B / t_py:,.0f} |",
        f"| cpp (fastjepa._C sample_masks3d) | {t_cpp * 1e3:.3f} | {1 / t_cpp:,.0f} | {B / t_cpp:,.0f} |",
        "",
        f"Speedup of C++: **{result['speedup_vs_reference']:.0f}×** over the reference procedure, "
        f"{result['speedup_vs_python']:.0f}× over the Python fastjepa mode. Check before timing: valid, disjoint; mean "
        f"context length python {check['python']['mean_Kc'][0]:.1f} / {check['python']['mean_Kc'][1]:.1f} vs cpp "
        f"{check['cpp']['mean_Kc'][0]:.1f} / {check['cpp']['mean_Kc'][1]:.1f}.",
    ]
    print("\n".join(table))
    write_report(args.out, f"cpu-{result['date'][:10]}-mask_sampler3d", result, "\n".join(table))


if __name__ == "__main__":
    main()

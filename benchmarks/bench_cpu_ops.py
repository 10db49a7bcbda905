"""CPU fused ops of fastjepa._C vs the pure-PyTorch references, forward and forward+backward.

    python benchmarks/bench_cpu_ops.py [--batch 16] [--dtypes float32,bfloat16] [--out benchmarks/results]

CPU benchmark shape: a ViT-S/16-sized step on 224 crops — B images, N = 196 tokens,
D = 384, predictor width P = 192, masks from the sampler with the published settings
(1 context of ~150 tokens, 4 targets of ~30). Each op is checked against its reference
once before timing (same outputs and gradients within the dtype's tolerance). Writes
``cpu-<date>-cpu_ops.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import sys
import time

import torch

if importlib.util.find_spec("fastjepa") is None:  # a source checkout run as `python benchmarks/...`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _report import cpu_name, write_report  # noqa: E402
from bench_mask_sampler import PUBLISHED  # noqa: E402

from fastjepa.masks import MaskCollator  # noqa: E402
from fastjepa.ops import gather_tokens_reference, predictor_tokens_reference, target_tokens_reference  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 5e-2)}  # (rtol, atol)


def timed(fn, seconds: float) -> float:
    """Median seconds per call over 5 rounds, after two warm-up calls."""
    fn()
    fn()
    rounds = []
    for _ in range(5):
        calls, t0 = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - t0 < seconds / 5:
            fn()
            calls += 1
        rounds.append((time.perf_counter() - t0) / calls)
    return sorted(rounds)[2]


def cases(B: int, dtype: torch.dtype):
    """op -> (inputs factory, reference fn, cpp fn, which inputs get gradients)."""
    from fastjepa.ops import cpp

    N, D, P = 196, 384, 192
    col = MaskCollator(input_size=224, patch_size=16, seed=0, backend="cpp", **PUBLISHED)
    enc, pred = col._sample_cpp(B, 7)
    idx_x, idx = torch.stack(enc), torch.stack(pred)  # (1, B, Kc), (4, B, Kt)
    x = torch.randn(B, N, D, dtype=dtype)
    pos = torch.randn(1, N, D, dtype=dtype)
    ctx = torch.randn(B, idx_x.size(2), P, dtype=dtype)
    ppos, mt = torch.randn(1, N, P, dtype=dtype), torch.randn(1, 1, P, dtype=dtype)
    return {
        "gather_tokens": ((x, pos), lambda x, p: gather_tokens_reference(x, enc, p), lambda x, p: cpp.gather_tokens(x, idx_x, p), (0,)),
        "predictor_tokens": (
            (ctx, ppos, mt),
            lambda c, p, m: predictor_tokens_reference(c, enc, pred, p, m),
            lambda c, p, m: cpp.predictor_tokens(c, idx_x, idx, p, m),
            (0, 2),
        ),
        "target_tokens": ((x,), lambda h: target_tokens_reference(h, pred, 1), lambda h: cpp.target_tokens(h, idx, 1), ()),
    }


def run_pass(fn, inputs, leaves, grad):
    """Forward (no graph) when ``grad`` is None, else forward + backward into fresh leaves."""
    if grad is None:
        with torch.no_grad():
            return (fn(*inputs),)
    args = [t.detach().requires_grad_(i in leaves) for i, t in enumerate(inputs)]
    out = fn(*args)
    out.backward(grad)
    return (out.detach(), *(args[i].grad for i in leaves))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per provider and pass (about)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a shared machine")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = []
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        for op, (inputs, ref, cpp, leaves) in cases(args.batch, dtype).items():
            with torch.no_grad():
                out_shape = ref(*inputs).shape
            grad = torch.randn(out_shape, dtype=dtype)
            for pname, g in (("fwd", None), ("fwd+bwd", grad)):
                if g is not None and not leaves:
                    continue
                rtol, atol = TOL[dtype]
                for a, b in zip(run_pass(ref, inputs, leaves, g), run_pass(cpp, inputs, leaves, g)):
                    torch.testing.assert_close(b, a, rtol=rtol, atol=atol * max(1.0, float(a.abs().max())))
                t_ref = timed(functools.partial(run_pass, ref, inputs, leaves, g), args.seconds)
                t_cpp = timed(functools.partial(run_pass, cpp, inputs, leaves, g), args.seconds)
                rows.append({"op": op, "dtype": dname, "pass": pname, "reference_ms": t_ref * 1e3, "cpp_ms": t_cpp * 1e3,
                             "speedup": t_ref / t_cpp})
                print(f"{op:17s} {dname:9s} {pname:8s} reference {t_ref * 1e3:8.3f} ms  cpp {t_cpp * 1e3:8.3f} ms  {t_ref / t_cpp:5.1f}x")

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result = {"date": date, "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "shape": {"B": args.batch, "N": 196, "D": 384, "P": 192, "nenc": 1, "npred": 4}, "rows": rows}
    table = [
        f"# CPU fused ops vs reference ({date})",
        "",
        f"CPU: {result['cpu']}, {result['threads']} torch threads, torch {result['torch']}. Shape: B={args.batch}, "
        "N=196, D=384, P=192, masks from the sampler with the published settings (1 context, 4 targets). "
        "Outputs and gradients checked against the reference before timing. Median of 5 rounds.",
        "",
        "| op | dtype | pass | reference ms | cpp ms | speedup |",
        "|---|---|---|---:|---:|---:|",
    ] + [f"| {r['op']} | {r['dtype']} | {r['pass']} | {r['reference_ms']:.3f} | {r['cpp_ms']:.3f} | {r['speedup']:.1f}× |" for r in rows]
    print("\n".join(table))
    write_report(args.out, f"cpu-{date[:10]}-cpu_ops", result, "\n".join(table))


if __name__ == "__main__":
    main()

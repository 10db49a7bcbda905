"""Host overhead of the fused ops: what a call costs the CPU before any kernel runs.

On a GPU the fused ops are short (a ViT-B gather moves ~20 MB: microseconds), so the
Python around a launch — argument checks, backend choice, custom-op dispatch, autograd,
index preparation, output allocation — can cost more than the kernel. This script
measures that part alone, on the CPU: every Triton kernel is replaced by a stub that
returns at once, and each op's fused path (forced ``triton`` backend, CPU tensors,
``TRITON_INTERPRET=1`` so that dispatch accepts them) is timed beside its plain-PyTorch
path (the op's reference: ``x + pos`` and an index for the gather, and so on), in the same
process, interleaved round by round, at tiny shapes where the plain path's own arithmetic
is negligible.

    python benchmarks/bench_host_overhead.py [--rounds 30] [--calls 50] [--json FILE]

Columns: host CPU µs per call (this thread's CPU time, median over rounds) of the fused path and of the plain path,
forward alone and forward + backward, and fused / plain. A ratio is only meaningful
against the plain path measured in the same run; on a shared machine both move together,
the absolute microseconds do not mean much. What the stubbed kernels would have done is
not counted: this is the floor a GPU step pays per call.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors may take the triton backend; the kernels are stubbed anyway

if importlib.util.find_spec("fastjepa") is None:  # a source checkout run as `python benchmarks/...`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fastjepa import ops  # noqa: E402
from fastjepa.ops._dispatch import kernels  # noqa: E402

KERNEL_MODULES = ("gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss", "sorted_predictor_tokens", "rope")


class _StubKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` returns at once."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


@contextlib.contextmanager
def stubbed_kernels():
    """Every Triton kernel of ``fastjepa.kernels`` replaced by :class:`_StubKernel`."""
    kernels()
    saved = []
    for name in KERNEL_MODULES:
        mod = importlib.import_module("fastjepa.kernels." + name)
        for attr in [a for a in vars(mod) if a.endswith("_kernel")]:
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, _StubKernel())
    try:
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


def cases(dtype: torch.dtype = torch.float32) -> dict[str, dict[str, Callable[[], object]]]:
    """op -> {"fused": fn, "plain": fn, "backward": bool}; each fn runs one call and returns
    a tensor (or tuple) whose sum is the backward's root when the op has one."""
    B, N, D, P, Kc, Kt, nenc, npred, nh = 4, 16, 32, 32, 8, 4, 1, 4, 2
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    def sorted_idx(n_masks, k):
        return [torch.sort(torch.randperm(N, generator=g).view(1, N).expand(B, N)[:, :k], dim=1).values for _ in range(n_masks)]

    x, pos = rnd(B, N, D), rnd(1, N, D, grad=False)
    masks_x, masks = sorted_idx(nenc, Kc), sorted_idx(npred, Kt)
    ctx, ppos, mt = rnd(nenc * B, Kc, P), rnd(1, N, P, grad=False), rnd(1, 1, P)
    h = rnd(B, N, D, grad=False)
    z, zt = rnd(npred * nenc * B, Kt, D), rnd(npred * nenc * B, Kt, D, grad=False)
    sx, sy = sorted_idx(1, Kc), sorted_idx(1, Kt)
    sctx = rnd(B, Kc, P)
    q, k = rnd(B, nh, Kc + Kt, 12), rnd(B, nh, Kc + Kt, 12)
    ids = torch.cat([sx[0], sy[0]], dim=1).sort(dim=1).values
    grid = (4, 4)

    def sorted_fused():
        y, _, order = ops.sorted_predictor_tokens(sctx, sx, sy, mt, ppos)
        return ops.sorted_predictor_take_targets(y, order)

    def sorted_plain():
        y, _, order = ops.sorted_predictor_tokens_reference(sctx, sx, sy, mt, ppos)
        return ops.sorted_predictor_take_targets_reference(y, order)

    return {
        "gather_tokens": dict(
            fused=lambda: ops.gather_tokens(x, masks_x, pos),
            plain=lambda: ops.gather_tokens_reference(x, masks_x, pos),  # x + pos, then the index
            backward=True,
        ),
        "predictor_tokens": dict(
            fused=lambda: ops.predictor_tokens(ctx, masks_x, masks, ppos, mt),
            plain=lambda: ops.predictor_tokens_reference(ctx, masks_x, masks, ppos, mt),
            backward=True,
        ),
        "target_tokens": dict(
            fused=lambda: ops.target_tokens(h, masks, nenc),
            plain=lambda: ops.target_tokens_reference(h, masks, nenc),
            backward=False,
        ),
        "smooth_l1_loss": dict(
            fused=lambda: ops.smooth_l1_loss(z, zt),
            plain=lambda: ops.smooth_l1_loss_reference(z, zt),
            backward=True,
        ),
        "sorted_predictor_tokens+take": dict(fused=sorted_fused, plain=sorted_plain, backward=True),
        "rope_qk": dict(
            fused=lambda: ops.rope_qk(q, k, ids, grid),
            plain=lambda: ops.rope_qk_reference(q, k, ids, grid),
            backward=True,
        ),
    }


def _root(out) -> torch.Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    total = outs[0].sum()
    for o in outs[1:]:
        total = total + o.sum()
    return total


def _time(fn: Callable[[], object], calls: int, backward: bool) -> float:
    """Host CPU µs per call of ``fn`` (``backward``: forward, a sum and the backward).

    This thread's CPU time, not the wall clock: on a shared machine the time the process
    waits for a core is not the op's cost."""
    t0 = time.thread_time_ns()
    if backward:
        for _ in range(calls):
            _root(fn()).backward()
    else:
        for _ in range(calls):
            fn()
    return (time.thread_time_ns() - t0) / calls / 1e3


def measure(rounds: int = 30, calls: int = 50, only: list[str] | None = None) -> list[dict]:
    """One row per (op, pass): medians over ``rounds`` interleaved rounds."""
    torch.set_num_threads(1)
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    with stubbed_kernels(), ops.use_backend("triton"):
        table = {name: c for name, c in cases().items() if only is None or name in only}
        jobs = []
        for name, c in table.items():
            jobs.append((name, "fwd", False, c))
            if c["backward"]:
                jobs.append((name, "fwd+bwd", True, c))
        for name, kind, bwd, c in jobs:  # warm-up: first-call imports and caches
            for path in ("fused", "plain"):
                _time(c[path], 3, bwd)
        for r in range(rounds):
            for name, kind, bwd, c in jobs:
                # forward alone is timed with autograd recording, as in training; the two
                # paths alternate which goes first
                for path in ("fused", "plain") if r % 2 == 0 else ("plain", "fused"):
                    rows.setdefault((name, kind), {"fused": [], "plain": []})[path].append(_time(c[path], calls, bwd))
    out = []
    for (name, kind), t in rows.items():
        # the ratio of the printed (rounded) columns, so that a reader dividing them gets it
        fused, plain = round(statistics.median(t["fused"]), 1), round(statistics.median(t["plain"]), 1)
        out.append({"op": name, "pass": kind, "fused_us": fused, "plain_us": plain, "ratio": round(fused / plain, 2) if plain else float("inf")})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| op | pass | fused host CPU µs/call | plain host CPU µs/call | fused / plain |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['pass']} | {r['fused_us']:.1f} | {r['plain_us']:.1f} | {r['ratio']:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds (the median is reported)")
    ap.add_argument("--calls", type=int, default=50, help="calls per timing")
    ap.add_argument("--op", action="append", help="only this op (repeatable)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    rows = measure(args.rounds, args.calls, args.op)
    print(f"host CPU time per call, kernels stubbed, torch {torch.__version__}, 1 thread, medians of {args.rounds} rounds")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rounds": args.rounds, "calls": args.calls, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

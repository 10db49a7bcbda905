"""Benchmark ``rope_qk`` (3-D RoPE of q and k): V-JEPA 2's chain, reference, compiled, fused.

    pytest benchmarks/bench_rope.py                     # pytest-benchmark cases (CPU: tiny)
    python benchmarks/bench_rope.py [--quick]           # table: fused vs V-JEPA 2's chain, GB/s

``vjepa2_chain`` restates what V-JEPA 2's ``RoPEAttention`` runs per layer: positions split
from the ids (repeated over heads), then for q and for k three rotations that each rebuild
omega and the sin/cos tables, repeat them to the part width and swap pairs with
unflatten / stack, and a concatenation. ``fused`` is :func:`fastjepa.ops.rope_qk` with the
Triton backend (``cpp`` is the C++ CPU kernel). GPU shapes: V-JEPA 2 ViT-L/16 at 256 px, 16
frames, tubelet 2 (8×16×16 = 2,048 tokens), batch 24: the encoder's 16 heads of 64 (all
tokens, ids None) and the predictor's 12 heads of 32 (sorted ids of all 2,048 positions).

Minimal bytes: forward reads q and k and writes both (plus the ids); backward reads the two
upstream gradients and writes the two input gradients (plus the ids).
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
from _common import DEVICE, DTYPE, ON_GPU, Case, bench, check, gpu_shapes, measure, with_backend  # sets TRITON_INTERPRET on CPU

from fastjepa.ops import available
from fastjepa.ops.rope import rope_qk, rope_qk_reference

GPU_SHAPES = {
    "encoder": dict(B=24, heads=16, N=2048, head_dim=64, grid=(8, 16, 16), ids=False),
    "predictor": dict(B=24, heads=12, N=2048, head_dim=32, grid=(8, 16, 16), ids=True),
}
CPU_SHAPES = {
    "tiny": dict(B=2, heads=2, N=32, head_dim=64, grid=(2, 4, 4), ids=True),
}
SHAPES = gpu_shapes(cpu=CPU_SHAPES, gpu=GPU_SHAPES)
PROVIDERS = ("vjepa2_chain", "reference", "compiled", "fused")


def _rotate(x, pos):
    """One V-JEPA 2 rotation of all of x's last dim by pos, tables rebuilt on every call."""
    D = x.size(-1)
    omega = torch.arange(D // 2, dtype=x.dtype, device=x.device)
    omega /= D / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    freq = pos[..., None] * omega  # (..., N, D/2)
    sin = torch.cat([freq.sin(), freq.sin()], dim=-1)  # the whole-table repeat (the duplicated frequencies)
    cos = torch.cat([freq.cos(), freq.cos()], dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs.unbind(dim=-1)
    swapped = torch.stack((-b, a), dim=-1).flatten(-2)
    return x * cos + swapped * sin


def vjepa2_chain(q, k, ids, grid):
    """V-JEPA 2's RoPEAttention rotation of q and k (B, heads, N, head_dim), as it runs."""
    B, heads, N, D = q.shape
    H, W = grid[-2], grid[-1]
    if ids is None:
        t = torch.arange(N, device=q.device)
    else:
        t = ids.unsqueeze(1).repeat(1, heads, 1)  # (B, heads, N)
    frame = t // (H * W)
    row = (t - frame * H * W) // W
    col = t - frame * H * W - row * W
    d = 2 * ((D // 3) // 2)
    out = []
    for x in (q, k):
        parts = [_rotate(x[..., i * d : (i + 1) * d], pos) for i, pos in enumerate((frame, row, col))]
        out.append(torch.cat(parts + [x[..., 3 * d :]], dim=-1))
    return tuple(out)


def _passes(forward, q, k, ids, grid, gq, gk):
    def fwd():
        with torch.no_grad():
            return forward(q, k, ids, grid)

    ql, kl = q.detach().requires_grad_(), k.detach().requires_grad_()

    def fwd_bwd():
        qo, ko = forward(ql, kl, ids, grid)
        return (qo.detach(), ko.detach(), *torch.autograd.grad((qo, ko), (ql, kl), (gq, gk)))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def make_case(shape: str, device=DEVICE, dtype=DTYPE, fused_backend: str = "triton") -> Case:
    s = SHAPES[shape] if shape in SHAPES else {**CPU_SHAPES, **GPU_SHAPES}[shape]
    B, heads, N, D, grid = s["B"], s["heads"], s["N"], s["head_dim"], s["grid"]
    qkv = torch.randn(B, N, 3, heads, D, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)  # V-JEPA 2's q, k views
    q, k = qkv[0], qkv[1]  # (B, heads, N, head_dim), strided
    ids = None
    if s["ids"]:
        bound = grid[0] * grid[1] * grid[2]
        ids = torch.rand(B, bound, device=device).argsort(dim=1)[:, :N].sort(dim=1).values  # (B, N) sorted positions
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    e, idb = q.element_size(), (0 if ids is None else ids.numel() * 8)
    case = Case("rope", shape, dtype)
    case.bytes = {"fwd": 4 * q.numel() * e + idb, "fwd+bwd": 8 * q.numel() * e + 2 * idb}
    compiled = torch.compile(rope_qk_reference, dynamic=False)
    forwards = {
        "vjepa2_chain": vjepa2_chain,
        "reference": rope_qk_reference,
        "compiled": compiled,
        "fused": with_backend(fused_backend, rope_qk),
    }
    case.run = {name: _passes(fn, q, k, ids, grid, gq, gk) for name, fn in forwards.items()}
    return case


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rope(benchmark, shape, provider, pass_):
    bench(benchmark, make_case(shape), provider, pass_)


def copy_bandwidth() -> float | None:
    """Measured device-to-device copy GB/s (read + write): the memory floor's rate."""
    if not ON_GPU:
        return None
    src = torch.empty(256 * 2**20, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / measure(lambda: dst.copy_(src), warmup=3, iters=20) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one CPU-sized case, 1 timed call (a harness check)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 50 on GPU, 3 on CPU)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    shapes = ["tiny"] if args.quick or not ON_GPU else list(GPU_SHAPES)
    iters = 1 if args.quick else args.iters
    backends = ["triton"] + (["cpp"] if not ON_GPU and available()["cpp"] else [])
    peak = copy_bandwidth()
    rows = []
    print("| shape | pass | fused | chain ms | fused ms | speed-up | fused GB/s | % of copy |\n|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for backend in backends:
            dtype = DTYPE
            case = make_case(shape, dtype=dtype, fused_backend=backend)
            for pass_ in case.passes:
                check(case, "fused", pass_)
                check(case, "vjepa2_chain", pass_)
                chain = measure(case.run["vjepa2_chain"][pass_], iters=iters)
                fused = measure(case.run["fused"][pass_], iters=iters)
                gbs = case.bytes[pass_] / fused / 1e9
                pct = f"{100 * gbs / peak:.0f} %" if peak else "-"
                rows.append(dict(shape=shape, pass_=pass_, backend=backend, dtype=str(dtype), chain_ms=chain * 1e3,
                                 fused_ms=fused * 1e3, speedup=chain / fused, gbs=gbs, copy_gbs=peak))  # fmt: skip
                print(f"| {shape} | {pass_} | {backend} | {chain * 1e3:.3f} | {fused * 1e3:.3f} | {chain / fused:.2f}x "
                      f"| {gbs:.1f} | {pct} |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(DEVICE), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

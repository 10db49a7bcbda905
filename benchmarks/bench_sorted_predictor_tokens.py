"""Benchmark the sorted predictor input and its un-sort against V-JEPA 2's chain, same run.

    pytest benchmarks/bench_sorted_predictor_tokens.py       # GPU: ViT-L/16 video shapes; CPU: tiny
    python benchmarks/bench_sorted_predictor_tokens.py       # a table: median ms per provider
    python benchmarks/bench_sorted_predictor_tokens.py --quick   # each provider once, checked

What is timed: building the predictor input from the embedded context (the pos table added
at the context and target positions, the mask token, the per-row sort by position), one
stand-in for the predictor blocks (a token-mean mix, the same in every provider), then the
un-sort and take of the target tokens; fwd, and fwd+bwd for the ctx and mask-token grads.

Providers: ``reference`` (fastjepa's pure-PyTorch reference), ``vjepa2`` (V-JEPA 2's chain,
restated here: repeat, gather, repeat-interleave, cat, argsort, a Python loop over rows to
sort, the argsort of the argsort and another loop to un-sort), ``fused`` (the Triton
kernels), ``cpp`` (the C++ kernels; CPU only). Each is checked against the reference first.

GPU shape (issue 16): V-JEPA 2 ViT-L/16 at 256 px, 16 frames, tubelet 2 -> 8x16x16 = 2,048
tokens, predictor 384 wide, batch 24, one mask pair per call. Context sizes are the
expected uncovered share of the frame: 0.85^8 of it for 8 blocks at 15 % (559 tokens),
0.3^2 for 2 blocks at 70 % (184); the targets are the rest (complement masks).
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from _common import (  # sets TRITON_INTERPRET on CPU
    DEVICE,
    DTYPE,
    ON_GPU,
    Case,
    bench,
    check,
    gpu_shapes,
    measure,
    passes,
    with_backend,
)

from fastjepa.ops import (
    available,
    sorted_predictor_take_targets,
    sorted_predictor_take_targets_reference,
    sorted_predictor_tokens_reference,
)
from fastjepa.ops import sorted_predictor_tokens as sorted_tokens
from fastjepa.ops.sorted_predictor_tokens import _cpp_has_op

GPU_SHAPES = {
    "vitl16-8x15%": dict(B=24, N=2048, P=384, Kc=559, Kt=1489),
    "vitl16-2x70%": dict(B=24, N=2048, P=384, Kc=184, Kt=1864),
}
SHAPES = gpu_shapes(cpu={"tiny": dict(B=2, N=64, P=32, Kc=17, Kt=47)}, gpu=GPU_SHAPES)
HAVE_CPP = bool(available()["cpp"]) and _cpp_has_op()
PROVIDERS = ("reference", "vjepa2", "fused") + (("cpp",) if HAVE_CPP and not ON_GPU else ())


def mix(x: torch.Tensor) -> torch.Tensor:
    """Stand-in for the predictor blocks: every token sees every other (so every input gets a gradient)."""
    return x + x.mean(dim=1, keepdim=True)


# -- V-JEPA 2's chain, restated ----------------------------------------------------------


def _apply_masks(x, masks):
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in masks], dim=0)


def _repeat_interleave_batch(x, B, repeat):
    N = len(x) // B
    return torch.cat([torch.cat([x[i * B : (i + 1) * B] for _ in range(repeat)], dim=0) for i in range(N)], dim=0)


def vjepa2_chain(ctx, masks_x, masks_y, mask_token, pos):
    """V-JEPA 2's predictor input and output handling around the blocks (pos table, no class token)."""
    B = len(ctx) // len(masks_x)
    N = pos.size(1)
    x = ctx + _apply_masks(pos.repeat(B, 1, 1), masks_x)
    n_ctxt = x.size(1)
    tokens = _apply_masks(mask_token.repeat(B, N, 1), masks_y)
    tokens = tokens + _repeat_interleave_batch(_apply_masks(pos.repeat(B, 1, 1), masks_y), B, repeat=len(masks_x))
    x = torch.cat([x.repeat(len(masks_x), 1, 1), tokens], dim=1)
    masks = torch.cat([torch.cat(masks_x, dim=0), torch.cat(masks_y, dim=0)], dim=1)
    argsort = torch.argsort(masks, dim=1)
    masks = torch.stack([masks[i, row] for i, row in enumerate(argsort)], dim=0)  # what RoPE blocks take
    x = torch.stack([x[i, row, :] for i, row in enumerate(argsort)], dim=0)
    x = mix(x)
    reverse = torch.argsort(argsort, dim=1)
    x = torch.stack([x[i, row, :] for i, row in enumerate(reverse)], dim=0)
    return x[:, n_ctxt:]


def reference_chain(ctx, masks_x, masks_y, mask_token, pos):
    x, _, order = sorted_predictor_tokens_reference(ctx, masks_x, masks_y, mask_token, pos)
    return sorted_predictor_take_targets_reference(mix(x), order)


def fused_chain(ctx, masks_x, masks_y, mask_token, pos):
    x, _, order = sorted_tokens(ctx, masks_x, masks_y, mask_token, pos)
    return sorted_predictor_take_targets(mix(x), order)


# -- cases -------------------------------------------------------------------------------


def complement_masks(B, N, Kc, Kt, device):
    """A context of Kc sorted distinct positions and Kt sorted positions of its complement."""
    perm = torch.rand(B, N, device=device).argsort(dim=1)
    return [perm[:, :Kc].sort(dim=1).values], [perm[:, Kc : Kc + Kt].sort(dim=1).values]


def make_case(shape: str, device=DEVICE, dtype=DTYPE) -> Case:
    s = SHAPES[shape]
    B, N, P, Kc, Kt = (s[k] for k in ("B", "N", "P", "Kc", "Kt"))
    ctx = torch.randn(B, Kc, P, device=device, dtype=dtype)
    pos = torch.randn(1, N, P, device=device, dtype=dtype)
    mask_token = torch.randn(1, 1, P, device=device, dtype=dtype)
    masks_x, masks_y = complement_masks(B, N, Kc, Kt, device)
    grad = torch.randn(B, Kt, P, device=device, dtype=dtype)
    e, i, L = ctx.element_size(), 8, Kc + Kt
    # the op alone: read ctx, the pos rows, the masks; write the sorted sequence; take Kt rows back
    fwd = B * Kc * P * e + B * L * P * e + B * L * i + B * L * P * e + 2 * B * Kt * P * e
    bwd = 2 * B * Kt * P * e + B * L * P * e + B * Kc * P * e + B * L * i
    case = Case("sorted_predictor_tokens", shape, dtype)
    case.bytes = {"fwd": fwd, "fwd+bwd": fwd + bwd}
    args, leaves = (ctx, masks_x, masks_y, mask_token, pos), (0, 3)
    case.run = {
        "reference": passes(reference_chain, args, leaves, grad),
        "vjepa2": passes(vjepa2_chain, args, leaves, grad),
        "fused": passes(with_backend("triton", fused_chain), args, leaves, grad),
    }
    if "cpp" in PROVIDERS:
        case.run["cpp"] = passes(with_backend("cpp", fused_chain), args, leaves, grad)
    return case


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sorted_predictor_tokens(benchmark, shape, provider, pass_):
    bench(benchmark, make_case(shape), provider, pass_)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="run and check each provider once at the tiny CPU shape, no timing")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per provider (default: 50 on a GPU, 3 on the CPU)")
    args = parser.parse_args(argv)
    print(f"device {DEVICE}, dtype {DTYPE}")
    print("| shape | pass | " + " | ".join(f"{p} ms" for p in PROVIDERS) + " | vjepa2 / best fused |")
    print("|---|---|" + "---|" * (len(PROVIDERS) + 1))
    for shape in SHAPES:
        case = make_case(shape)
        for pass_ in case.passes:
            times = {}
            for provider in PROVIDERS:
                check(case, provider, pass_)
                times[provider] = 0.0 if args.quick else measure(case.run[provider][pass_], iters=args.iters) * 1e3
            fused = min(times[p] for p in PROVIDERS if p in ("fused", "cpp"))
            ratio = f"{times['vjepa2'] / fused:.2f}x" if fused > 0 else "-"
            print(f"| {shape} | {pass_} | " + " | ".join(f"{times[p]:.3f}" for p in PROVIDERS) + f" | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark ``predictor_tokens`` (batched predictor input): reference, compiled, fused.

    pytest benchmarks/bench_predictor_tokens.py         # GPU: ViT-B/16, ViT-H/14; CPU: tiny

Minimal bytes: forward reads ctx, the pos table, the mask token and the indices once and
writes the (npred·nenc·B, Kc+Kt, P) output; backward reads the upstream gradient and
writes the ctx and mask-token gradients. (P = 384 for both published models.)
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, DTYPE, PROVIDERS, Case, bench, block_masks, gpu_shapes, providers  # sets TRITON_INTERPRET on CPU

from fastjepa.ops import predictor_tokens, predictor_tokens_reference

# at 224 px: ViT-B/16 has 196 patches, ViT-H/14 256; a target block ~17 %, the context ~27 %
GPU_SHAPES = {
    "vitb16": dict(B=128, N=196, P=384, nenc=1, npred=4, Kc=54, Kt=34),
    "vith14": dict(B=128, N=256, P=384, nenc=1, npred=4, Kc=70, Kt=44),
}
SHAPES = gpu_shapes(cpu={"tiny": dict(B=2, N=16, P=48, nenc=1, npred=4, Kc=7, Kt=3)}, gpu=GPU_SHAPES)


def make_case(shape: str, device=DEVICE, dtype=DTYPE) -> Case:
    s = SHAPES[shape]
    B, N, P, nenc, npred, Kc, Kt = (s[k] for k in ("B", "N", "P", "nenc", "npred", "Kc", "Kt"))
    ctx = torch.randn(nenc * B, Kc, P, device=device, dtype=dtype)
    pos = torch.randn(1, N, P, device=device, dtype=dtype)
    mask_token = torch.randn(1, 1, P, device=device, dtype=dtype)
    masks_x = block_masks(nenc, B, N, Kc, device)
    masks = block_masks(npred, B, N, Kt, device)
    R = npred * nenc * B
    grad = torch.randn(R, Kc + Kt, P, device=device, dtype=dtype)
    e, i = ctx.element_size(), 8
    fwd = nenc * B * Kc * P * e + N * P * e + P * e + (nenc * Kc + npred * Kt) * B * i + R * (Kc + Kt) * P * e
    bwd = R * (Kc + Kt) * P * e + nenc * B * Kc * P * e + P * e
    case = Case("predictor_tokens", shape, dtype)
    case.bytes = {"fwd": fwd, "fwd+bwd": fwd + bwd}
    case.run = providers(predictor_tokens_reference, predictor_tokens, (ctx, masks_x, masks, pos, mask_token), (0, 4), grad)
    return case


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_predictor_tokens(benchmark, shape, provider, pass_):
    bench(benchmark, make_case(shape), provider, pass_)

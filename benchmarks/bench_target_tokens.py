"""Benchmark ``target_tokens`` (layer-norm + gather + repeat): reference, compiled, fused.

    pytest benchmarks/bench_target_tokens.py            # GPU: ViT-B/16, ViT-H/14; CPU: tiny

Minimal bytes: read each gathered row of h once (npred·B·Kt rows) and the indices, write
the (npred·nenc·B, Kt, D) output. The reference normalises all B·N rows first.
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, DTYPE, PROVIDERS, Case, bench, block_masks, gpu_shapes, providers  # sets TRITON_INTERPRET on CPU

from fastjepa.ops import target_tokens, target_tokens_reference

# at 224 px: ViT-B/16 has 196 patches, ViT-H/14 256; a target block ~17 %
GPU_SHAPES = {
    "vitb16": dict(B=128, N=196, D=768, npred=4, nenc=1, Kt=34),
    "vith14": dict(B=128, N=256, D=1280, npred=4, nenc=1, Kt=44),
}
SHAPES = gpu_shapes(cpu={"tiny": dict(B=2, N=16, D=64, npred=4, nenc=1, Kt=3)}, gpu=GPU_SHAPES)


def make_case(shape: str, device=DEVICE, dtype=DTYPE) -> Case:
    s = SHAPES[shape]
    B, N, D, npred, nenc, Kt = (s[k] for k in ("B", "N", "D", "npred", "nenc", "Kt"))
    h = torch.randn(B, N, D, device=device, dtype=dtype)
    masks = block_masks(npred, B, N, Kt, device)
    e, i = h.element_size(), 8
    rows = npred * B * Kt
    case = Case("target_tokens", shape, dtype)
    case.bytes = {"fwd": rows * D * e + rows * i + nenc * rows * D * e}
    case.run = providers(target_tokens_reference, target_tokens, (h, masks, nenc), (), None)
    return case


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_target_tokens(benchmark, shape, provider):
    bench(benchmark, make_case(shape), provider, "fwd")

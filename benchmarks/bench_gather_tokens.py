"""Benchmark ``gather_tokens`` (context gather + pos-embed): reference, compiled, fused.

    pytest benchmarks/bench_gather_tokens.py            # GPU: ViT-B/16, ViT-H/14; CPU: tiny
    python benchmarks/ops_table.py                      # all ops, one table + JSON

Minimal bytes: forward reads the kept rows of x, the pos table and the indices and writes
the output; backward reads the upstream gradient and the indices and writes all of x's
gradient (zeros included).
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, DTYPE, PROVIDERS, Case, bench, block_masks, gpu_shapes, providers  # sets TRITON_INTERPRET on CPU

from fastjepa.ops import gather_tokens, gather_tokens_reference

# at 224 px: ViT-B/16 has 14x14 = 196 patches, ViT-H/14 16x16 = 256; the context keeps ~27 %.
# "-pe": x as training feeds it, the patch embedding's output conv_out.flatten(2).transpose(1, 2),
# a view with strides (N*D, 1, N) rather than a contiguous (B, N, D)
GPU_SHAPES = {"vitb16": dict(B=128, N=196, D=768, M=1, K=54), "vith14": dict(B=128, N=256, D=1280, M=1, K=70),
              "vitb16-pe": dict(B=128, N=196, D=768, M=1, K=54, layout="patch_embed")}  # fmt: skip
SHAPES = gpu_shapes(cpu={"tiny": dict(B=2, N=16, D=64, M=1, K=7), "tiny-pe": dict(B=2, N=16, D=64, M=1, K=7, layout="patch_embed")},
                    gpu=GPU_SHAPES)  # fmt: skip


def patch_embed_layout(B: int, N: int, D: int, device, dtype) -> torch.Tensor:
    """(B, N, D) as the patch embedding returns it: the (B, D, h, w) conv output flattened
    and transposed, strides (N*D, 1, N)."""
    return torch.randn(B, D, N, device=device, dtype=dtype).transpose(1, 2)


def make_case(shape: str, device=DEVICE, dtype=DTYPE) -> Case:
    s = SHAPES[shape]
    B, N, D, M, K = s["B"], s["N"], s["D"], s["M"], s["K"]
    x = patch_embed_layout(B, N, D, device, dtype) if s.get("layout") == "patch_embed" else torch.randn(B, N, D, device=device, dtype=dtype)
    pos = torch.randn(1, N, D, device=device, dtype=dtype)
    masks = block_masks(M, B, N, K, device)
    grad = torch.randn(M * B, K, D, device=device, dtype=dtype)
    e, i = x.element_size(), 8
    rows = M * B * K
    case = Case("gather_tokens", shape, dtype)
    case.bytes = {
        "fwd": rows * D * e + N * D * e + rows * i + rows * D * e,
        "fwd+bwd": (rows * D * e + N * D * e + rows * i + rows * D * e) + (rows * D * e + rows * i + B * N * D * e),
    }
    case.run = providers(gather_tokens_reference, gather_tokens, (x, masks, pos), (0,), grad)
    return case


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gather_tokens(benchmark, shape, provider, pass_):
    bench(benchmark, make_case(shape), provider, pass_)

"""Benchmark ``smooth_l1_loss`` (beta 1, mean): reference (ATen), compiled, fused (Triton).

    pytest benchmarks/bench_smooth_l1_loss.py           # GPU: ViT-B/16, ViT-H/14; CPU: tiny

Minimal bytes: forward reads z and h once; backward reads z and h and writes z's gradient.
PyTorch's own forward (one reduction) and backward (one elementwise kernel) already move
exactly these bytes, so the fused kernels can at best match it: this benchmark is the
evidence for the answer to "Is the loss fused?" in docs/ops.md.
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, DTYPE, PROVIDERS, Case, bench, gpu_shapes, providers  # sets TRITON_INTERPRET on CPU

from fastjepa.ops import smooth_l1_loss, smooth_l1_loss_reference

GPU_SHAPES = {"vitb16": dict(R=512, Kt=34, D=768), "vith14": dict(R=512, Kt=44, D=1280)}  # R = npred·nenc·B; Kt ~17 % of N
SHAPES = gpu_shapes(cpu={"tiny": dict(R=8, Kt=3, D=64)}, gpu=GPU_SHAPES)


def make_case(shape: str, device=DEVICE, dtype=DTYPE) -> Case:
    s = SHAPES[shape]
    z = torch.randn(s["R"], s["Kt"], s["D"], device=device, dtype=dtype)
    h = torch.randn_like(z)
    n, e = z.numel(), z.element_size()
    case = Case("smooth_l1_loss", shape, dtype)
    case.bytes = {"fwd": 2 * n * e, "fwd+bwd": 2 * n * e + 3 * n * e}
    grad = torch.ones((), device=device, dtype=dtype)
    case.run = providers(smooth_l1_loss_reference, smooth_l1_loss, (z, h), (0,), grad)
    return case


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_smooth_l1_loss(benchmark, shape, provider, pass_):
    bench(benchmark, make_case(shape), provider, pass_)

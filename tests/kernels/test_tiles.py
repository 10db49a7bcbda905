"""The GPU's tile choices compute the same results, run here in the interpreter.

On a GPU the launchers cut rows into column tiles of at most 256 and change the rows per
program (``fastjepa.kernels._tiles``); the interpreter tests use the interpreter's own,
larger tiles. These tests force the GPU choice at the ViT widths (where it differs) on
small row counts and compare with the reference, forward and backward, repeated indices
and poisoned outputs included. ``tests/kernels/test_compile.py`` compiles the same choices
for sm_80 and sm_90.
"""

import sys

import pytest
import torch

from fastjepa.ops import (
    gather_tokens,
    gather_tokens_reference,
    predictor_tokens,
    predictor_tokens_reference,
    target_tokens,
    target_tokens_reference,
    use_backend,
)
from fastjepa.ops._dispatch import kernels

pytestmark = pytest.mark.triton  # the interpreter on the CPU: skipped where this Triton's cannot run


@pytest.fixture
def gpu_tiles(monkeypatch):
    kernels()
    tiles = sys.modules["fastjepa.kernels._tiles"]
    monkeypatch.setattr(tiles, "interpreting", lambda: False)
    return tiles


def test_the_gpu_choice_differs_from_the_interpreters_where_it_matters(gpu_tiles):
    t = gpu_tiles
    assert t.row_tiles(1000, 768, gpu=True).block_d == 256 and t.row_tiles(1000, 768, gpu=False).block_d == 1024
    assert t.row_tiles(1000, 1280, gpu=True).block_d == 256
    assert t.row_tiles(1000, 384, gpu=True).block_d == 128
    assert t.row_tiles(10, 768).block_d == 256  # gpu=None follows interpreting(), patched here
    wide = t.whole_row_tiles(1000, 1280, gpu=True)
    assert (wide.block_d, wide.block_r, wide.num_warps) == (2048, 2, 8)
    pt = sys.modules["fastjepa.kernels.predictor_tokens"]
    assert pt.token_tiles(384, 44, mask_grad=True, gpu=True).block_r == 16
    assert pt.token_tiles(384, 44, mask_grad=True, gpu=False).block_r == 32


@pytest.mark.parametrize("D", [768, 1280])
@pytest.mark.parametrize("pos_grad", [False, True])
def test_gather_tokens_with_gpu_tiles(gpu_tiles, poison_empty, D, pos_grad):
    B, N, M, K = 2, 11, 2, 13  # K > N: repeated indices within and across masks
    x = torch.randn(B, N, D, requires_grad=True)
    pos = torch.randn(1, N, D, requires_grad=pos_grad)
    masks = [torch.randint(0, N, (B, K)) for _ in range(M)]
    grad = torch.randn(M * B, K, D)
    with use_backend("triton"):
        out = gather_tokens(x, masks, pos)
    got = torch.autograd.grad(out, [x, pos] if pos_grad else [x], grad)
    ref = gather_tokens_reference(x, masks, pos)
    want = torch.autograd.grad(ref, [x, pos] if pos_grad else [x], grad)
    torch.testing.assert_close(out, ref)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [768, 200])
def test_gather_tokens_on_the_patch_embeddings_layout_with_gpu_tiles(gpu_tiles, poison_empty, D):
    """x = conv(img).flatten(2).transpose(1, 2), strides (N·D, 1, N): the slot-major tiles
    (64 slots × 64 channels, several row and channel tiles here, a partial last one at
    D = 200), forward and backward, pos trainable."""
    B, N, M, K = 3, 50, 2, 41  # 246 slots: four row tiles, the last one partial
    x = torch.randn(B, D, N).transpose(1, 2).requires_grad_()
    assert x.stride() == (N * D, 1, N)
    assert gpu_tiles.slot_major_tiles(M * B * K, D).block_r == 64
    pos = torch.randn(1, N, D, requires_grad=True)
    masks = [torch.sort(torch.randint(0, N, (B, K)), dim=1).values for _ in range(M)]
    grad = torch.randn(M * B, K, D)
    with use_backend("triton"):
        out = gather_tokens(x, masks, pos)
    got = torch.autograd.grad(out, [x, pos], grad)
    ref = gather_tokens_reference(x, masks, pos)
    want = torch.autograd.grad(ref, [x, pos], grad)
    torch.testing.assert_close(out, ref)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_predictor_tokens_with_gpu_tiles(gpu_tiles, poison_empty):
    nenc, npred, B, N, P, Kc, Kt = 1, 3, 2, 40, 384, 7, 37  # Kt > 16: several row tiles of the mask-grad kernel
    ctx = torch.randn(nenc * B, Kc, P, requires_grad=True)
    pos = torch.randn(1, N, P, requires_grad=True)
    mt = torch.randn(1, 1, P, requires_grad=True)
    mx = [torch.randint(0, N, (B, Kc)) for _ in range(nenc)]
    mp = [torch.randint(0, N, (B, Kt)) for _ in range(npred)]
    with use_backend("triton"):
        out = predictor_tokens(ctx, mx, mp, pos, mt)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (ctx, pos, mt), grad)
    ref = predictor_tokens_reference(ctx, mx, mp, pos, mt)
    want = torch.autograd.grad(ref, (ctx, pos, mt), grad)
    torch.testing.assert_close(out, ref)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)  # fp32 sums of up to ~100 terms in another order


@pytest.mark.parametrize("D", [768, 1280])
def test_target_tokens_with_gpu_tiles(gpu_tiles, poison_empty, D):
    B, N, Kt, nenc, npred = 2, 9, 5, 2, 3
    h = torch.randn(B, N, D)
    masks = [torch.randint(0, N, (B, Kt)) for _ in range(npred)]
    with use_backend("triton"):
        out = target_tokens(h, masks, nenc)
    torch.testing.assert_close(out, target_tokens_reference(h, masks, nenc), rtol=1e-5, atol=1e-5)

"""target_tokens: the Triton path (interpreter on CPU) against the reference."""

import pytest
import torch
import torch.nn.functional as F

from fastjepa.masks import apply_masks, repeat_interleave_batch
from fastjepa.ops import target_tokens, target_tokens_reference, use_backend
from fastjepa.ops._dispatch import kernels
from fastjepa.ops.target_tokens import _target_tokens_triton

from ._cuda import CUDA, DTYPES, check, tokens

pytestmark = pytest.mark.triton  # the interpreter on the CPU: skipped where this Triton's cannot run

# (B, N, D, npred, nenc, Kt): B=1; D not a power of two; prime Kt; Kt > N repeats indices
SHAPES = [(1, 16, 32, 4, 1, 5), (3, 20, 200, 4, 2, 7), (2, 9, 17, 3, 2, 13)]


def make_h(B, N, D, contiguous):
    scale, shift = 0.5 + torch.rand(B, N, 1) * 3, torch.randn(B, N, 1) * 2  # uneven, well-conditioned rows
    h = torch.randn(B, N, D) if contiguous else torch.randn(B, D, N).transpose(1, 2)
    return h * scale + shift



@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_reference(shape, idx_dtype, contiguous, poison_empty):
    B, N, D, npred, nenc, Kt = shape
    h = make_h(B, N, D, contiguous)
    masks = [torch.randint(0, N, (B, Kt), dtype=idx_dtype) for _ in range(npred)]
    with use_backend("triton"):
        out = target_tokens(h, masks, nenc)
    expected = repeat_interleave_batch(apply_masks(F.layer_norm(h, (D,)), masks), B, repeat=nenc)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, target_tokens_reference(h, masks, nenc))


def test_every_output_element_is_written():
    B, N, D, npred, nenc, Kt = 3, 20, 200, 4, 2, 7
    h = make_h(B, N, D, True)
    idx = torch.randint(0, N, (npred, B, Kt))
    out = torch.full((npred * nenc * B, Kt, D), float("nan"))
    kernels().target_tokens_fwd(h, idx, nenc, out=out)
    torch.testing.assert_close(out, target_tokens_reference(h, list(idx), nenc))


def test_no_grad_even_if_h_requires_it():
    h = make_h(2, 9, 24, True).requires_grad_()
    masks = [torch.randint(0, 9, (2, 4)) for _ in range(3)]
    with use_backend("triton"):
        out = target_tokens(h, masks, 2)
    assert not out.requires_grad


def test_opcheck():
    h = make_h(2, 9, 24, True)
    idx = torch.randint(0, 9, (3, 2, 5), dtype=torch.int32)
    torch.library.opcheck(_target_tokens_triton, (h, idx, 2))


def test_torch_compile_parity():
    h = make_h(2, 9, 24, True)
    idx = torch.randint(0, 9, (3, 2, 5))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def fused(h, idx):
        return _target_tokens_triton(h, idx, 2) + 1.0

    torch.testing.assert_close(fused(h, idx), target_tokens_reference(h, list(idx), 2) + 1.0)


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("rank", ValueError, "h: expected shape"),
        ("batch", ValueError, "batch size 3, expected 2"),
        ("nenc", ValueError, "nenc: expected a positive int, got 0"),
        ("nenc_bool", ValueError, "nenc: expected a positive int, got True"),
        ("range", IndexError, r"masks_pred\[0\]: index 9 is out of range"),
    ],
)
def test_bad_inputs_raise(case, exc, match):
    h, nenc = torch.randn(2, 9, 16), 1
    masks = [torch.randint(0, 9, (2, 4)) for _ in range(2)]
    if case == "rank":
        h = h[0]
    elif case == "batch":
        masks = [torch.randint(0, 9, (3, 4))]
    elif case == "nenc":
        nenc = 0
    elif case == "nenc_bool":
        nenc = True
    elif case == "range":
        masks[0][1, 3] = 9
    with use_backend("triton"), pytest.raises(exc, match=match):
        target_tokens(h, masks, nenc)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_low_precision_tolerance_rule(dtype, atol):
    """Kernel error vs an fp32 reference ≤ 2× the same-dtype PyTorch error + atol (docs/design.md §8)."""
    B, N, D, npred, nenc, Kt = 16, 256, 1280, 4, 1, 43
    h = make_h(B, N, D, True).cuda()
    masks = [torch.randint(0, N, (B, Kt), device="cuda") for _ in range(npred)]
    exact = target_tokens_reference(h, masks, nenc)
    with use_backend("reference"):
        with_torch = target_tokens(h.to(dtype), masks, nenc)
    with use_backend("triton"):
        with_kernel = target_tokens(h.to(dtype), masks, nenc)
    err_k = (with_kernel.float() - exact).abs().max().item()
    err_t = (with_torch.float() - exact).abs().max().item()
    assert err_k <= 2 * err_t + atol, (err_k, err_t)


# -- compiled on a GPU: ViT-B's targets, int32 and int64 indices, strided inputs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_target_tokens_on_cuda(dtype, idx_dtype, contiguous):
    """ViT-B's targets (N=196, D=768), npred=4 masks of 34, nenc=2."""
    B, N, D, npred, nenc, Kt = 16, 196, 768, 4, 2, 34
    h = 3 * tokens((B, N, D), torch.float32, contiguous) + 1  # not already normalised
    masks = [torch.randint(0, N, (B, Kt), device=CUDA, dtype=idx_dtype) for _ in range(npred)]
    exact = target_tokens_reference(h, masks, nenc)
    with use_backend("reference"):
        with_torch = target_tokens(h.to(dtype), masks, nenc)
    with use_backend("triton"):
        with_kernel = target_tokens(h.to(dtype), masks, nenc)
    assert with_kernel.shape == (npred * nenc * B, Kt, D) and with_kernel.dtype == dtype
    check(with_kernel, with_torch, exact, dtype, 1e-5)

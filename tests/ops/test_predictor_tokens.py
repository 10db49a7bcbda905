"""predictor_tokens: the Triton path (interpreter on CPU) against the reference."""

import pytest
import torch

from fastjepa.ops import predictor_tokens, predictor_tokens_reference, use_backend
from fastjepa.ops._dispatch import kernels
from fastjepa.ops.predictor_tokens import _predictor_tokens_triton, _predictor_tokens_triton_backward

from ._cuda import CUDA, DTYPES, check, leaf, tokens

pytestmark = pytest.mark.triton  # the interpreter on the CPU: skipped where this Triton's cannot run

# (B, N, P, nenc, npred, Kc, Kt): B=1; P not a power of two with prime K; nenc=2, npred=4;
# Kt > N forces repeated target indices
# the last: P = 300 gives 5 column tiles of 64 and Kt = 70 two passes of the 64-token loop
# in the mask-token backward (ViT-H/14's predictor, P = 384, runs 3 column tiles of 128)
SHAPES = [(1, 16, 24, 1, 4, 5, 3), (3, 20, 200, 2, 4, 7, 5), (2, 9, 40, 2, 3, 11, 13), (2, 80, 300, 1, 2, 5, 70)]


def make_masks(B, N, count, K, dtype):
    return [torch.randint(0, N, (B, K), dtype=dtype) for _ in range(count)]


def run(backend, ctx, masks_x, masks, pos, mask_token, grad):
    ctx = ctx.detach().clone().requires_grad_()
    pos = pos.detach().clone().requires_grad_(pos.requires_grad)
    mask_token = mask_token.detach().clone().requires_grad_()
    with use_backend(backend):
        out = predictor_tokens(ctx, masks_x, masks, pos, mask_token)
    out.backward(grad)
    return out.detach(), ctx.grad, mask_token.grad, pos.grad


def inputs(shape, idx_dtype=torch.int64, contiguous=True, pos_grad=False):
    B, N, P, nenc, npred, Kc, Kt = shape
    ctx = torch.randn(nenc * B, Kc, P) if contiguous else torch.randn(nenc * B, P, Kc).transpose(1, 2)
    pos = torch.randn(1, N, P) if contiguous else torch.randn(1, P, N).transpose(1, 2)
    pos.requires_grad_(pos_grad)
    mask_token = torch.randn(1, 1, P)
    masks_x = make_masks(B, N, nenc, Kc, idx_dtype)
    masks = make_masks(B, N, npred, Kt, idx_dtype)
    grad = torch.randn(npred * nenc * B, Kc + Kt, P)
    return ctx, masks_x, masks, pos, mask_token, grad



@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("pos_grad", [False, True])
def test_forward_backward_match_reference(shape, idx_dtype, contiguous, pos_grad, poison_empty):
    args = inputs(shape, idx_dtype, contiguous, pos_grad)
    out, gctx, gmt, gpos = run("triton", *args)
    ref, gctx_ref, gmt_ref, gpos_ref = run("reference", *args)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gctx, gctx_ref)
    # long fp32 sums in another order: the mask-token gradient adds R·Kt rows of the upstream
    # gradient (280 for the multi-tile shape: 1.7e-5 apart, seen), each pos row up to R·(Kc+Kt)
    B, N, P, nenc, npred, Kc, Kt = shape
    R = npred * nenc * B
    torch.testing.assert_close(gmt, gmt_ref, rtol=1e-5, atol=max(1e-5, 2e-7 * R * Kt))
    if pos_grad:
        torch.testing.assert_close(gpos, gpos_ref, rtol=1e-5, atol=max(1e-5, 2e-7 * R * (Kc + Kt)))
    else:
        assert gpos is None


def test_batch_order_is_target_major_then_context_then_image():
    """Row (j·nenc + i)·B + b holds context i of image b and target block j of image b."""
    B, N, P, nenc, npred, Kc, Kt = 2, 10, 8, 2, 3, 3, 2
    ctx = torch.randn(nenc * B, Kc, P)
    pos = torch.zeros(1, N, P)
    mask_token = torch.zeros(1, 1, P)
    pos[0, :, 0] = torch.arange(N, dtype=torch.float32)  # channel 0 encodes the index
    masks_x = make_masks(B, N, nenc, Kc, torch.int64)
    masks = make_masks(B, N, npred, Kt, torch.int64)
    with use_backend("triton"):
        out = predictor_tokens(ctx, masks_x, masks, pos, mask_token)
    for j in range(npred):
        for i in range(nenc):
            for b in range(B):
                row = out[(j * nenc + i) * B + b]
                torch.testing.assert_close(row[:Kc, 1:], ctx[i * B + b, :, 1:])
                torch.testing.assert_close(row[Kc:, 0], masks[j][b].float())


def test_every_output_element_is_written():
    ctx, masks_x, masks, pos, mask_token, _ = inputs((3, 20, 200, 2, 4, 7, 5))
    idx_x, idx = torch.stack(masks_x), torch.stack(masks)
    out = torch.full((4 * 2 * 3, 12, 200), float("nan"))
    kernels().predictor_tokens_fwd(ctx, idx_x, idx, pos, mask_token, out=out)
    torch.testing.assert_close(out, predictor_tokens_reference(ctx, masks_x, masks, pos, mask_token))


@pytest.mark.parametrize("seq_per_prog", [3, 5])
def test_backward_with_several_sequences_per_program(seq_per_prog):
    """The mask-token reduction over several sequences per program, R not a multiple of it."""
    ctx, masks_x, masks, pos, mask_token, grad = inputs((3, 20, 40, 2, 4, 7, 5), pos_grad=True)
    _, gctx_ref, gmt_ref, gpos_ref = run("reference", ctx, masks_x, masks, pos, mask_token, grad)
    idx_x, idx = torch.stack(masks_x), torch.stack(masks)
    gctx, gmt, gpos = kernels().predictor_tokens_bwd(grad, idx_x, idx, torch.float32, 20, True, seq_per_prog=seq_per_prog)
    torch.testing.assert_close(gctx, gctx_ref)
    torch.testing.assert_close(gmt, gmt_ref.view(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpos, gpos_ref[0], rtol=1e-5, atol=1e-5)


def test_opcheck():
    ctx, masks_x, masks, pos, mask_token, grad = inputs((2, 9, 24, 2, 3, 5, 3), torch.int32)
    ctx.requires_grad_()
    mask_token.requires_grad_()
    idx_x, idx = torch.stack(masks_x), torch.stack(masks)
    torch.library.opcheck(_predictor_tokens_triton, (ctx, idx_x, idx, pos, mask_token))
    torch.library.opcheck(_predictor_tokens_triton, (ctx, idx_x, idx, pos.requires_grad_(), mask_token))
    for pos_grad in (True, False):
        args = (grad, idx_x, idx, 9, torch.float32, torch.float32, torch.float32, pos_grad)
        torch.library.opcheck(_predictor_tokens_triton_backward, args)


def test_torch_compile_parity():
    ctx, masks_x, masks, pos, mask_token, grad = inputs((2, 9, 24, 2, 3, 5, 3))
    ctx.requires_grad_()
    mask_token.requires_grad_()
    idx_x, idx = torch.stack(masks_x), torch.stack(masks)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def fused(ctx, idx_x, idx, pos, mask_token):
        return _predictor_tokens_triton(ctx, idx_x, idx, pos, mask_token).sin()

    out = fused(ctx, idx_x, idx, pos, mask_token)
    got = torch.autograd.grad(out, (ctx, mask_token), grad)
    ref = predictor_tokens_reference(ctx, masks_x, masks, pos, mask_token).sin()
    expected = torch.autograd.grad(ref, (ctx, mask_token), grad)
    torch.testing.assert_close(out, ref)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("ctx_rank", ValueError, r"ctx: expected shape \(B, N, D\), got \(5, 16\)"),
        ("nenc", ValueError, r"ctx: batch 3 is not a multiple of len\(masks_x\)=2"),
        ("kc", ValueError, r"masks_x: 4 indices per mask, expected ctx.size\(1\)=5"),
        ("target_batch", ValueError, "masks: masks have batch size 3, expected 2"),
        ("pos_width", ValueError, r"pos_embed: expected shape \(1, N, 16\), got \(1, 12, 8\)"),
        ("mask_token", ValueError, r"mask_token: expected shape \(1, 1, 16\), got \(1, 1, 8\)"),
        ("mask_token_flat", ValueError, r"mask_token: expected shape \(1, 1, 16\), got \(16,\)"),  # right size, wrong shape
        ("index_dtype", ValueError, r"masks\[0\]: expected int32 or int64 indices, got torch.int16"),
        ("range", IndexError, r"masks\[1\]: index 12 is out of range for 12 tokens \(expected 0 <= index < 12\)"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_inputs_raise(case, exc, match, backend):
    """The same error from either backend, naming the argument, the value and what was expected."""
    ctx, masks_x, masks, pos, mask_token, _ = inputs((2, 12, 16, 2, 2, 5, 3))
    if case == "ctx_rank":
        ctx = ctx[0]
    elif case == "nenc":
        ctx = ctx[:3]
    elif case == "kc":
        masks_x = [m[:, :4] for m in masks_x]
    elif case == "target_batch":
        masks = [torch.randint(0, 12, (3, 3)) for _ in masks]
    elif case == "pos_width":
        pos = torch.randn(1, 12, 8)
    elif case == "mask_token":
        mask_token = torch.randn(1, 1, 8)
    elif case == "mask_token_flat":
        mask_token = torch.randn(16)
    elif case == "index_dtype":
        masks = [m.to(torch.int16) for m in masks]
    elif case == "range":
        masks[1][0, 0] = 12
    with use_backend(backend), pytest.raises(exc, match=match):
        predictor_tokens(ctx, masks_x, masks, pos, mask_token)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_low_precision_tolerance_rule(dtype, atol):
    """Kernel error vs an fp32 reference ≤ 2× the same-dtype PyTorch error + atol (docs/design.md §8)."""
    args32 = [t.cuda() if isinstance(t, torch.Tensor) else [m.cuda() for m in t] for t in inputs((16, 256, 384, 1, 4, 71, 43))]
    exact = run("reference", *args32)
    low = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in args32]
    with_torch = run("reference", *low)
    with_kernel = run("triton", *low)
    for k, t, e in zip(with_kernel[:3], with_torch[:3], exact[:3]):
        err_k = (k.float() - e).abs().max().item()
        err_t = (t.float() - e).abs().max().item()
        assert err_k <= 2 * err_t + atol, (err_k, err_t)


# -- compiled on a GPU: a pos table that requires grad (atomics), int32 and int64 indices, strided inputs


def _run_predictor(backend, ctx, masks_x, masks, pos, mask_token, grad):
    ctx, pos, mask_token = leaf(ctx), leaf(pos), leaf(mask_token)
    with use_backend(backend):
        out = predictor_tokens(ctx, masks_x, masks, pos, mask_token)
    out.backward(grad.to(out.dtype))
    return out.detach(), ctx.grad, mask_token.grad, pos.grad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_predictor_tokens_on_cuda_with_a_trainable_pos_table(dtype, idx_dtype, contiguous):
    """ViT-B's predictor input (P=384), nenc=2, npred=4, Kc=54, Kt=34; the pos table
    requires grad (its rows accumulate with atomics)."""
    B, N, P, nenc, npred, Kc, Kt = 8, 196, 384, 2, 4, 54, 34
    ctx = tokens((nenc * B, Kc, P), torch.float32, contiguous)
    pos = tokens((1, N, P), torch.float32, contiguous)
    mask_token = torch.randn(1, 1, P, device=CUDA)
    masks_x = [torch.randint(0, N, (B, Kc), device=CUDA, dtype=idx_dtype) for _ in range(nenc)]
    masks = [torch.randint(0, N, (B, Kt), device=CUDA, dtype=idx_dtype) for _ in range(npred)]
    grad = torch.randn(npred * nenc * B, Kc + Kt, P, device=CUDA)
    exact = _run_predictor("reference", ctx, masks_x, masks, pos, mask_token, grad)
    low = (ctx.to(dtype), masks_x, masks, pos.to(dtype), mask_token.to(dtype), grad)
    with_torch = _run_predictor("reference", *low)
    with_kernel = _run_predictor("triton", *low)
    R = npred * nenc * B  # the mask token's gradient sums R·Kt rows, each pos row up to R·(Kc+Kt)/N·(repeats)
    for k, t, e, atol in zip(with_kernel, with_torch, exact, (1e-5, 1e-5, 2e-7 * R * Kt, 2e-7 * R * (Kc + Kt))):
        check(k, t, e, dtype, max(atol, 1e-5))

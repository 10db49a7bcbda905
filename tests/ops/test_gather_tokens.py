"""gather_tokens / apply_masks: the Triton path (interpreter on CPU) against the reference."""

import pytest
import torch

from fastjepa.masks import apply_masks as apply_masks_reference
from fastjepa.ops import apply_masks, gather_tokens, gather_tokens_reference, use_backend
from fastjepa.ops._dispatch import kernels
from fastjepa.ops.gather_tokens import _gather_tokens_triton, _gather_tokens_triton_backward

from ._cuda import CUDA, DTYPES, check, leaf, tokens

pytestmark = pytest.mark.triton  # the interpreter on the CPU: skipped where this Triton's cannot run

# (B, N, D, M, K): B=1; D not a power of two with a prime K; K > N forces repeated indices
# the last: D > 1024 splits each row over 9 column tiles of 128 (the ViT-H path, D = 1280)
SHAPES = [(1, 16, 32, 1, 5), (3, 20, 200, 2, 7), (2, 9, 17, 4, 13), (2, 9, 1100, 2, 7)]


def make_masks(B, N, M, K, dtype):
    """M random (B, K) masks drawn with replacement: repeats within and across masks."""
    return [torch.randint(0, N, (B, K), dtype=dtype) for _ in range(M)]


def make_tokens(B, N, D, contiguous):
    if contiguous:
        return torch.randn(B, N, D)
    return torch.randn(B, D, N).transpose(1, 2)  # (B, N, D), strided


def run(backend, x, masks, pos, grad):
    x = x.detach().clone().requires_grad_()
    pos = None if pos is None else pos.detach().clone().requires_grad_(pos.requires_grad)
    with use_backend(backend):
        out = gather_tokens(x, masks, pos)
    out.backward(grad)
    return out.detach(), x.grad, None if pos is None else pos.grad



@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("pos_mode", ["fixed", "trainable", "none"])
def test_forward_backward_match_reference(shape, idx_dtype, contiguous, pos_mode, poison_empty):
    B, N, D, M, K = shape
    x = make_tokens(B, N, D, contiguous)
    masks = make_masks(B, N, M, K, idx_dtype)
    pos = None if pos_mode == "none" else make_tokens(1, N, D, contiguous).requires_grad_(pos_mode == "trainable")
    grad = torch.randn(M * B, K, D)
    out, gx, gpos = run("triton", x, masks, pos, grad)
    ref, gx_ref, gpos_ref = run("reference", x, masks, pos, grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gx_ref)
    if pos_mode == "trainable":
        torch.testing.assert_close(gpos, gpos_ref)
    else:
        assert gpos is None


def test_pos_table_longer_than_tokens():
    """pos (1, Npos > N, D) is sliced to the first N rows, as the reference does."""
    B, N, D, M, K = 2, 12, 24, 2, 5
    x, masks = torch.randn(B, N, D), make_masks(B, N, M, K, torch.int64)
    pos = torch.randn(1, N + 4, D, requires_grad=True)
    grad = torch.randn(M * B, K, D)
    out, gx, gpos = run("triton", x, masks, pos, grad)
    ref, gx_ref, gpos_ref = run("reference", x, masks, pos, grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gpos, gpos_ref)


def test_every_output_element_is_written():
    B, N, D, M, K = 3, 20, 200, 2, 7
    x, pos = torch.randn(B, N, D), torch.randn(1, N, D)
    idx = torch.randint(0, N, (M, B, K))
    out = torch.full((M * B, K, D), float("nan"))
    kernels().gather_tokens_fwd(x, idx, pos, out=out)
    torch.testing.assert_close(out, gather_tokens_reference(x, list(idx), pos))


@pytest.mark.parametrize("M", [2, 4])
def test_one_index_per_mask_with_several_masks(M):
    """K = 1, M > 1: the backward's (B, M·K) key view is strided; its sort order must still
    be read row by row (once it was read as if contiguous: wrong gradients)."""
    B, N, D = 3, 16, 8
    x = torch.randn(B, N, D)
    masks = [torch.randint(0, N, (B, 1)) for _ in range(M)]
    grad = torch.randn(M * B, 1, D)
    out, gx, _ = run("triton", x, masks, None, grad)
    ref, gx_ref, _ = run("reference", x, masks, None, grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gx_ref)


def test_heavily_repeated_index_accumulates():
    """Every index the same: one row of x.grad receives all M·K upstream rows."""
    B, N, D, M, K = 2, 6, 40, 3, 11
    x = torch.randn(B, N, D)
    masks = [torch.full((B, K), 4, dtype=torch.int64) for _ in range(M)]
    grad = torch.randn(M * B, K, D)
    _, gx, _ = run("triton", x, masks, None, grad)
    expected = torch.zeros(B, N, D)
    expected[:, 4] = grad.view(M, B, K, D).sum(dim=(0, 2))
    torch.testing.assert_close(gx, expected)


def test_apply_masks_drop_in_and_mae_ids_keep():
    B, N, D = 3, 16, 24
    x = torch.randn(B, N, D)
    masks = make_masks(B, N, 2, 5, torch.int64)
    with use_backend("triton"):
        torch.testing.assert_close(apply_masks(x, masks), apply_masks_reference(x, masks))
        ids_keep = torch.argsort(torch.rand(B, N), dim=1)[:, :7]  # MAE-style random keep
        mae = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
        torch.testing.assert_close(apply_masks(x, ids_keep), mae)


def test_opcheck():
    B, N, D, M, K = 2, 8, 24, 2, 5
    x = torch.randn(B, N, D, requires_grad=True)
    pos = torch.randn(1, N, D, requires_grad=True)
    idx = torch.randint(0, N, (M, B, K), dtype=torch.int32)
    torch.library.opcheck(_gather_tokens_triton, (x, idx, pos))
    torch.library.opcheck(_gather_tokens_triton, (x, idx.long(), None))
    grad = torch.randn(M * B, K, D)
    for pos_grad in (True, False):  # without a pos gradient the op returns a (0,) placeholder
        torch.library.opcheck(_gather_tokens_triton_backward, (grad, idx, N, N, torch.float32, torch.float32, pos_grad))


def test_torch_compile_parity():
    B, N, D, M, K = 2, 8, 24, 2, 5
    x = torch.randn(B, N, D, requires_grad=True)
    pos = torch.randn(1, N, D)
    idx = torch.randint(0, N, (M, B, K))
    grad = torch.randn(M * B, K, D)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def fused(x, idx, pos):
        return _gather_tokens_triton(x, idx, pos) * 2.0

    out = fused(x, idx, pos)
    (gx,) = torch.autograd.grad(out, x, grad)
    ref = gather_tokens_reference(x, list(idx), pos) * 2.0
    (gx_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gx_ref)


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("x_rank", ValueError, "x: expected shape"),
        ("x_int", ValueError, "floating-point"),
        ("batch", ValueError, "batch size 3, expected 2"),
        ("float_index", ValueError, "int32 or int64"),
        ("mask_rank", ValueError, r"masks\[0\]: expected shape \(B, K\)"),
        ("ragged", ValueError, r"masks\[1\]: shape"),
        ("empty", ValueError, "non-empty list"),
        ("pos_shape", ValueError, "pos_embed: expected shape"),
        ("too_big", IndexError, "index 8 is out of range for 8 tokens"),
        ("negative", IndexError, "index -1 is out of range"),
    ],
)
def test_bad_inputs_raise(case, exc, match):
    B, N, D = 2, 8, 16
    x, pos = torch.randn(B, N, D), torch.randn(1, N, D)
    masks = [torch.randint(0, N, (B, 3))]
    if case == "x_rank":
        x = x[0]
    elif case == "x_int":
        x = x.long()
    elif case == "batch":
        masks = [torch.randint(0, N, (3, 3))]
    elif case == "float_index":
        masks = [masks[0].float()]
    elif case == "mask_rank":
        masks = [masks[0][0]]
    elif case == "ragged":
        masks = [masks[0], torch.randint(0, N, (B, 4))]
    elif case == "empty":
        masks = []
    elif case == "pos_shape":
        pos = torch.randn(1, N, D + 1)
    elif case == "too_big":
        masks[0][1, 2] = N
    elif case == "negative":
        masks[0][0, 0] = -1
    with use_backend("triton"), pytest.raises(exc, match=match):
        gather_tokens(x, masks, pos)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_low_precision_tolerance_rule(dtype, atol):
    """Kernel error vs an fp32 reference ≤ 2× the same-dtype PyTorch error + atol (docs/design.md §8)."""
    B, N, D, M, K = 8, 256, 768, 2, 71
    x32, pos32 = torch.randn(B, N, D, device="cuda"), torch.randn(1, N, D, device="cuda")
    masks = [torch.randint(0, N, (B, K), device="cuda") for _ in range(M)]
    grad32 = torch.randn(M * B, K, D, device="cuda")
    ref, gref, _ = run("reference", x32, masks, pos32, grad32)
    low = (x32.to(dtype), masks, pos32.to(dtype), grad32.to(dtype))
    out_t, g_t, _ = run("reference", *low)
    out_k, g_k, _ = run("triton", *low)
    for kern, torch_, exact in ((out_k, out_t, ref), (g_k, g_t, gref)):
        err_k = (kern.float() - exact).abs().max().item()
        err_t = (torch_.float() - exact).abs().max().item()
        assert err_k <= 2 * err_t + atol, (err_k, err_t)


@pytest.mark.parametrize("bad", [-1, 9])
def test_out_of_range_rows_come_out_nan_and_drop_their_gradient(bad):
    """docs/ops.md's promise for CUDA without validate=True: the kernels never read outside
    memory; a row with an out-of-range index is NaN and its gradient goes nowhere."""
    B, N, D = 2, 9, 20
    x, pos = torch.randn(B, N, D), torch.randn(1, N, D)
    idx = torch.randint(0, N, (1, B, 5))
    idx[0, 1, 3] = bad
    out = kernels().gather_tokens_fwd(x, idx, pos).view(B, 5, D)
    assert torch.isnan(out[1, 3]).all()
    good = torch.ones(B, 5, dtype=torch.bool)
    good[1, 3] = False
    ref = torch.stack([(x[b] + pos[0])[idx[0, b].clamp(0, N - 1)] for b in range(B)])
    torch.testing.assert_close(out[good], ref[good])
    grad = torch.randn(B, 5, D)
    gx, _ = kernels().gather_tokens_bwd(grad, idx, N, torch.float32)
    grad[1, 3] = 0  # the bad row's gradient is dropped
    expected = torch.zeros(B, N, D)
    for b in range(B):
        expected[b].index_add_(0, idx[0, b].clamp(0, N - 1), grad[b])
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx, expected)


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_mae_drop_in_with_the_class_token_sliced_off(backend):
    """docs/ops.md's MAE example: gather_tokens(x, ids_keep, pos_embed[:, 1:, :]) — a view with a
    storage offset — equals MAE's add-then-gather, forward and backward."""
    B, N, D, K = 3, 16, 24, 5
    x = torch.randn(B, N, D, requires_grad=True)
    pos_embed = torch.randn(1, N + 1, D, requires_grad=True)  # row 0: the class token's
    ids_keep = torch.rand(B, N).argsort(dim=1)[:, :K]
    grad = torch.randn(B, K, D)
    with use_backend(backend):
        out = gather_tokens(x, ids_keep, pos_embed[:, 1:, :])
    gx, gp = torch.autograd.grad(out, (x, pos_embed), grad)
    ref = torch.gather(x + pos_embed[:, 1:, :], 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    rx, rp = torch.autograd.grad(ref, (x, pos_embed), grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gp, rp)
    assert gp[0, 0].abs().max() == 0  # the class token's row gets no gradient


# -- compiled on a GPU: a pos table that requires grad, int32 and int64 indices, strided inputs


def _run_gather(backend, x, masks, pos, grad):
    x, pos = leaf(x), leaf(pos)
    with use_backend(backend):
        out = gather_tokens(x, masks, pos)
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad, pos.grad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_gather_tokens_on_cuda_with_a_trainable_pos_table(dtype, idx_dtype, contiguous):
    """ViT-B/16's context gather (N=196, D=768), two masks of 71 drawn with replacement
    (repeated indices within and across masks) and a pos table that requires grad."""
    B, N, D, M, K = 16, 196, 768, 2, 71
    x, pos = tokens((B, N, D), torch.float32, contiguous), tokens((1, N, D), torch.float32, contiguous)
    masks = [torch.randint(0, N, (B, K), device=CUDA, dtype=idx_dtype) for _ in range(M)]
    grad = torch.randn(M * B, K, D, device=CUDA)
    exact = _run_gather("reference", x, masks, pos, grad)
    low = (x.to(dtype), masks, pos.to(dtype), grad)
    assert low[0].is_contiguous() == contiguous
    with_torch = _run_gather("reference", *low)
    with_kernel = _run_gather("triton", *low)
    # the pos gradient sums up to M·B·K / N · (repeats) rows per entry in another order
    for k, t, e, atol in zip(with_kernel, with_torch, exact, (1e-5, 1e-5, 1e-4)):
        check(k, t, e, dtype, atol)


@pytest.mark.gpu
def test_gather_tokens_past_2_31_elements():
    """x of 2048 × 1025 × 1024 bf16 elements (2.15e9 > 2³¹, 4.3 GB): the images past
    the first 1024 sit beyond any 32-bit element offset. int32 indices; the forward equals
    PyTorch's gather, the backward writes every element of grad_x (the rows no mask picked
    zero) and the pos gradient sums over the batch. Peak memory about 10 GB."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with at least 24 GiB")
    B, N, D, K = 2048, 1025, 1024, 4
    assert B * N * D > 2**31
    x = torch.randn(B, N, D, device=CUDA, dtype=torch.bfloat16)
    pos = torch.randn(1, N, D, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.rand(B, N, device=CUDA).argsort(dim=1)[:, :K].contiguous()  # (B, K) distinct per image
    idx[-1, 0] = N - 1  # the very last row of x
    masks = [idx.to(torch.int32)]
    with use_backend("triton"):
        out = gather_tokens(x, masks, pos)
    sel = idx.unsqueeze(-1).expand(-1, -1, D)
    expected = torch.gather(x, 1, sel) + pos.detach()[0][idx]  # (B, K, D), PyTorch's 64-bit indexing
    torch.testing.assert_close(out.detach(), expected)  # bf16 tolerance: a wrapped 32-bit offset reads garbage
    grad = torch.randn(B, K, D, device=CUDA, dtype=torch.bfloat16)
    # leave a NaN-filled block of grad_x's size in the allocator's cache: an element the
    # backward forgets to write is then most likely NaN, counted as nonzero below
    torch.full((B, N, D), float("nan"), device=CUDA, dtype=torch.bfloat16)
    x.requires_grad_(True)
    with use_backend("triton"):
        gathered = gather_tokens(x, masks, pos)
    gx, gpos = torch.autograd.grad(gathered, (x, pos), grad)
    assert torch.equal(torch.gather(gx, 1, sel), grad)  # each picked row: its own gradient, once
    assert torch.count_nonzero(gx).item() == torch.count_nonzero(grad).item()  # nothing else, and no NaN
    want = torch.zeros(N, D, device=CUDA).index_add_(0, idx.reshape(-1), grad.reshape(-1, D).float())
    torch.testing.assert_close(gpos[0].float(), want, rtol=1e-2, atol=1e-2)
    del x, gx, gathered, out
    torch.cuda.empty_cache()

"""fastjepa._C CPU ops against the pure-PyTorch references: forward, backward, opcheck.

Random inputs every run (conftest seeds from os.urandom), repeated indices, odd sizes
(B=1, D=200, prime K), int32/int64 indices, fp32/bf16/fp16. Low precision follows the
flash-attention rule: error vs an fp32 reference at most twice the error of the same
computation done by the reference in that dtype, plus a small atol.

Skipped when the extension is not built, except ``test_extension_built_when_required``,
which fails when ``FASTJEPA_REQUIRE_EXT=1`` (set by CI) and the extension is missing.
"""

import os

import pytest
import torch

from fastjepa.ops import (
    available,
    gather_tokens,
    gather_tokens_reference,
    predictor_tokens,
    predictor_tokens_reference,
    target_tokens,
    target_tokens_reference,
    use_backend,
)

HAVE_EXT = bool(available()["cpp"])
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason=f"fastjepa._C not available: {available()['cpp'].reason}")

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)]  # (dtype, atol)


def test_extension_built_when_required():
    if os.environ.get("FASTJEPA_REQUIRE_EXT", "0") != "1":
        pytest.skip("FASTJEPA_REQUIRE_EXT is not set (CI sets it)")
    assert HAVE_EXT, f"FASTJEPA_REQUIRE_EXT=1 but the extension is not available: {available()['cpp'].reason}"


def _cpp():
    from fastjepa.ops import cpp

    return cpp


def assert_rule(out, ref32, ref_lp, atol):
    """|out − ref32| ≤ 2·|ref_lp − ref32| + atol (elementwise maxima)."""
    err = (out.float() - ref32.float()).abs().max().item()
    base = (ref_lp.float() - ref32.float()).abs().max().item()
    assert err <= 2 * base + atol, f"error {err} > 2 x {base} + {atol}"


def _indices(M, B, K, N, dtype):
    idx = torch.randint(0, N, (M, B, K), dtype=dtype)
    idx[..., : K // 2] = torch.randint(0, max(N // 8, 1), (M, B, K // 2), dtype=dtype)  # many repeats
    return idx


GATHER_SHAPES = [(2, 16, 8, 2, 5), (1, 37, 200, 3, 13), (3, 64, 33, 4, 7), (4, 10, 16, 1, 10)]  # B, N, D, M, K


@needs_ext
@pytest.mark.parametrize("shape", GATHER_SHAPES)
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pos_mode", ["none", "fixed", "grad", "longer"])
def test_gather_tokens_matches_reference(shape, dtype, atol, idx_dtype, pos_mode):
    B, N, D, M, K = shape
    x32 = torch.randn(B, N, D)
    npos = N + 5 if pos_mode == "longer" else N
    pos32 = None if pos_mode == "none" else torch.randn(1, npos, D)
    idx = _indices(M, B, K, N, idx_dtype)
    grad32 = torch.randn(M * B, K, D)

    def run(fn, dt):
        x = x32.to(dt, copy=True).requires_grad_()
        pos = None if pos32 is None else pos32.to(dt, copy=True).requires_grad_(pos_mode == "grad")
        y = fn(x, idx, pos)
        y.backward(grad32.to(y.dtype))
        return y.detach(), x.grad, (pos.grad if pos is not None and pos.requires_grad else None)

    ref = lambda x, i, p: gather_tokens_reference(x, list(i), p)
    out = run(_cpp().gather_tokens, dtype)
    r32 = run(ref, torch.float64)
    rlp = run(ref, dtype)
    assert out[0].dtype == dtype and out[1].dtype == dtype
    for o, a, b in zip(out, r32, rlp):
        assert (o is None) == (a is None)
        if o is not None:
            assert o.shape == a.shape
            assert_rule(o, a, b, atol)
    if dtype == torch.float32:
        torch.testing.assert_close(out[0], r32[0].float(), rtol=1e-6, atol=1e-6)


@needs_ext
def test_gather_tokens_mixed_dtypes_promote():
    x = torch.randn(2, 9, 12, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(1, 9, 12)
    idx = torch.randint(0, 9, (2, 2, 4))
    y = _cpp().gather_tokens(x, idx, pos)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, gather_tokens_reference(x, list(idx), pos))
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


PRED_SHAPES = [(1, 4, 2, 5, 3, 16, 8), (1, 4, 3, 13, 7, 64, 200), (2, 3, 1, 11, 5, 25, 33), (1, 1, 1, 1, 1, 4, 2)]
# nenc, npred, B, Kc, Kt, N, P


@needs_ext
@pytest.mark.parametrize("shape", PRED_SHAPES)
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pos_grad", [False, True])
def test_predictor_tokens_matches_reference(shape, dtype, atol, idx_dtype, pos_grad):
    nenc, npred, B, Kc, Kt, N, P = shape
    ctx32, pos32, mt32 = torch.randn(nenc * B, Kc, P), torch.randn(1, N, P), torch.randn(1, 1, P)
    idx_x, idx = _indices(nenc, B, Kc, N, idx_dtype), _indices(npred, B, Kt, N, idx_dtype)
    grad32 = torch.randn(npred * nenc * B, Kc + Kt, P)

    def run(fn, dt):
        c, p, m = (t.to(dt, copy=True).requires_grad_() for t in (ctx32, pos32, mt32))
        p.requires_grad_(pos_grad)
        y = fn(c, idx_x, idx, p, m)
        y.backward(grad32.to(dt))
        return y.detach(), c.grad, m.grad, p.grad

    ref = lambda c, ix, i, p, m: predictor_tokens_reference(c, list(ix), list(i), p, m)
    out = run(_cpp().predictor_tokens, dtype)
    r32 = run(ref, torch.float64)
    rlp = run(ref, dtype)
    for o, a, b in zip(out, r32, rlp):
        assert (o is None) == (a is None)
        if o is not None:
            assert o.shape == a.shape and o.dtype == dtype
            assert_rule(o, a, b, atol * max(1.0, (npred * nenc * B * Kt) ** 0.5 / 4))


TARGET_SHAPES = [(2, 16, 8, 4, 5, 1), (1, 37, 200, 3, 13, 2), (3, 25, 33, 1, 7, 3)]  # B, N, D, npred, Kt, nenc


@needs_ext
@pytest.mark.parametrize("shape", TARGET_SHAPES)
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_target_tokens_matches_reference(shape, dtype, atol, idx_dtype):
    B, N, D, npred, Kt, nenc = shape
    h32 = torch.randn(B, N, D) * 3 + 1
    idx = _indices(npred, B, Kt, N, idx_dtype)
    out = _cpp().target_tokens(h32.to(dtype), idx, nenc)
    r32 = target_tokens_reference(h32.double(), list(idx), nenc)
    rlp = target_tokens_reference(h32.to(dtype), list(idx), nenc)
    assert out.shape == r32.shape and out.dtype == dtype
    assert_rule(out, r32, rlp, atol)


@needs_ext
def test_target_tokens_no_grad():
    h = torch.randn(2, 9, 8, requires_grad=True)
    out = _cpp().target_tokens(h, torch.randint(0, 9, (2, 2, 3)), 1)
    assert not out.requires_grad


# -- torch.library checks ---------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_opcheck(idx_dtype):
    _cpp()
    ops = torch.ops.fastjepa
    B, N, D = 2, 12, 10
    x = torch.randn(B, N, D, requires_grad=True)
    pos = torch.randn(1, N, D)
    idx = _indices(2, B, 5, N, idx_dtype)
    torch.library.opcheck(ops.gather_tokens_fwd, (x, idx, pos))
    torch.library.opcheck(ops.gather_tokens_fwd, (x, idx, None))
    torch.library.opcheck(ops.gather_tokens_bwd, (torch.randn(2 * B, 5, D), idx, N, torch.float32, True))
    ctx, mt = torch.randn(B, 4, D, requires_grad=True), torch.randn(1, 1, D, requires_grad=True)
    idx_x, idx_t = _indices(1, B, 4, N, idx_dtype), _indices(3, B, 3, N, idx_dtype)
    torch.library.opcheck(ops.predictor_tokens_fwd, (ctx, idx_x, idx_t, pos, mt))
    torch.library.opcheck(ops.predictor_tokens_bwd, (torch.randn(3 * B, 7, D), 1, 3, 4, torch.float32))
    torch.library.opcheck(ops.target_tokens, (torch.randn(B, N, D), idx_t, 2))


@needs_ext
def test_compiles_with_autograd():
    cpp = _cpp()

    def f(x, idx, pos, ctx, idx_x, mt):
        a = cpp.gather_tokens(x, idx, pos)
        b = cpp.predictor_tokens(ctx, idx_x, idx, pos, mt)
        return a.sum() + b.square().sum()

    x, ctx, mt = torch.randn(2, 12, 8, requires_grad=True), torch.randn(2, 4, 8, requires_grad=True), torch.randn(1, 1, 8, requires_grad=True)
    pos, idx, idx_x = torch.randn(1, 12, 8), torch.randint(0, 12, (3, 2, 5)), torch.randint(0, 12, (1, 2, 4))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    g1 = torch.autograd.grad(compiled(x, idx, pos, ctx, idx_x, mt), (x, ctx, mt))
    g2 = torch.autograd.grad(f(x, idx, pos, ctx, idx_x, mt), (x, ctx, mt))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# -- errors and dispatch ----------------------------------------------------------------


@needs_ext
def test_errors_name_the_bad_value():
    cpp = _cpp()
    x = torch.randn(2, 8, 4)
    with pytest.raises(IndexError, match="index 8, out of range for 8 tokens"):
        cpp.gather_tokens(x, torch.full((1, 2, 3), 8), None)
    with pytest.raises(IndexError, match="index -1"):
        cpp.target_tokens(x, torch.full((1, 2, 3), -1), 1)
    with pytest.raises(RuntimeError, match=r"expected \(M, B, K\)"):
        cpp.gather_tokens(x, torch.zeros(2, 3, dtype=torch.long), None)
    with pytest.raises(RuntimeError, match="expected int32 or int64"):
        cpp.gather_tokens(x, torch.zeros(1, 2, 3), None)
    with pytest.raises(RuntimeError, match="idx has batch 3, expected x.size"):
        cpp.gather_tokens(x, torch.zeros(1, 3, 3, dtype=torch.long), None)
    with pytest.raises(RuntimeError, match="pos has shape"):
        cpp.gather_tokens(x, torch.zeros(1, 2, 3, dtype=torch.long), torch.randn(1, 8, 5))
    with pytest.raises(RuntimeError, match="mask_token has shape"):
        cpp.predictor_tokens(x, torch.zeros(1, 2, 8, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long),
                             torch.randn(1, 8, 4), torch.randn(1, 1, 5))


@needs_ext
def test_public_ops_use_the_extension_on_cpu():
    x = torch.randn(2, 16, 8, requires_grad=True)
    masks = [torch.randint(0, 16, (2, 5)) for _ in range(2)]
    with use_backend("cpp"):
        y = gather_tokens(x, masks)
        z = predictor_tokens(y[:2], masks[:1], masks, torch.randn(1, 16, 8), torch.randn(1, 1, 8))
        t = target_tokens(x, masks, 2)
    torch.testing.assert_close(y, gather_tokens_reference(x, masks))
    assert z.shape == (2 * 1 * 2, 10, 8)  # (npred·nenc·B, Kc+Kt, P)
    torch.testing.assert_close(t, target_tokens_reference(x.detach(), masks, 2))


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("pos_grad", [False, True])
def test_gather_tokens_cuda_kernel(dtype, atol, pos_grad):
    from fastjepa.ops import cpp_has_cuda

    if not cpp_has_cuda():
        pytest.skip("fastjepa._C was built without CUDA")
    B, N, D, M, K = 3, 196, 200, 4, 37
    x32, pos32 = torch.randn(B, N, D, device="cuda"), torch.randn(1, N, D, device="cuda")
    idx = _indices(M, B, K, N, torch.int64).cuda()
    grad32 = torch.randn(M * B, K, D, device="cuda")

    def run(fn, dt):
        x, pos = x32.to(dt, copy=True).requires_grad_(), pos32.to(dt, copy=True).requires_grad_(pos_grad)
        y = fn(x, idx, pos)
        y.backward(grad32.to(dt))
        return y.detach(), x.grad, pos.grad

    ref = lambda x, i, p: gather_tokens_reference(x, list(i), p)
    for o, a, b in zip(run(_cpp().gather_tokens, dtype), run(ref, torch.float64), run(ref, dtype)):
        assert (o is None) == (a is None)
        if o is not None:
            assert_rule(o, a, b, atol)
    bad = idx.clone()
    bad[0, 0, 0] = N
    assert torch.isnan(_cpp().gather_tokens(x32, bad, None)[0, 0]).all()

"""rope_qk (3-D / 2-D rotary embedding of q and k): reference against the V-JEPA 2 chain
written out, each backend (Triton in the interpreter, C++) against the reference forward
and backward, odd shapes, repeated ids, both layouts, the input-dtype angles, errors."""

import math

import pytest
import torch

from fastjepa.ops import available, use_backend
from fastjepa.ops.rope import _rope_triton, frequency_index, rope_qk, rope_qk_reference, rope_reference

HAVE_EXT = bool(available()["cpp"])
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason=f"fastjepa._C not available: {available()['cpp'].reason}")
BACKENDS = ["triton", pytest.param("cpp", marks=needs_ext)]

# (B, heads, N, head_dim, grid): head_dim 64 = 3·20 + 4 leftover, 32 = 3·10 + 2, 33 = 3·10 + 3,
# N prime, B = 1; a 2-D grid (head_dim 20 = 2·10); grids whose T·H·W ≥ N (ids=None fits)
SHAPES = [
    (1, 2, 13, 64, (2, 3, 4)),
    (2, 3, 17, 32, (None, 3, 5)),
    (3, 1, 7, 33, (2, 2, 3)),
    (2, 2, 11, 20, (3, 4)),
]


def vjepa_chain(x, ids, grid, layout):
    """V-JEPA 2's computation spelled out: per axis, a (.., d/2) frequency table repeated to d
    (whole for vjepa2, per pair for interleaved), pairs swapped and negated by split / stack,
    the rotated parts and the leftover channels concatenated."""
    B, nh, N, D = x.shape
    n = len(grid)
    d = 2 * ((D // n) // 2)
    H, W = grid[-2], grid[-1]
    flat = torch.arange(N) if ids is None else ids.long()
    flat = flat.expand(B, N) if flat.dim() == 1 else flat
    coords = [flat // (H * W), (flat % (H * W)) // W, flat % W] if n == 3 else [flat // W, flat % W]
    outs = []
    for i, pos in enumerate(coords):
        xi = x[..., i * d : (i + 1) * d]
        j = torch.arange(d // 2, dtype=x.dtype)
        omega = 1.0 / 10000 ** (j / (d / 2))
        freq = pos[:, None, :, None].to(x.dtype) * omega  # (B, 1, N, d/2)
        freq = torch.cat([freq, freq], dim=-1) if layout == "vjepa2" else freq.repeat_interleave(2, dim=-1)
        pairs = xi.unflatten(-1, (d // 2, 2))
        swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        outs.append(xi * freq.cos() + swapped * freq.sin())
    return torch.cat(outs + [x[..., n * d :]], dim=-1)


def make_ids(mode, B, N, grid):
    """Token ids: (B, N) drawn with replacement (repeats forced), (N,) shared, or None."""
    bound = math.prod(3 if g is None else g for g in grid)  # 3 frames on an unbounded grid
    if mode == "none":
        return None
    dtype = torch.int32 if mode.endswith("int32") else torch.int64
    if mode.startswith("shared"):
        return torch.randint(0, bound, (N,), dtype=dtype).sort().values
    ids = torch.randint(0, bound, (B, N), dtype=dtype)
    ids[:, : N // 2] = ids[:, :1]  # the same position many times
    return ids


def strided(B, nh, N, D):
    """q or k as V-JEPA 2 gets them: a (B, heads, N, head_dim) view of a (B, N, 3·heads·head_dim) qkv."""
    return torch.randn(B, N, 3, nh, D).permute(2, 0, 3, 1, 4)[1]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["vjepa2", "interleaved"])
@pytest.mark.parametrize("mode", ["batched-int64", "shared-int32", "none"])
def test_reference_is_the_vjepa_chain(shape, layout, mode):
    B, nh, N, D, grid = shape
    x = torch.randn(B, nh, N, D, dtype=torch.float64)
    ids = make_ids(mode, B, N, grid)
    torch.testing.assert_close(rope_reference(x, ids, grid, layout=layout), vjepa_chain(x, ids, grid, layout))


def test_vjepa2_layout_uses_each_frequency_twice_per_part():
    """The duplicated-frequency layout: channel c of a part of 10 uses omega[c mod 5]; the
    corrected one omega[c // 2]."""
    assert frequency_index(10, "vjepa2").tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert frequency_index(10, "interleaved").tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    x = torch.randn(1, 1, 5, 32, dtype=torch.float64)
    ids = torch.tensor([0, 7, 20, 33, 47])
    a = rope_reference(x, ids, (3, 4, 4), layout="vjepa2")
    b = rope_reference(x, ids, (3, 4, 4), layout="interleaved")
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a[..., 30:], x[..., 30:], rtol=0, atol=0)  # leftover channels untouched


def run(backend, q, k, ids, grid, layout, gq, gk):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    with use_backend(backend):
        qo, ko = rope_qk(q, k, ids, grid, layout=layout)
    torch.autograd.backward((qo, ko), (gq, gk))
    return qo.detach(), ko.detach(), q.grad, k.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["vjepa2", "interleaved"])
@pytest.mark.parametrize("mode", ["batched-int64", "batched-int32", "shared-int64", "none"])
def test_backend_matches_reference_forward_backward(backend, shape, layout, mode, poison_empty):
    B, nh, N, D, grid = shape
    q, k = strided(B, nh, N, D), torch.randn(B, nh, N, D)
    ids = make_ids(mode, B, N, grid)
    gq, gk = torch.randn(B, nh, N, D), torch.randn(B, nh, N, D).transpose(0, 1).contiguous().transpose(0, 1)
    got = run(backend, q, k, ids, grid, layout, gq, gk)
    expected = run("reference", q, k, ids, grid, layout, gq, gk)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# Triton's interpreter truncates fp32 -> bf16 (compiled Triton rounds to nearest even), so
# the bf16 case of the Triton kernel runs on a GPU only
@pytest.mark.parametrize(
    "backend, dtype",
    [pytest.param("triton", torch.bfloat16, marks=pytest.mark.gpu), ("triton", torch.float16),
     pytest.param("cpp", torch.bfloat16, marks=needs_ext), pytest.param("cpp", torch.float16, marks=needs_ext)],
)
def test_low_precision_angles_are_computed_in_the_input_dtype(backend, dtype):
    """As V-JEPA 2 does: omega and pos·omega rounded to q's dtype. The op then rotates in fp32
    and rounds once, so it sits within half an output ulp of the exact rotation by those
    angles — and clearly off the rotation by fp32 angles at the larger positions."""
    B, nh, N, D, grid = 2, 2, 40, 64, (None, 16, 16)
    device = "cuda" if backend == "triton" and dtype == torch.bfloat16 else "cpu"
    q, k = torch.randn(B, nh, N, D, dtype=dtype, device=device), torch.randn(B, nh, N, D, dtype=dtype, device=device)
    ids = torch.randint(8 * 256, 9 * 256, (B, N), device=device)  # frame 8: angles up to 8 rad per axis
    with use_backend(backend):
        qo, ko = rope_qk(q, k, ids, grid)
    for x, out in ((q, qo), (k, ko)):
        exact = rope_reference(x.double(), ids, grid, freq_dtype=dtype)
        fp32_angles = rope_reference(x.double(), ids, grid, freq_dtype=torch.float32)
        ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((out.double() - exact).abs() <= ulp / 2 + 1e-6 * (1 + exact.abs())).all()
        assert ((out.double() - fp32_angles).abs() > 3 * ulp).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_reference_is_the_bf16_chain(backend):
    """The reference in bf16 computes V-JEPA 2's chain in bf16 exactly (every rounding)."""
    q = torch.randn(2, 3, 19, 64, dtype=torch.bfloat16)
    ids = torch.randint(0, 4 * 64, (2, 19))
    torch.testing.assert_close(rope_reference(q, ids, (4, 8, 8)), vjepa_chain(q, ids, (4, 8, 8), "vjepa2"), rtol=0, atol=0)


def test_opcheck_triton():
    q, k = torch.randn(2, 2, 7, 32, requires_grad=True), torch.randn(2, 2, 7, 32, requires_grad=True)
    for ids in (torch.randint(0, 27, (2, 7), dtype=torch.int32), torch.randint(0, 27, (7,)), None):
        torch.library.opcheck(_rope_triton, (q, k, ids, 3, 9, 3, False, False))
        torch.library.opcheck(_rope_triton, (q, k, ids, 2, 9, 3, True, True))


@needs_ext
def test_opcheck_cpp():
    from fastjepa.ops import cpp  # noqa: F401 — registers fake and autograd

    op = torch.ops.fastjepa.rope_fwd
    q, k = torch.randn(2, 2, 7, 33, requires_grad=True), torch.randn(2, 2, 7, 33, requires_grad=True)
    for ids in (torch.randint(0, 27, (2, 7), dtype=torch.int32), torch.randint(0, 27, (7,)), None):
        torch.library.opcheck(op, (q, k, ids, 3, 9, 3, False, False))
        torch.library.opcheck(op, (q, k, ids, 2, 9, 3, True, True))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=needs_ext), "auto", "reference"])
def test_compiles_in_one_graph(backend):
    """torch.compile(fullgraph=True) of code calling rope_qk: the same values and gradients."""
    B, nh, N, D = 2, 2, 9, 32
    q, k = torch.randn(B, nh, N, D, requires_grad=True), torch.randn(B, nh, N, D, requires_grad=True)
    ids = torch.randint(0, 2 * 16, (B, N))

    def f(q, k, ids):
        qo, ko = rope_qk(q * 2.0, k, ids, (None, 4, 4))
        return (qo.sin() * ko).sum()

    torch._dynamo.reset()
    with use_backend(backend):
        eager = f(q, k, ids)
        g_eager = torch.autograd.grad(eager, (q, k))
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, ids)
        g_compiled = torch.autograd.grad(compiled, (q, k))
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_compiled, g_eager, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("head_dim", ValueError, r"head_dim=5 is too small for a 3-D grid: expected head_dim >= 6"),
        ("head_dim_2d", ValueError, r"head_dim=3 is too small for a 2-D grid: expected head_dim >= 4"),
        ("too_big", IndexError, r"ids holds 48, out of range for grid \(3, 4, 4\) \(expected 0 <= id < 48\)"),
        ("negative", IndexError, r"ids holds -1, out of range for grid \(None, 4, 4\) \(expected id >= 0\)"),
        ("none_too_many", IndexError, r"ids=None numbers the tokens 0..8, out of range for grid \(2, 2\)"),
        ("q_rank", ValueError, r"q: expected shape \(B, heads, N, head_dim\), got \(2, 9, 32\)"),
        ("k_shape", ValueError, r"k is \(2, 2, 9, 30\) torch.float32 on cpu, expected q's \(2, 2, 9, 32\)"),
        ("ids_rank", ValueError, r"ids has shape \(2, 9, 1\), expected \(2, 9\) or \(9,\)"),
        ("ids_float", ValueError, r"ids: expected int32 or int64 token ids, got torch.float32"),
        ("grid", ValueError, r"grid=\(4,\), expected \(T, H, W\) for video or \(H, W\) for images"),
        ("grid_zero", ValueError, r"grid=\(2, 0, 4\), expected positive int H and W"),
        ("layout", ValueError, r"layout='halves', expected one of 'vjepa2', 'interleaved'"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_inputs_raise(case, exc, match, backend):
    B, nh, N, D = 2, 2, 9, 32
    q, k = torch.randn(B, nh, N, D), torch.randn(B, nh, N, D)
    ids, grid, layout = torch.randint(0, 48, (B, N)), (3, 4, 4), "vjepa2"
    if case == "head_dim":
        q, k = q[..., :5], k[..., :5]
    elif case == "head_dim_2d":
        q, k, grid = q[..., :3], k[..., :3], (4, 4)
    elif case == "too_big":
        ids[1, 3] = 48
    elif case == "negative":
        ids[0, 0], grid = -1, (None, 4, 4)
    elif case == "none_too_many":
        ids, grid = None, (2, 2)
    elif case == "q_rank":
        q = q[0]
    elif case == "k_shape":
        k = k[..., :30]
    elif case == "ids_rank":
        ids = ids[..., None]
    elif case == "ids_float":
        ids = ids.float()
    elif case == "grid":
        grid = (4,)
    elif case == "grid_zero":
        grid = (2, 0, 4)
    elif case == "layout":
        layout = "halves"
    with use_backend(backend), pytest.raises(exc, match=match):
        rope_qk(q, k, ids, grid, layout=layout)


@needs_ext
def test_cpp_kernel_errors_name_the_bad_value():
    from fastjepa.ops import cpp  # noqa: F401

    op = torch.ops.fastjepa.rope_fwd
    q = torch.randn(2, 2, 9, 32)
    with pytest.raises(RuntimeError, match=r"head_dim=5 is too small for 3 axes: expected head_dim >= 6"):
        op(q[..., :5], q[..., :5], None, 3, 16, 4, False, False)
    with pytest.raises(RuntimeError, match=r"ids has shape \[2, 8\], expected \(2, 9\) or \(9\)"):
        op(q, q, torch.zeros(2, 8, dtype=torch.long), 3, 16, 4, False, False)
    with pytest.raises(RuntimeError, match=r"ids has dtype Float, expected int32 or int64"):
        op(q, q, torch.zeros(2, 9), 3, 16, 4, False, False)
    with pytest.raises(RuntimeError, match=r"n_axes=4, expected 2 \(H, W\) or 3 \(T, H, W\)"):
        op(q, q, None, 4, 16, 4, False, False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_low_precision_tolerance_rule(dtype, atol):
    """Kernel error vs the exact op (fp64, angles in the low dtype) ≤ 2× the error of the
    same-dtype PyTorch chain + atol, forward and backward."""
    B, nh, N, D, grid = 8, 16, 512, 64, (None, 16, 16)
    q, k = (torch.randn(B, N, 3, nh, D, device="cuda").permute(2, 0, 3, 1, 4)[i] for i in (0, 1))
    ids = torch.randint(0, 8 * 256, (B, N), device="cuda").sort(dim=1).values
    gq, gk = torch.randn(B, nh, N, D, device="cuda"), torch.randn(B, nh, N, D, device="cuda")
    low = [t.to(dtype) for t in (q, k, gq, gk)]
    kern = run("triton", low[0], low[1], ids, grid, "vjepa2", low[2], low[3])
    chain = run("reference", low[0], low[1], ids, grid, "vjepa2", low[2], low[3])
    qd, kd = (t.double().requires_grad_() for t in low[:2])
    exact = rope_qk_reference(qd, kd, ids, grid, freq_dtype=dtype)
    gexact = torch.autograd.grad(exact, (qd, kd), (low[2].double(), low[3].double()))
    for got, torch_, ex in zip(kern, chain, (*exact, *gexact), strict=True):
        err_k = (got.double() - ex).abs().max().item()
        err_t = (torch_.double() - ex).abs().max().item()
        assert err_k <= 2 * err_t + atol, (err_k, err_t)

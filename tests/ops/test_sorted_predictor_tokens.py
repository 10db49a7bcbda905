"""sorted_predictor_tokens / sorted_predictor_take_targets: every backend against the reference."""

import pytest
import torch

from fastjepa.ops import (
    SortedOrder,
    available,
    sorted_predictor_take_targets,
    sorted_predictor_take_targets_reference,
    sorted_predictor_tokens,
    sorted_predictor_tokens_reference,
    use_backend,
)
from fastjepa.ops.sorted_predictor_tokens import (
    _sort,
    _take_triton,
    _take_triton_backward,
    _tokens_triton,
    _tokens_triton_backward,
)

HAVE_CPP = bool(available()["cpp"])
BACKENDS = ["triton", pytest.param("cpp", marks=pytest.mark.skipif(not HAVE_CPP, reason="fastjepa._C is not built"))]

# (M, B, N, P, Kc, Kt, kind): kind "complement" — the context the sorted complement of the
# targets, as V-JEPA 2's generators make them; "random" — indices drawn with replacement,
# so repeated within a mask and overlapping between the two (ties in the sort); "same" —
# masks_y equal to masks_x (every position a tie). B=1; P=200 with prime K; M=2 pairs;
# the last: P = 300 (5 column tiles of 64) and L = 290 sorted slots (two chunks of the
# mask-token reduction)
SHAPES = [
    (1, 1, 16, 24, 5, 11, "complement"),
    (1, 3, 40, 200, 7, 13, "random"),
    (2, 2, 30, 40, 11, 5, "random"),
    (1, 2, 20, 16, 7, 7, "same"),
    (1, 2, 300, 300, 73, 217, "complement"),
]
# (has_cls, chop_last_n, with pos, pos requires grad)
CONFIGS = [(False, 0, True, False), (False, 0, False, False), (True, 0, True, True), (False, 3, True, False), (True, 2, False, False)]


def make_masks(M, B, N, Kc, Kt, kind, dtype):
    if kind == "complement":
        masks_x, masks_y = [], []
        for _ in range(M):
            perm = torch.rand(B, N).argsort(dim=1)
            masks_x.append(perm[:, :Kc].sort(dim=1).values.to(dtype))
            masks_y.append(perm[:, Kc : Kc + Kt].sort(dim=1).values.to(dtype))
        return masks_x, masks_y
    masks_x = [torch.randint(0, N, (B, Kc), dtype=dtype) for _ in range(M)]
    if kind == "same":
        return masks_x, [m.clone() for m in masks_x]
    return masks_x, [torch.randint(0, N, (B, Kt), dtype=dtype) for _ in range(M)]


def inputs(shape, idx_dtype=torch.int64, has_cls=False, with_pos=True, pos_grad=False):
    M, B, N, P, Kc, Kt, kind = shape
    ctx = torch.randn(M * B, int(has_cls) + Kc, P)
    mask_token = torch.randn(1, 1, P)
    pos = torch.randn(1, N, P).requires_grad_(pos_grad) if with_pos else None
    masks_x, masks_y = make_masks(M, B, N, Kc, Kt, kind, idx_dtype)
    return ctx, masks_x, masks_y, mask_token, pos


def run(backend, ctx, masks_x, masks_y, mask_token, pos, has_cls, chop, grads=None):
    """Forward, and backward with random upstream gradients through x and (unless chopped)
    the taken targets of a function of x; returns everything to compare and the grads."""
    ctx = ctx.detach().clone().requires_grad_()
    mask_token = mask_token.detach().clone().requires_grad_()
    if pos is not None:
        pos = pos.detach().clone().requires_grad_(pos.requires_grad)
    with use_backend(backend):
        x, positions, order = sorted_predictor_tokens(ctx, masks_x, masks_y, mask_token, pos, has_cls=has_cls, chop_last_n=chop)
        y = sorted_predictor_take_targets(x * 1.5, order) if chop == 0 else None
    if grads is None:
        grads = (torch.randn_like(x), None if y is None else torch.randn_like(y))
    loss = (x * grads[0]).sum() + (0 if y is None else (y * grads[1]).sum())
    loss.backward()
    got = dict(x=x.detach(), positions=positions, order=order.order, inverse=order.inverse, gctx=ctx.grad, gmt=mask_token.grad)
    if y is not None:
        got["y"] = y.detach()
    if pos is not None and pos.requires_grad:
        got["gpos"] = pos.grad
    return got, grads, order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"cls{int(c[0])}-chop{c[1]}-pos{int(c[2])}{'g' if c[3] else ''}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_forward_backward_match_reference(backend, shape, config, poison_empty):
    has_cls, chop, with_pos, pos_grad = config
    idx_dtype = torch.int32 if shape[4] % 2 else torch.int64  # both dtypes across the shapes
    args = inputs(shape, idx_dtype, has_cls, with_pos, pos_grad)
    expected, grads, ref_order = run("reference", *args, has_cls, chop)
    got, _, order = run(backend, *args, has_cls, chop, grads)
    assert isinstance(order, SortedOrder) and (order.n_ctxt, order.has_cls, order.chop) == (ref_order.n_ctxt, has_cls, chop)
    assert got.keys() == expected.keys()
    M, B, N, P, Kc, Kt, kind = shape
    R, L = M * B, Kc + Kt
    for name in ("positions", "order", "inverse"):
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert got["x"].shape == (R, int(has_cls) + L - chop, P)
    for name in ("x", "y", "gctx"):
        if name in expected:  # a copy, an add, or a gather: exact
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    # fp32 sums in another order: the mask-token gradient adds up to R·Kt rows, a pos row up to R·L
    torch.testing.assert_close(got["gmt"], expected["gmt"], rtol=1e-5, atol=max(1e-5, 2e-7 * R * Kt))
    if "gpos" in expected:
        torch.testing.assert_close(got["gpos"], expected["gpos"], rtol=1e-5, atol=max(1e-5, 2e-7 * R * L))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_ties_sort_stably_context_first(backend):
    """Equal positions: context tokens before target tokens, each in mask order."""
    P = 4
    masks_x = [torch.tensor([[3, 1, 3]])]
    masks_y = [torch.tensor([[3, 0]])]
    ctx = torch.arange(3.0).view(1, 3, 1).expand(1, 3, P).contiguous()  # token c holds c
    mask_token = torch.full((1, 1, P), -1.0)
    with use_backend(backend):
        x, positions, order = sorted_predictor_tokens(ctx, masks_x, masks_y, mask_token)
    assert positions.tolist() == [[0, 1, 3, 3, 3]]
    assert order.order.tolist() == [[4, 1, 0, 2, 3]]  # unsorted slots: ctx 0..2 (3, 1, 3), targets 3, 4 (3, 0)
    assert order.inverse.tolist() == [[2, 1, 3, 4, 0]]
    assert x[0, :, 0].tolist() == [-1.0, 1.0, 0.0, 2.0, -1.0]


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_rows_pair_context_mask_m_with_target_mask_m(backend):
    """Row m·B + b: context m of image b, merged with target mask m of image b."""
    M, B, N, P = 3, 2, 12, 4
    masks_x, masks_y = make_masks(M, B, N, 3, 2, "complement", torch.int64)
    ctx = torch.randn(M * B, 3, P)
    pos = torch.zeros(1, N, P)
    pos[0, :, 0] = torch.arange(N, dtype=torch.float32) * 100  # channel 0 encodes the position
    with use_backend(backend):
        x, positions, order = sorted_predictor_tokens(ctx, masks_x, masks_y, torch.zeros(1, 1, P), pos)
        y = sorted_predictor_take_targets(x, order)
    for m in range(M):
        for b in range(B):
            r = m * B + b
            want = torch.cat([masks_x[m][b], masks_y[m][b]]).sort().values
            assert positions[r].tolist() == want.tolist()
            torch.testing.assert_close(y[r, :, 0], masks_y[m][b].float() * 100)
            for c in range(3):  # each context token lands at its position's sorted slot, pos added
                s = int((want == masks_x[m][b][c]).nonzero())
                torch.testing.assert_close(x[r, s, 1:], ctx[r, c, 1:])
                torch.testing.assert_close(x[r, s, 0], ctx[r, c, 0] + 100 * masks_x[m][b][c].float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_write_every_element(backend, poison_empty):
    """Large enough for several tiles and reduction chunks; poisoned empties must all be overwritten."""
    args = inputs((1, 2, 600, 48, 150, 400, "complement"), has_cls=True)
    expected, grads, _ = run("reference", *args, True, 0)
    got, _, _ = run(backend, *args, True, 0, grads)
    for name in ("x", "y", "gctx"):
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    torch.testing.assert_close(got["gmt"], expected["gmt"], rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_round_as_the_chain_does(backend):
    """bf16 context, fp32 mask token and pos (bf16 autocast): context tokens are ctx + pos
    rounded to bf16 (an in-place add), targets fp32, the output fp32 (cat promotes)."""
    ctx, masks_x, masks_y, mask_token, pos = inputs((1, 2, 30, 16, 7, 9, "complement"))
    ctx = ctx.bfloat16()
    if backend == "triton":
        pytest.importorskip("triton")
    expected, _, _ = sorted_predictor_tokens_reference(ctx, masks_x, masks_y, mask_token, pos)
    with use_backend(backend):
        got, _, order = sorted_predictor_tokens(ctx, masks_x, masks_y, mask_token, pos)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    is_ctx = order.order < 7  # the context slots hold bf16 values
    assert torch.equal(got[is_ctx], got[is_ctx].bfloat16().float())


@pytest.mark.parametrize("with_pos", [True, False])
def test_opcheck_triton(with_pos):
    ctx, masks_x, masks_y, mask_token, pos = inputs((1, 2, 20, 24, 5, 7, "random"), torch.int32, True, with_pos)
    positions, order, inverse = _sort(torch.cat(masks_x), torch.cat(masks_y))
    ctx.requires_grad_()
    mask_token.requires_grad_()
    if pos is not None:
        pos.requires_grad_()
    torch.library.opcheck(_tokens_triton, (ctx, order, inverse, positions, pos, mask_token, True, 0))
    torch.library.opcheck(_tokens_triton, (ctx, order, inverse, positions, pos, mask_token, True, 3))
    y = torch.randn(2, 13, 24, requires_grad=True)
    torch.library.opcheck(_take_triton, (y, order, inverse, 5, True))
    for pos_grad in (True, False):
        grad = torch.randn(2, 13, 24)
        args = (grad, order, inverse, positions, 5, True, 20, torch.float32, torch.float32, torch.float32, pos_grad)
        torch.library.opcheck(_tokens_triton_backward, args)
    torch.library.opcheck(_take_triton_backward, (torch.randn(2, 7, 24), order, 5, True, torch.float32))


@pytest.mark.skipif(not HAVE_CPP, reason="fastjepa._C is not built")
@pytest.mark.parametrize("with_pos", [True, False])
def test_opcheck_cpp(with_pos):
    from fastjepa.ops import cpp  # noqa: F401 — fakes and autograd

    ops = torch.ops.fastjepa
    ctx, masks_x, masks_y, mask_token, pos = inputs((1, 2, 20, 24, 5, 7, "random"), torch.int32, True, with_pos)
    positions, order, inverse = _sort(torch.cat(masks_x), torch.cat(masks_y))
    ctx.requires_grad_()
    mask_token.requires_grad_()
    if pos is not None:
        pos.requires_grad_()
    torch.library.opcheck(ops.sorted_predictor_tokens_fwd, (ctx, order, inverse, positions, pos, mask_token, True, 0))
    no_cls = ctx[:, 1:].detach().requires_grad_()
    torch.library.opcheck(ops.sorted_predictor_tokens_fwd, (no_cls, order, inverse, positions, pos, mask_token, False, 2))
    y = torch.randn(2, 13, 24, requires_grad=True)
    torch.library.opcheck(ops.sorted_predictor_take_fwd, (y, order, inverse, 5, True))
    for pos_grad in (True, False):
        args = (torch.randn(2, 13, 24), order, inverse, positions, 5, True, 20, torch.float32, pos_grad)
        torch.library.opcheck(ops.sorted_predictor_tokens_bwd, args)
    torch.library.opcheck(ops.sorted_predictor_take_bwd, (torch.randn(2, 7, 24), order, 5, True, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """Code calling the public ops compiles with fullgraph=True; values and gradients equal eager."""
    ctx, masks_x, masks_y, mask_token, pos = inputs((1, 2, 20, 24, 5, 7, "complement"), has_cls=True)
    ctx.requires_grad_()
    mask_token.requires_grad_()

    def step(ctx, masks_x, masks_y, mask_token, pos):
        x, positions, order = sorted_predictor_tokens(ctx, masks_x, masks_y, mask_token, pos, has_cls=True)
        return sorted_predictor_take_targets(x.sin(), order), positions

    torch._dynamo.reset()
    with use_backend(backend):
        y, positions = torch.compile(step, backend="aot_eager", fullgraph=True)(ctx, masks_x, masks_y, mask_token, pos)
    with use_backend("reference"):
        y_ref, positions_ref = step(ctx, masks_x, masks_y, mask_token, pos)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (ctx, mask_token), grad)
    expected = torch.autograd.grad(y_ref, (ctx, mask_token), grad)
    torch._dynamo.reset()
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(positions, positions_ref)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("ctx_rank", ValueError, r"ctx: expected shape \(B, N, D\), got \(6, 16\)"),
        ("pairs", ValueError, r"masks_y: 1 masks, expected one per context mask \(len\(masks_x\)=2\)"),
        ("batch", ValueError, r"ctx: batch 5 is not a multiple of len\(masks_x\)=2"),
        ("kc", ValueError, r"masks_x: 4 indices per mask, expected ctx.size\(1\)=5"),
        ("kc_cls", ValueError, r"masks_x: 5 indices per mask, expected ctx.size\(1\) - 1 = 4 \(has_cls"),
        ("target_batch", ValueError, "masks_y: masks have batch size 4, expected 3"),
        ("chop", ValueError, r"chop_last_n: expected an int in \[0, 8\] \(the sequence has Kc\+Kt=8 tokens\), got 9"),
        ("chop_type", ValueError, r"chop_last_n: expected an int in \[0, 8\] .*got 1.0"),
        ("has_cls", ValueError, r"has_cls: expected a bool, got 1"),
        ("mask_token", ValueError, r"mask_token: expected shape \(1, 1, 16\), got \(16,\)"),
        ("pos_width", ValueError, r"pos_embed: expected shape \(1, N, 16\) or None, got \(1, 12, 8\)"),
        ("num_patches", ValueError, r"num_patches=10 differs from pos_embed's 12 tokens"),
        ("index_dtype", ValueError, r"masks_y\[0\]: expected int32 or int64 indices, got torch.int16"),
        ("range", IndexError, r"masks_y\[1\]: index 12 is out of range for 12 tokens \(expected 0 <= index < 12\)"),
        ("range_no_pos", IndexError, r"masks_x\[0\]: index -1 is out of range for 12 tokens"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_bad_inputs_raise(case, exc, match, backend):
    """The same error from every backend, naming the argument, the value and what was expected."""
    ctx, masks_x, masks_y, mask_token, pos = inputs((2, 3, 12, 16, 5, 3, "random"))
    kw = {}
    if case == "ctx_rank":
        ctx = ctx[:, 0]
    elif case == "pairs":
        masks_y = masks_y[:1]
    elif case == "batch":
        ctx = ctx[:5]
    elif case == "kc":
        masks_x = [m[:, :4] for m in masks_x]
    elif case == "kc_cls":
        kw["has_cls"] = True
    elif case == "target_batch":
        masks_y = [torch.randint(0, 12, (4, 3)) for _ in masks_y]
    elif case == "chop":
        kw["chop_last_n"] = 9
    elif case == "chop_type":
        kw["chop_last_n"] = 1.0
    elif case == "has_cls":
        kw["has_cls"] = 1
    elif case == "mask_token":
        mask_token = mask_token.view(16)
    elif case == "pos_width":
        pos = torch.randn(1, 12, 8)
    elif case == "num_patches":
        kw["num_patches"] = 10
    elif case == "index_dtype":
        masks_y = [m.to(torch.int16) for m in masks_y]
    elif case == "range":
        masks_y[1][0, 0] = 12
    elif case == "range_no_pos":
        pos = None
        kw["num_patches"] = 12
        masks_x[0][1, 2] = -1
    with use_backend(backend), pytest.raises(exc, match=match):
        sorted_predictor_tokens(ctx, masks_x, masks_y, mask_token, pos, **kw)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_take_rejects_a_chopped_or_mismatched_sequence(backend):
    ctx, masks_x, masks_y, mask_token, pos = inputs((1, 2, 12, 8, 5, 3, "complement"))
    with use_backend(backend):
        x, _, order = sorted_predictor_tokens(ctx, masks_x, masks_y, mask_token, pos, chop_last_n=2)
        with pytest.raises(ValueError, match=r"built with chop_last_n=2; chopped tokens cannot be un-sorted"):
            sorted_predictor_take_targets(x, order)
        x, _, order = sorted_predictor_tokens(ctx, masks_x, masks_y, mask_token, pos)
        with pytest.raises(ValueError, match=r"y: expected shape \(2, 8, D\) \(the sorted sequence\), got \(2, 7, 8\)"):
            sorted_predictor_take_targets(x[:, 1:], order)
        with pytest.raises(ValueError, match=r"order: expected the SortedOrder returned by sorted_predictor_tokens, got tuple"):
            sorted_predictor_take_targets(x, tuple(order)[:2])


def test_take_reference_inverts_the_sort():
    """The reference's take, applied to the sorted sequence itself, gives back the target tokens."""
    ctx, masks_x, masks_y, mask_token, pos = inputs((2, 3, 30, 8, 7, 6, "random"), has_cls=True)
    x, _, order = sorted_predictor_tokens_reference(ctx, masks_x, masks_y, mask_token, pos, has_cls=True)
    ids_y = torch.cat(masks_y)
    torch.testing.assert_close(sorted_predictor_take_targets_reference(x, order), mask_token + pos[0][ids_y])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_low_precision_tolerance_rule(dtype, atol):
    """Kernel error vs an fp32 reference ≤ 2× the same-dtype PyTorch error + atol."""
    ctx, masks_x, masks_y, mask_token, pos = inputs((1, 24, 2048, 384, 560, 1488, "complement"))
    cuda = lambda t: None if t is None else (t.cuda() if isinstance(t, torch.Tensor) else [m.cuda() for m in t])  # noqa: E731
    args32 = [cuda(t) for t in (ctx, masks_x, masks_y, mask_token, pos)]
    exact, grads, _ = run("reference", *args32, False, 0)
    low = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in args32]
    grads_low = tuple(g.to(dtype) for g in grads)
    with_torch, _, _ = run("reference", *low, False, 0, grads_low)
    with_kernel, _, _ = run("triton", *low, False, 0, grads_low)
    for name in ("x", "y", "gctx", "gmt"):
        err_k = (with_kernel[name].float() - exact[name]).abs().max().item()
        err_t = (with_torch[name].float() - exact[name]).abs().max().item()
        assert err_k <= 2 * err_t + atol, (name, err_k, err_t)

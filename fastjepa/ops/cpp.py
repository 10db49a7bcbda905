"""The C++/CUDA extension ``fastjepa._C`` as Python functions: every op's fake
implementation and autograd, registered in this one module.

The extension defines the ops (``torch.ops.fastjepa.*``) and their CPU (and, when built
with CUDA, ``gather_tokens``'s CUDA) kernels; importing this module loads it and adds
what ``torch.compile`` and autograd need: a fake implementation per op
(``torch.library.register_fake``: shapes and dtypes only) and the backward of each
forward op (``torch.library.register_autograd``).

* ``gather_tokens(x, idx, pos)``: x (B, N, D), idx (M, B, K), pos (1, Npos ≥ N, D) or
  None -> (M·B, K, D). Backward sums repeated indices into grad_x (each row written
  once, fp32 sums); pos gets a gradient only if it requires one.
* ``predictor_tokens(ctx, idx_x, idx, pos, mask_token)`` -> (npred·nenc·B, Kc+Kt, P),
  row ``(j·nenc + i)·B + b`` = ``[ctx[i·B+b] + pos[idx_x[i, b]] ; mask_token + pos[idx[j, b]]]``.
* ``target_tokens(h, idx, nenc)``: layer-norm (no affine, eps 1e-5, fp32 statistics),
  gather, repeat in (j, i, b) order; no gradient.
* ``rope_qk(q, k, ids, n_axes, tpf, tpr, interleaved)``: the rotation of
  :mod:`fastjepa.ops.rope`; its backward is the same op with ``backward`` flipped (the
  transpose of the rotation map), so double backward works too.
* ``sorted_predictor_tokens(...)`` / ``sorted_predictor_take(...)``: the kernels of
  :mod:`fastjepa.ops.sorted_predictor_tokens` (see there for the semantics).
* The mask samplers ``sample_masks``, ``sample_masks_sized`` (2-D, used by
  :mod:`fastjepa.masks.multiblock`) and ``sample_masks3d`` (:mod:`fastjepa.masks.multiblock3d`):
  fakes only (integer outputs, no gradient); their lengths depend on the drawn blocks,
  so the fakes return unbacked sizes.

Mixed float dtypes are computed in their promoted dtype (the smaller tensors, pos and
mask_token, are converted; a larger one only when it is the lower-precision input).
An op the loaded library was compiled without is not registered (:func:`has_op` says
which are there). Import this module only when ``fastjepa.ops.available()["cpp"]`` is true.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401 — loads the library, registers torch.ops.fastjepa

_ops = torch.ops.fastjepa


def has_op(name: str) -> bool:
    """Whether the loaded library defines ``torch.ops.fastjepa.<name>``."""
    return hasattr(_ops, name)


def _promote(*ts: torch.Tensor) -> torch.dtype:
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# -- mask samplers: fake implementations -------------------------------------------------


@torch.library.register_fake("fastjepa::sample_masks")
def _(B, H, W, enc_scale, pred_scale, aspect, nenc, npred, min_keep, allow_overlap, seed):
    fctx = torch.library.get_ctx()
    kc, kt = fctx.new_dynamic_size(), fctx.new_dynamic_size()  # data-dependent mask lengths
    return torch.empty((nenc, B, kc), dtype=torch.int64), torch.empty((npred, B, kt), dtype=torch.int64)


if has_op("sample_masks_sized"):

    @torch.library.register_fake("fastjepa::sample_masks_sized")
    def _(B, H, W, pred_size, enc_size, nenc, npred, min_keep, allow_overlap, exclusive_corners, seed):
        fctx = torch.library.get_ctx()
        kc = fctx.new_dynamic_size()  # data-dependent context length
        kt = pred_size[0] * pred_size[1]  # targets are whole rectangles
        return torch.empty((nenc, B, kc), dtype=torch.int64), torch.empty((npred, B, kt), dtype=torch.int64)


if has_op("sample_masks3d"):

    @torch.library.register_fake("fastjepa::sample_masks3d")
    def _(B, T, H, W, temporal_scale, spatial_scale, aspect, num_blocks, max_context_frames, max_keep,
          full_complement, pred_full_complement, seed, block_size=None):  # fmt: skip
        fctx = torch.library.get_ctx()
        kc, kt = fctx.new_dynamic_size(), fctx.new_dynamic_size()  # data-dependent mask lengths
        return torch.empty((B, kc), dtype=torch.int64), torch.empty((B, kt), dtype=torch.int64)


# -- gather_tokens, predictor_tokens, target_tokens -------------------------------------


@torch.library.register_fake("fastjepa::gather_tokens_fwd")
def _(x, idx, pos):
    M, B, K = idx.shape
    dtype = x.dtype if pos is None else _promote(x, pos)
    return x.new_empty((M * B, K, x.size(-1)), dtype=dtype)


@torch.library.register_fake("fastjepa::gather_tokens_bwd")
def _(grad, idx, n, x_dtype, pos_grad):
    B, D = idx.size(1), grad.size(-1)
    return grad.new_empty((B, n, D), dtype=x_dtype), grad.new_empty((n if pos_grad else 0, D), dtype=torch.float32)


@torch.library.register_fake("fastjepa::predictor_tokens_fwd")
def _(ctx, idx_x, idx, pos, mask_token):
    nenc, B, Kc = idx_x.shape
    npred, _, Kt = idx.shape
    return ctx.new_empty((npred * nenc * B, Kc + Kt, ctx.size(-1)), dtype=_promote(ctx, pos, mask_token))


@torch.library.register_fake("fastjepa::predictor_tokens_bwd")
def _(grad, nenc, npred, Kc, ctx_dtype):
    B, P = grad.size(0) // (nenc * npred), grad.size(-1)
    return grad.new_empty((nenc * B, Kc, P), dtype=ctx_dtype), grad.new_empty((P,), dtype=torch.float32)


@torch.library.register_fake("fastjepa::target_tokens")
def _(h, idx, nenc):
    npred, B, Kt = idx.shape
    return h.new_empty((npred * nenc * B, Kt, h.size(-1)))


def _gather_setup(ctx, inputs, output):
    x, idx, pos = inputs
    ctx.save_for_backward(idx)
    ctx.n, ctx.x_dtype = x.size(1), x.dtype
    ctx.pos_shape = None if pos is None else pos.shape
    ctx.pos_dtype = None if pos is None else pos.dtype


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    pos_grad = ctx.pos_shape is not None and bool(ctx.needs_input_grad[2])
    gx, gpos = _ops.gather_tokens_bwd(grad, idx, ctx.n, ctx.x_dtype, pos_grad)  # (B, n, D), fp32 (n | 0, D)
    if not pos_grad:
        return gx, None, None
    npos = ctx.pos_shape[1]
    gpos = torch.nn.functional.pad(gpos, (0, 0, 0, npos - ctx.n)).unsqueeze(0).to(ctx.pos_dtype)  # (1, Npos, D)
    return gx, None, gpos


torch.library.register_autograd("fastjepa::gather_tokens_fwd", _gather_backward, setup_context=_gather_setup)


def _predictor_setup(ctx, inputs, output):
    c, idx_x, idx, pos, mask_token = inputs
    ctx.save_for_backward(idx_x, idx)
    ctx.ctx_dtype, ctx.pos_shape, ctx.pos_dtype = c.dtype, pos.shape, pos.dtype
    ctx.mt_dtype, ctx.mt_shape = mask_token.dtype, mask_token.shape


def _predictor_backward(ctx, grad):
    idx_x, idx = ctx.saved_tensors
    nenc, B, Kc = idx_x.shape
    npred = idx.size(0)
    gctx, gmt = _ops.predictor_tokens_bwd(grad, nenc, npred, Kc, ctx.ctx_dtype)  # (nenc·B, Kc, P), fp32 (P,)
    gpos = None
    if ctx.needs_input_grad[3]:  # the pos table is fixed in I-JEPA; this path is for generality
        P = grad.size(-1)
        g = grad.float().view(npred, nenc, B, Kc + idx.size(2), P)
        gpos = torch.zeros((ctx.pos_shape[1], P), dtype=torch.float32, device=grad.device)
        gpos.index_add_(0, idx_x.reshape(-1).long(), g[..., :Kc, :].sum(0).reshape(-1, P))
        gpos.index_add_(0, idx.reshape(-1).long(), g[..., Kc:, :].sum(1).reshape(-1, P))
        gpos = gpos.unsqueeze(0).to(ctx.pos_dtype)  # (1, N, P)
    return gctx, None, None, gpos, gmt.to(ctx.mt_dtype).reshape(ctx.mt_shape)


torch.library.register_autograd("fastjepa::predictor_tokens_fwd", _predictor_backward, setup_context=_predictor_setup)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D), (M, B, K) int32/int64, (1, Npos, D) or None -> (M·B, K, D)."""
    return _ops.gather_tokens_fwd(x, idx, pos)


def predictor_tokens(
    ctx: torch.Tensor, idx_x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """(nenc·B, Kc, P), (nenc, B, Kc), (npred, B, Kt), (1, N, P), (1, 1, P) -> (npred·nenc·B, Kc+Kt, P)."""
    return _ops.predictor_tokens_fwd(ctx, idx_x, idx, pos, mask_token)


def target_tokens(h: torch.Tensor, idx: torch.Tensor, nenc: int) -> torch.Tensor:
    """(B, N, D), (npred, B, Kt) -> (npred·nenc·B, Kt, D), no grad."""
    return _ops.target_tokens(h.detach(), idx, nenc)


# -- rope_qk (csrc/rope_cpu.cpp) ---------------------------------------------------------

if has_op("rope_fwd"):

    @torch.library.register_fake("fastjepa::rope_fwd")
    def _(q, k, ids, n_axes, tpf, tpr, interleaved, backward):
        return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)

    def _rope_setup(ctx, inputs, output):
        q, k, ids, n_axes, tpf, tpr, interleaved, backward = inputs
        ctx.save_for_backward(ids)
        ctx.args = (n_axes, tpf, tpr, interleaved, not backward)

    def _rope_backward(ctx, gq, gk):
        (ids,) = ctx.saved_tensors
        gq, gk = _ops.rope_fwd(gq, gk, ids, *ctx.args)
        return gq, gk, None, None, None, None, None, None

    torch.library.register_autograd("fastjepa::rope_fwd", _rope_backward, setup_context=_rope_setup)


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor | None, n_axes: int, tpf: int, tpr: int, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, N, D) q, k, (B, N) | (N,) | None ids -> rotated (q, k), contiguous."""
    return _ops.rope_fwd(q, k, ids, n_axes, tpf, tpr, interleaved, False)


# -- sorted_predictor_tokens / take (csrc/sorted_predictor_cpu.cpp) ---------------------
#
# tokens backward: ctx through the inverse permutation, the mask token summed over every
# kept target slot, pos (only if it requires a gradient) summed at every kept position;
# take backward: the gradient at the target slots, zeros elsewhere.

if has_op("sorted_predictor_tokens_fwd"):

    @torch.library.register_fake("fastjepa::sorted_predictor_tokens_fwd")
    def _(ctx, order, inverse, positions, pos, mask_token, has_cls, chop):
        R, L = order.shape
        dtype = _promote(ctx, mask_token) if pos is None else _promote(ctx, mask_token, pos)
        return ctx.new_empty((R, int(has_cls) + L - chop, ctx.size(-1)), dtype=dtype)

    @torch.library.register_fake("fastjepa::sorted_predictor_tokens_bwd")
    def _(grad, order, inverse, positions, n_ctxt, has_cls, npos, ctx_dtype, pos_grad):
        R, P = order.size(0), grad.size(-1)
        gctx = grad.new_empty((R, int(has_cls) + n_ctxt, P), dtype=ctx_dtype)
        gpos = grad.new_empty((npos, P) if pos_grad else (0,), dtype=torch.float32)
        return gctx, grad.new_empty((P,), dtype=torch.float32), gpos

    @torch.library.register_fake("fastjepa::sorted_predictor_take_fwd")
    def _(y, order, inverse, n_ctxt, has_cls):
        return y.new_empty((y.size(0), inverse.size(1) - n_ctxt, y.size(-1)))

    @torch.library.register_fake("fastjepa::sorted_predictor_take_bwd")
    def _(grad, order, n_ctxt, has_cls, y_dtype):
        return grad.new_empty((grad.size(0), int(has_cls) + order.size(1), grad.size(-1)), dtype=y_dtype)

    def _tokens_setup(ctx, inputs, output):
        c, order, inverse, positions, pos, mask_token, has_cls, chop = inputs
        ctx.save_for_backward(order, inverse, positions)
        ctx.n_ctxt, ctx.has_cls, ctx.ctx_dtype = c.size(1) - int(has_cls), has_cls, c.dtype
        ctx.npos = 0 if pos is None else pos.size(1)
        ctx.pos_dtype = None if pos is None else pos.dtype
        ctx.mt_dtype, ctx.mt_shape = mask_token.dtype, mask_token.shape

    def _tokens_backward(ctx, grad):
        order, inverse, positions = ctx.saved_tensors
        pos_grad = ctx.npos > 0 and bool(ctx.needs_input_grad[4])
        gctx, gmt, gpos = _ops.sorted_predictor_tokens_bwd(
            grad, order, inverse, positions, ctx.n_ctxt, ctx.has_cls, ctx.npos, ctx.ctx_dtype, pos_grad
        )  # (R, has_cls + Kc, P), fp32 (P,), fp32 (npos, P) | (0,)
        gpos = gpos.unsqueeze(0).to(ctx.pos_dtype) if pos_grad else None
        return gctx, None, None, None, gpos, gmt.to(ctx.mt_dtype).reshape(ctx.mt_shape), None, None

    torch.library.register_autograd("fastjepa::sorted_predictor_tokens_fwd", _tokens_backward, setup_context=_tokens_setup)

    def _take_setup(ctx, inputs, output):
        y, order, inverse, n_ctxt, has_cls = inputs
        ctx.save_for_backward(order)
        ctx.n_ctxt, ctx.has_cls, ctx.y_dtype = n_ctxt, has_cls, y.dtype

    def _take_backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return _ops.sorted_predictor_take_bwd(grad, order, ctx.n_ctxt, ctx.has_cls, ctx.y_dtype), None, None, None, None

    torch.library.register_autograd("fastjepa::sorted_predictor_take_fwd", _take_backward, setup_context=_take_setup)


def sorted_predictor_tokens(
    ctx: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    positions: torch.Tensor,
    pos: torch.Tensor | None,
    mask_token: torch.Tensor,
    has_cls: bool,
    chop: int,
) -> torch.Tensor:
    """(R, has_cls + Kc, P), (R, L) x 3, (1, N, P) or None, (1, 1, P) -> (R, has_cls + L - chop, P)."""
    return _ops.sorted_predictor_tokens_fwd(ctx, order, inverse, positions, pos, mask_token, has_cls, chop)


def sorted_predictor_take(y: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, n_ctxt: int, has_cls: bool) -> torch.Tensor:
    """(R, has_cls + L, D), (R, L) x 2 -> (R, L - n_ctxt, D)."""
    return _ops.sorted_predictor_take_fwd(y, order, inverse, n_ctxt, has_cls)

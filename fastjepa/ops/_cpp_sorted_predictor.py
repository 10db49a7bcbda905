"""The C++ kernels of the sorted predictor input (``csrc/sorted_predictor_cpu.cpp``) as
differentiable Python functions: a fake implementation per op for ``torch.compile`` and
the backward of each forward op.

* ``sorted_predictor_tokens(ctx, order, inverse, positions, pos, mask_token, has_cls, chop)``
  -> (R, has_cls + L - chop, P); backward: ctx through the inverse permutation, the mask
  token summed over every kept target slot, pos (only if it requires a gradient) summed at
  every kept position.
* ``sorted_predictor_take(y, order, inverse, n_ctxt, has_cls)`` -> (R, L - n_ctxt, D);
  backward: the gradient at the target slots, zeros elsewhere.

See :mod:`fastjepa.ops.sorted_predictor_tokens` for the semantics. Import this module only
when ``fastjepa.ops.available()["cpp"]`` is true.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401 — loads the library, registers torch.ops.fastjepa
from ._cpp import _promote  # one dtype-promotion rule for every C++ op

_ops = torch.ops.fastjepa


# -- fake implementations (shapes and dtypes only) --------------------------------------


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


# -- autograd ---------------------------------------------------------------------------


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


# -- public functions -------------------------------------------------------------------


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

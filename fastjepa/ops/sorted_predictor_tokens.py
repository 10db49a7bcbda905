"""Sorted predictor input and its inverse, for V-JEPA 2's predictor.

V-JEPA 2's predictor pairs context mask *m* with target mask *m* (one pair per call in its
training; here any M = len(masks_x) = len(masks_y) pairs). For row ``r = m·B + b`` it builds

* the context tokens ``ctx[r] (+ pos[masks_x[m][b]])`` — Kc tokens, already embedded to P,
* the target tokens ``mask_token (+ pos[masks_y[m][b]])`` — Kt tokens,

merges the two by token position (the concatenated masks sorted per row), optionally drops
the last ``chop_last_n`` tokens of the sorted sequence and puts an unsorted class token in
front (``has_cls``: ``ctx`` then carries it as its first token, which has no mask entry and
no pos). After the predictor blocks, :func:`sorted_predictor_take_targets` un-sorts the
sequence and keeps the Kt target tokens, in the order of ``masks_y``.

Without a pos table (RoPE models) the blocks need the sorted positions, so the forward also
returns them (the masks the original passes to its blocks).

Ties (a position in both masks, or twice in one): the order is the *stable* sort of
``cat([masks_x, masks_y])`` — context tokens before target tokens, each in mask order.
V-JEPA 2 calls ``torch.argsort`` without ``stable=True``, whose order of equal keys is
unspecified; its mask generators never produce ties (context and targets are complements,
each a sorted set of distinct indices, truncated or complemented again), and the
predictor's output does not depend on the tie order anyway: attention is
permutation-equivariant (RoPE rotates by position, not by slot), so only the sequence
order of ``chop_last_n`` or of a caller keeping all tokens sees it.

Dtypes follow the chain it replaces: a context token is ``ctx + pos`` rounded to ctx's
dtype (V-JEPA 2 adds the pos in place), a target token ``mask_token + pos`` in their
promoted dtype; the output has the promoted dtype of all three (``torch.cat`` promotes).

Fused paths: the per-row order is one batched stable ``torch.sort`` of the (M·B, Kc+Kt)
positions; then one kernel writes the sorted sequence (no repeat, cat or per-row loop),
and the un-sort + take of the targets is one gather. Backward: ctx's gradient is a gather
through the inverse permutation (each element written once, zeros for chopped tokens), the
mask token's the fp32 sum over every kept target slot, the pos table's (only if it
requires one) a scatter-add at every kept position; the take's backward is a gather
through the order, zeros at context slots.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _validate as checks
from ._dispatch import assume_constant_result, available, direct, kernels, select


class SortedOrder(NamedTuple):
    """How a sorted predictor sequence was built; :func:`sorted_predictor_take_targets` reads it.

    ``order[r, s]``: the unsorted slot (0..Kc-1 context, Kc.. target) at sorted slot s.
    ``inverse[r, t]``: the sorted slot of unsorted slot t (``order``'s inverse permutation).
    """

    order: torch.Tensor  # (M·B, Kc+Kt) int64
    inverse: torch.Tensor  # (M·B, Kc+Kt) int64
    n_ctxt: int  # Kc, context tokens per row (the class token not counted)
    has_cls: bool  # the sequence starts with an unsorted class token
    chop: int  # tokens dropped from the end of the sorted sequence


# -- reference ---------------------------------------------------------------------------


def sorted_predictor_tokens_reference(
    ctx: torch.Tensor,
    masks_x: torch.Tensor | Sequence[torch.Tensor],
    masks_y: torch.Tensor | Sequence[torch.Tensor],
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    *,
    has_cls: bool = False,
    chop_last_n: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, SortedOrder]:
    """Reference, written from the semantics in the module docstring (no checks)."""
    masks_x = [masks_x] if isinstance(masks_x, torch.Tensor) else list(masks_x)
    masks_y = [masks_y] if isinstance(masks_y, torch.Tensor) else list(masks_y)
    cls = ctx[:, :1] if has_cls else None  # (M·B, 1, P)
    ctx = ctx[:, 1:] if has_cls else ctx  # (M·B, Kc, P)
    ids_x = torch.cat(masks_x, dim=0)  # (M·B, Kc): row m·B + b is masks_x[m][b]
    ids_y = torch.cat(masks_y, dim=0)  # (M·B, Kt)
    R, Kt, P = ids_y.size(0), ids_y.size(1), ctx.size(-1)
    if pos_embed is not None:
        table = pos_embed[0]  # (N, P)
        ctx = (ctx + table[ids_x.long()]).to(ctx.dtype)  # (M·B, Kc, P), rounded as an in-place add
        tgt = mask_token + table[ids_y.long()]  # (M·B, Kt, P)
    else:
        tgt = mask_token.expand(R, Kt, P)  # (M·B, Kt, P)
    x = torch.cat([ctx, tgt], dim=1)  # (M·B, L, P), L = Kc + Kt
    ids = torch.cat([ids_x, ids_y], dim=1)  # (M·B, L)
    order = torch.argsort(ids, dim=1, stable=True)  # (M·B, L)
    positions = torch.gather(ids, 1, order)  # (M·B, L)
    x = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, P))  # (M·B, L, P)
    L = ids.size(1)
    x, positions = x[:, : L - chop_last_n], positions[:, : L - chop_last_n]  # (M·B, L - chop, ·)
    if has_cls:
        x = torch.cat([cls, x], dim=1)  # (M·B, 1 + L - chop, P)
    inverse = torch.argsort(order, dim=1)  # (M·B, L)
    return x, positions, SortedOrder(order, inverse, ctx.size(1), has_cls, chop_last_n)


def sorted_predictor_take_targets_reference(y: torch.Tensor, order: SortedOrder) -> torch.Tensor:
    """Reference: (M·B, has_cls + Kc + Kt, D) sorted sequence -> (M·B, Kt, D) targets in mask order."""
    y = y[:, 1:] if order.has_cls else y  # (M·B, L, D)
    y = torch.gather(y, 1, order.inverse.unsqueeze(-1).expand(-1, -1, y.size(-1)))  # unsorted (M·B, L, D)
    return y[:, order.n_ctxt :]  # (M·B, Kt, D)


# -- the order (shared by the fused backends) --------------------------------------------


def _sort(idx_x: torch.Tensor, idx_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, Kc), (R, Kt) -> positions (R, L) sorted, order (R, L), inverse (R, L) int64."""
    ids = torch.cat([idx_x, idx_y], dim=1)  # (R, L), a few bytes per token
    positions, order = torch.sort(ids, dim=1, stable=True)  # (R, L), (R, L)
    R, L = order.shape
    slots = torch.arange(L, device=order.device).expand(R, L)  # (R, L)
    inverse = order.new_empty(order.shape).scatter_(1, order, slots)  # (R, L): order is a permutation per row
    return positions, order, inverse


def _out_dtype(ctx: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor | None) -> torch.dtype:
    dtype = torch.promote_types(ctx.dtype, mask_token.dtype)
    return dtype if pos is None else torch.promote_types(dtype, pos.dtype)


# -- Triton custom ops -------------------------------------------------------------------


@torch.library.custom_op("fastjepa::sorted_predictor_tokens_triton", mutates_args=())
def _tokens_triton(
    ctx: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    positions: torch.Tensor,
    pos: torch.Tensor | None,
    mask_token: torch.Tensor,
    has_cls: bool,
    chop: int,
) -> torch.Tensor:
    """(R, has_cls + Kc, P), (R, L) x 3, (1, N, P) or None, (1, 1, P) -> (R, has_cls + L - chop, P).

    ``inverse`` is not read here; the backward takes it."""
    return kernels().sorted_predictor_tokens_fwd(ctx, order, positions, pos, mask_token, has_cls, chop)


@_tokens_triton.register_fake
def _(ctx, order, inverse, positions, pos, mask_token, has_cls, chop):
    R, L = order.shape
    return ctx.new_empty((R, int(has_cls) + L - chop, ctx.size(-1)), dtype=_out_dtype(ctx, mask_token, pos))


@torch.library.custom_op("fastjepa::sorted_predictor_tokens_triton_backward", mutates_args=())
def _tokens_triton_backward(
    grad: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    positions: torch.Tensor,
    n_ctxt: int,
    has_cls: bool,
    npos: int,
    ctx_dtype: torch.dtype,
    mt_dtype: torch.dtype,
    pos_dtype: torch.dtype,
    pos_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad_ctx (R, has_cls + Kc, P), grad_mask_token (P,), grad_pos (1, npos, P), or (0,) unless ``pos_grad``."""
    gctx, gmt, gpos = _tokens_backward_impl(
        grad, order, inverse, positions, n_ctxt, has_cls, npos, ctx_dtype, mt_dtype, pos_dtype, pos_grad
    )
    return gctx, gmt, (gpos if pos_grad else grad.new_empty((0,), dtype=pos_dtype))


def _tokens_backward_impl(grad, order, inverse, positions, n_ctxt, has_cls, npos, ctx_dtype, mt_dtype, pos_dtype, pos_grad):
    """The backward's launches: (grad_ctx, grad_mask_token (P,), grad_pos (1, npos, P) or None)."""
    gctx, gmt, gpos = kernels().sorted_predictor_tokens_bwd(grad, order, inverse, positions, n_ctxt, has_cls, npos, ctx_dtype, pos_grad)
    return gctx, gmt.to(mt_dtype), (gpos.unsqueeze(0).to(pos_dtype) if pos_grad else None)


@_tokens_triton_backward.register_fake
def _(grad, order, inverse, positions, n_ctxt, has_cls, npos, ctx_dtype, mt_dtype, pos_dtype, pos_grad):
    R, P = order.size(0), grad.size(-1)
    gpos = grad.new_empty((1, npos, P), dtype=pos_dtype) if pos_grad else grad.new_empty((0,), dtype=pos_dtype)
    gctx = grad.new_empty((R, int(has_cls) + n_ctxt, P), dtype=ctx_dtype)
    return gctx, grad.new_empty((P,), dtype=mt_dtype), gpos


def _tokens_setup(ctx, inputs, output):
    c, order, inverse, positions, pos, mask_token, has_cls, chop = inputs
    ctx.save_for_backward(order, inverse, positions)
    ctx.n_ctxt, ctx.has_cls, ctx.ctx_dtype = c.size(1) - int(has_cls), has_cls, c.dtype
    ctx.npos = 0 if pos is None else pos.size(1)
    ctx.pos_dtype = c.dtype if pos is None else pos.dtype
    ctx.mt_dtype, ctx.mt_shape = mask_token.dtype, mask_token.shape


def _tokens_backward(ctx, grad):
    order, inverse, positions = ctx.saved_tensors
    pos_grad = ctx.npos > 0 and bool(ctx.needs_input_grad[4])
    gctx, gmt, gpos = _tokens_triton_backward(
        grad, order, inverse, positions, ctx.n_ctxt, ctx.has_cls, ctx.npos, ctx.ctx_dtype, ctx.mt_dtype, ctx.pos_dtype, pos_grad
    )
    return gctx, None, None, None, (gpos if pos_grad else None), gmt.reshape(ctx.mt_shape), None, None


_tokens_triton.register_autograd(_tokens_backward, setup_context=_tokens_setup)


@torch.library.custom_op("fastjepa::sorted_predictor_take_triton", mutates_args=())
def _take_triton(y: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, n_ctxt: int, has_cls: bool) -> torch.Tensor:
    """(R, has_cls + L, D), (R, L) x 2 -> (R, L - n_ctxt, D): ``y[r, has_cls + inverse[r, n_ctxt + t]]``.

    ``order`` is not read here; the backward takes it."""
    return kernels().sorted_predictor_take_fwd(y, inverse, n_ctxt, has_cls)


@_take_triton.register_fake
def _(y, order, inverse, n_ctxt, has_cls):
    return y.new_empty((y.size(0), inverse.size(1) - n_ctxt, y.size(-1)))


@torch.library.custom_op("fastjepa::sorted_predictor_take_triton_backward", mutates_args=())
def _take_triton_backward(grad: torch.Tensor, order: torch.Tensor, n_ctxt: int, has_cls: bool, y_dtype: torch.dtype) -> torch.Tensor:
    """(R, Kt, D) grad -> (R, has_cls + L, D): grad at target slots, zeros elsewhere."""
    return kernels().sorted_predictor_take_bwd(grad, order, n_ctxt, has_cls, y_dtype)


@_take_triton_backward.register_fake
def _(grad, order, n_ctxt, has_cls, y_dtype):
    return grad.new_empty((grad.size(0), int(has_cls) + order.size(1), grad.size(-1)), dtype=y_dtype)


def _take_setup(ctx, inputs, output):
    y, order, inverse, n_ctxt, has_cls = inputs
    ctx.save_for_backward(order)
    ctx.n_ctxt, ctx.has_cls, ctx.y_dtype = n_ctxt, has_cls, y.dtype


def _take_backward(ctx, grad):
    (order,) = ctx.saved_tensors
    return _take_triton_backward(grad, order, ctx.n_ctxt, ctx.has_cls, ctx.y_dtype), None, None, None, None


_take_triton.register_autograd(_take_backward, setup_context=_take_setup)


class _TokensDirect(torch.autograd.Function):
    """``_tokens_triton`` without its dispatch layers (eager calls, see
    :func:`fastjepa.ops._dispatch.direct`)."""

    @staticmethod
    def forward(ctx, c, order, inverse, positions, pos, mask_token, has_cls, chop):
        out = kernels().sorted_predictor_tokens_fwd(c, order, positions, pos, mask_token, has_cls, chop)
        _tokens_setup(ctx, (c, order, inverse, positions, pos, mask_token, has_cls, chop), out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        order, inverse, positions = ctx.saved_tensors
        pos_grad = ctx.npos > 0 and ctx.needs_input_grad[4]
        gctx, gmt, gpos = _tokens_backward_impl(
            grad, order, inverse, positions, ctx.n_ctxt, ctx.has_cls, ctx.npos, ctx.ctx_dtype, ctx.mt_dtype, ctx.pos_dtype,
            pos_grad,
        )  # fmt: skip
        return gctx, None, None, None, gpos, gmt.reshape(ctx.mt_shape), None, None


class _TakeDirect(torch.autograd.Function):
    """``_take_triton`` without its dispatch layers (eager calls)."""

    @staticmethod
    def forward(ctx, y, order, inverse, n_ctxt, has_cls):
        out = kernels().sorted_predictor_take_fwd(y, inverse, n_ctxt, has_cls)
        _take_setup(ctx, (y, order, inverse, n_ctxt, has_cls), out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        gy = kernels().sorted_predictor_take_bwd(grad, order, ctx.n_ctxt, ctx.has_cls, ctx.y_dtype)
        return gy, None, None, None, None


# -- public ops --------------------------------------------------------------------------


@functools.cache
def _cpp_has_op_cached() -> bool:
    if not available()["cpp"]:
        return True  # select() reports the extension itself as missing
    importlib.import_module("fastjepa._C")
    return hasattr(torch.ops.fastjepa, "sorted_predictor_tokens_fwd")


@assume_constant_result  # a plain function: Dynamo traces through functools.cache wrappers
def _cpp_has_op() -> bool:
    """Whether the loaded extension has these kernels (a library compiled without
    ``csrc/sorted_predictor_cpu.cpp`` has not: then ``auto`` takes the reference on the CPU
    and a forced ``cpp`` says so)."""
    return _cpp_has_op_cached()



def _check(ctx, masks_x, masks_y, mask_token, pos_embed, has_cls, chop_last_n, num_patches, validate):
    checks.check_tokens(ctx, "ctx")
    masks_x = checks.mask_list(masks_x, "masks_x")
    masks_y = checks.mask_list(masks_y, "masks_y")
    M = len(masks_x)
    if len(masks_y) != M:
        raise ValueError(
            f"masks_y: {len(masks_y)} masks, expected one per context mask (len(masks_x)={M}): "
            "context mask i goes with target mask i"
        )
    if not isinstance(has_cls, bool):
        raise ValueError(f"has_cls: expected a bool, got {has_cls!r}")
    if ctx.size(0) % M != 0:
        raise ValueError(f"ctx: batch {ctx.size(0)} is not a multiple of len(masks_x)={M}")
    B = ctx.size(0) // M
    checks.check_batch(masks_x, "masks_x", B)
    checks.check_batch(masks_y, "masks_y", B)
    Kc = ctx.size(1) - int(has_cls)
    if masks_x[0].size(1) != Kc:
        what = f"ctx.size(1) - 1 = {Kc} (has_cls: its first token is the class token)" if has_cls else f"ctx.size(1)={Kc}"
        raise ValueError(f"masks_x: {masks_x[0].size(1)} indices per mask, expected {what}")
    L = Kc + masks_y[0].size(1)
    if isinstance(chop_last_n, bool) or not isinstance(chop_last_n, int) or not 0 <= chop_last_n <= L:
        raise ValueError(f"chop_last_n: expected an int in [0, {L}] (the sequence has Kc+Kt={L} tokens), got {chop_last_n!r}")
    P = ctx.size(2)
    if not isinstance(mask_token, torch.Tensor) or tuple(mask_token.shape) != (1, 1, P):
        shape = tuple(mask_token.shape) if isinstance(mask_token, torch.Tensor) else type(mask_token).__name__
        raise ValueError(f"mask_token: expected shape (1, 1, {P}), got {shape}")
    if not mask_token.is_floating_point():
        raise ValueError(f"mask_token: expected a floating-point tensor, got {mask_token.dtype}")
    if mask_token.device != ctx.device:
        raise ValueError(f"mask_token: on {mask_token.device}, expected the device of ctx ({ctx.device})")
    if pos_embed is not None:
        if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 3 or pos_embed.size(0) != 1 or pos_embed.size(2) != P:
            shape = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
            raise ValueError(f"pos_embed: expected shape (1, N, {P}) or None, got {shape}")
        if not pos_embed.is_floating_point():
            raise ValueError(f"pos_embed: expected a floating-point tensor, got {pos_embed.dtype}")
        if pos_embed.device != ctx.device:
            raise ValueError(f"pos_embed: on {pos_embed.device}, expected the device of ctx ({ctx.device})")
        if num_patches is not None and num_patches != pos_embed.size(1):
            raise ValueError(f"num_patches={num_patches} differs from pos_embed's {pos_embed.size(1)} tokens")
        num_patches = pos_embed.size(1)
    checks.check_same_device(masks_x, "masks_x", ctx.device)
    checks.check_same_device(masks_y, "masks_y", ctx.device)
    if num_patches is not None and (validate or ctx.device.type == "cpu"):
        checks.check_range(masks_x, "masks_x", num_patches)
        checks.check_range(masks_y, "masks_y", num_patches)
    return masks_x, masks_y


def sorted_predictor_tokens(
    ctx: torch.Tensor,
    masks_x: torch.Tensor | Sequence[torch.Tensor],
    masks_y: torch.Tensor | Sequence[torch.Tensor],
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    *,
    has_cls: bool = False,
    chop_last_n: int = 0,
    num_patches: int | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, SortedOrder]:
    """The position-sorted predictor input of V-JEPA 2 (see the module docstring).

    ctx (M·B, has_cls + Kc, P) embedded context tokens; masks_x, masks_y: M (B, Kc) and M
    (B, Kt) int32/int64 index tensors (pair m is row block m); mask_token (1, 1, P);
    pos_embed (1, N, P) or None (RoPE). ``num_patches``: N, for the index range check when
    there is no pos table (the positions are then only sorted and passed through).

    Returns ``(x, positions, order)``: x (M·B, has_cls + Kc + Kt - chop_last_n, P), the sorted
    positions (M·B, Kc + Kt - chop_last_n) in the masks' (promoted) dtype — what RoPE blocks
    take as their mask — and the :class:`SortedOrder` for :func:`sorted_predictor_take_targets`.

    :Equivalent pytorch code: :func:`sorted_predictor_tokens_reference`.
    """
    masks_x, masks_y = _check(ctx, masks_x, masks_y, mask_token, pos_embed, has_cls, chop_last_n, num_patches, validate)
    backend = select("sorted_predictor_tokens", ctx.device, _out_dtype(ctx, mask_token, pos_embed), cpp_op=_cpp_has_op())
    if backend == "reference":
        return sorted_predictor_tokens_reference(
            ctx, masks_x, masks_y, mask_token, pos_embed, has_cls=has_cls, chop_last_n=chop_last_n
        )
    idx_x = torch.cat([m.to(ctx.device) for m in masks_x], dim=0)  # (M·B, Kc)
    idx_y = torch.cat([m.to(ctx.device) for m in masks_y], dim=0)  # (M·B, Kt)
    positions, order, inverse = _sort(idx_x, idx_y)  # (M·B, L) each
    if backend == "triton":
        fn = _TokensDirect.apply if direct(ctx, pos_embed, mask_token) else _tokens_triton
        x = fn(ctx, order, inverse, positions, pos_embed, mask_token, has_cls, chop_last_n)
    else:
        from . import cpp

        x = cpp.sorted_predictor_tokens(ctx, order, inverse, positions, pos_embed, mask_token, has_cls, chop_last_n)
    L = order.size(1)
    return x, positions[:, : L - chop_last_n], SortedOrder(order, inverse, idx_x.size(1), has_cls, chop_last_n)


def sorted_predictor_take_targets(y: torch.Tensor, order: SortedOrder) -> torch.Tensor:
    """Un-sort the predictor's output and keep the targets: (M·B, has_cls + Kc + Kt, D) -> (M·B, Kt, D).

    Target t of row r is ``y[r, has_cls + order.inverse[r, Kc + t]]`` — one gather. Its
    backward writes the gradient at the target slots and zeros at the class and context
    slots. The sequence must be whole: tokens chopped before the blocks cannot be taken.

    :Equivalent pytorch code: :func:`sorted_predictor_take_targets_reference`.
    """
    checks.check_tokens(y, "y")
    if not isinstance(order, SortedOrder):
        raise ValueError(f"order: expected the SortedOrder returned by sorted_predictor_tokens, got {type(order).__name__}")
    R, L = order.order.shape
    off = int(order.has_cls)
    if order.chop:
        raise ValueError(
            f"sorted_predictor_take_targets: the sequence was built with chop_last_n={order.chop}; "
            "chopped tokens cannot be un-sorted (expected chop_last_n=0)"
        )
    if y.size(0) != R or y.size(1) != off + L:
        cls = "1 + " if off else ""
        raise ValueError(f"y: expected shape ({R}, {cls}{L}, D) (the sorted sequence), got {tuple(y.shape)}")
    if y.device != order.order.device:
        raise ValueError(f"y: on {y.device}, expected the device of the order ({order.order.device})")
    backend = select("sorted_predictor_tokens", y.device, y.dtype, cpp_op=_cpp_has_op())
    if backend == "reference":
        return sorted_predictor_take_targets_reference(y, order)
    if backend == "triton":
        fn = _TakeDirect.apply if direct(y) else _take_triton
        return fn(y, order.order, order.inverse, order.n_ctxt, order.has_cls)
    from . import cpp

    return cpp.sorted_predictor_take(y, order.order, order.inverse, order.n_ctxt, order.has_cls)

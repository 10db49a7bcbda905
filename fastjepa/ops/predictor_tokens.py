"""Batched predictor input (docs/design.md §2 step 2, §7).

From the embedded context ``ctx`` (nenc·B, Kc, P), the context and target masks, the
predictor pos table (1, N, P) and ``mask_token`` (1, 1, P), build the
(npred·nenc·B, Kc+Kt, P) predictor input in one pass: row ``(j·nenc + i)·B + b`` is
``[ctx[i·B+b] + pos[masks_x[i][b]] ; mask_token + pos[masks[j][b]]]``.

Triton path: the custom ops ``fastjepa::predictor_tokens_triton`` (one kernel writes the
whole output) and ``fastjepa::predictor_tokens_triton_backward`` (one kernel sums the
npred copies into the ctx gradient, one reduces every mask position into the
mask-token gradient in fp32; the pos table gets a gradient only if it requires one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _validate as checks
from ._dispatch import direct, kernels, select
from .masks_reference import apply_masks, repeat_interleave_batch


def predictor_tokens_reference(
    ctx: torch.Tensor,
    masks_x: torch.Tensor | Sequence[torch.Tensor],
    masks: torch.Tensor | Sequence[torch.Tensor],
    pos_embed: torch.Tensor,
    mask_token: torch.Tensor,
) -> torch.Tensor:
    """Reference, written as the public reference predictor computes it."""
    masks_x = [masks_x] if isinstance(masks_x, torch.Tensor) else list(masks_x)
    masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
    B = ctx.size(0) // len(masks_x)
    pos = pos_embed.repeat(B, 1, 1)  # (B, N, P)
    ctx = ctx + apply_masks(pos, masks_x)  # (nenc·B, Kc, P)
    pos_t = apply_masks(pos, masks)  # (npred·B, Kt, P)
    pos_t = repeat_interleave_batch(pos_t, B, repeat=len(masks_x))  # (npred·nenc·B, Kt, P)
    pred_tokens = mask_token.repeat(pos_t.size(0), pos_t.size(1), 1) + pos_t  # (npred·nenc·B, Kt, P)
    ctx = ctx.repeat(len(masks), 1, 1)  # (npred·nenc·B, Kc, P)
    return torch.cat([ctx, pred_tokens], dim=1)  # (npred·nenc·B, Kc+Kt, P)



# -- Triton custom ops -------------------------------------------------------------------


@torch.library.custom_op("fastjepa::predictor_tokens_triton", mutates_args=())
def _predictor_tokens_triton(
    ctx: torch.Tensor, idx_x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """(nenc·B, Kc, P), (nenc, B, Kc), (npred, B, Kt), (1, Npos, P), (1, 1, P) -> (npred·nenc·B, Kc+Kt, P)."""
    return kernels().predictor_tokens_fwd(ctx, idx_x, idx, pos, mask_token)


@_predictor_tokens_triton.register_fake
def _(ctx, idx_x, idx, pos, mask_token):
    nenc, B, Kc = idx_x.shape
    npred, _, Kt = idx.shape
    dtype = torch.promote_types(torch.promote_types(ctx.dtype, pos.dtype), mask_token.dtype)
    return ctx.new_empty((npred * nenc * B, Kc + Kt, ctx.size(-1)), dtype=dtype)


@torch.library.custom_op("fastjepa::predictor_tokens_triton_backward", mutates_args=())
def _predictor_tokens_triton_backward(
    grad: torch.Tensor,
    idx_x: torch.Tensor,
    idx: torch.Tensor,
    npos: int,
    ctx_dtype: torch.dtype,
    mt_dtype: torch.dtype,
    pos_dtype: torch.dtype,
    pos_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad_ctx (nenc·B, Kc, P), grad_mask_token (P,), grad_pos (1, npos, P), or (0,) unless ``pos_grad``."""
    gctx, gmt, gpos = _backward_impl(grad, idx_x, idx, npos, ctx_dtype, mt_dtype, pos_dtype, pos_grad)
    return gctx, gmt, (gpos if pos_grad else grad.new_empty((0,), dtype=pos_dtype))


def _backward_impl(grad, idx_x, idx, npos, ctx_dtype, mt_dtype, pos_dtype, pos_grad):
    """The backward's launches: (grad_ctx, grad_mask_token (P,), grad_pos (1, npos, P) or None)."""
    gctx, gmt, gpos = kernels().predictor_tokens_bwd(grad, idx_x, idx, ctx_dtype, npos, pos_grad)
    return gctx, gmt.to(mt_dtype), (gpos.unsqueeze(0).to(pos_dtype) if pos_grad else None)


@_predictor_tokens_triton_backward.register_fake
def _(grad, idx_x, idx, npos, ctx_dtype, mt_dtype, pos_dtype, pos_grad):
    nenc, B, Kc = idx_x.shape
    P = grad.size(-1)
    gpos = grad.new_empty((1, npos, P), dtype=pos_dtype) if pos_grad else grad.new_empty((0,), dtype=pos_dtype)
    return grad.new_empty((nenc * B, Kc, P), dtype=ctx_dtype), grad.new_empty((P,), dtype=mt_dtype), gpos


def _setup_context(ctx, inputs, output):
    c, idx_x, idx, pos, mask_token = inputs
    ctx.save_for_backward(idx_x, idx)
    ctx.npos, ctx.ctx_dtype, ctx.pos_dtype = pos.size(1), c.dtype, pos.dtype
    ctx.mt_dtype, ctx.mt_shape = mask_token.dtype, mask_token.shape


def _backward(ctx, grad):
    idx_x, idx = ctx.saved_tensors
    pos_grad = bool(ctx.needs_input_grad[3])
    gctx, gmt, gpos = _predictor_tokens_triton_backward(
        grad, idx_x, idx, ctx.npos, ctx.ctx_dtype, ctx.mt_dtype, ctx.pos_dtype, pos_grad
    )
    return gctx, None, None, (gpos if pos_grad else None), gmt.reshape(ctx.mt_shape)


_predictor_tokens_triton.register_autograd(_backward, setup_context=_setup_context)


class _PredictorTokensDirect(torch.autograd.Function):
    """The custom op's forward and backward without its dispatch layers (eager calls,
    see :func:`fastjepa.ops._dispatch.direct`)."""

    @staticmethod
    def forward(ctx, c, idx_x, idx, pos, mask_token):
        out = kernels().predictor_tokens_fwd(c, idx_x, idx, pos, mask_token)
        _setup_context(ctx, (c, idx_x, idx, pos, mask_token), out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        idx_x, idx = ctx.saved_tensors
        pos_grad = ctx.needs_input_grad[3]
        gctx, gmt, gpos = _backward_impl(grad, idx_x, idx, ctx.npos, ctx.ctx_dtype, ctx.mt_dtype, ctx.pos_dtype, pos_grad)
        return gctx, None, None, gpos, gmt.reshape(ctx.mt_shape)


# -- public op ---------------------------------------------------------------------------


def _check(ctx, masks_x, masks, pos_embed, mask_token, validate):
    checks.check_tokens(ctx, "ctx")
    masks_x = checks.mask_list(masks_x, "masks_x")
    masks = checks.mask_list(masks, "masks")
    nenc = len(masks_x)
    if ctx.size(0) % nenc != 0:
        raise ValueError(f"ctx: batch {ctx.size(0)} is not a multiple of len(masks_x)={nenc}")
    B = ctx.size(0) // nenc
    checks.check_batch(masks_x, "masks_x", B)
    checks.check_batch(masks, "masks", B)
    if masks_x[0].size(1) != ctx.size(1):
        raise ValueError(f"masks_x: {masks_x[0].size(1)} indices per mask, expected ctx.size(1)={ctx.size(1)}")
    P = ctx.size(2)
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 3 or pos_embed.size(0) != 1 or pos_embed.size(2) != P:
        shape = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
        raise ValueError(f"pos_embed: expected shape (1, N, {P}), got {shape}")
    if pos_embed.device != ctx.device:
        raise ValueError(f"pos_embed: on {pos_embed.device}, expected the device of ctx ({ctx.device})")
    if not isinstance(mask_token, torch.Tensor) or tuple(mask_token.shape) != (1, 1, P):
        shape = tuple(mask_token.shape) if isinstance(mask_token, torch.Tensor) else type(mask_token).__name__
        raise ValueError(f"mask_token: expected shape (1, 1, {P}), got {shape}")
    if mask_token.device != ctx.device:
        raise ValueError(f"mask_token: on {mask_token.device}, expected the device of ctx ({ctx.device})")
    checks.check_same_device(masks_x, "masks_x", ctx.device)
    checks.check_same_device(masks, "masks", ctx.device)
    if validate or ctx.device.type == "cpu":
        checks.check_range(masks_x, "masks_x", pos_embed.size(1))
        checks.check_range(masks, "masks", pos_embed.size(1))
    return masks_x, masks


def predictor_tokens(
    ctx: torch.Tensor,
    masks_x: torch.Tensor | Sequence[torch.Tensor],
    masks: torch.Tensor | Sequence[torch.Tensor],
    pos_embed: torch.Tensor,
    mask_token: torch.Tensor,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """The (npred·nenc·B, Kc+Kt, P) predictor input. See the module docstring.

    Backward: ``ctx`` grad is the sum over its npred copies, ``mask_token`` grad the sum
    over every mask position.
    """
    masks_x, masks = _check(ctx, masks_x, masks, pos_embed, mask_token, validate)
    dtype = torch.promote_types(torch.promote_types(ctx.dtype, pos_embed.dtype), mask_token.dtype)
    backend = select("predictor_tokens", ctx.device, dtype)
    if backend == "reference":
        return predictor_tokens_reference(ctx, masks_x, masks, pos_embed, mask_token)
    idx_x = checks.stack_masks(masks_x, ctx.device)  # (nenc, B, Kc)
    idx = checks.stack_masks(masks, ctx.device)  # (npred, B, Kt)
    if backend == "triton":
        if direct(ctx, pos_embed, mask_token):
            return _PredictorTokensDirect.apply(ctx, idx_x, idx, pos_embed, mask_token)
        return _predictor_tokens_triton(ctx, idx_x, idx, pos_embed, mask_token)
    from . import cpp

    return cpp.predictor_tokens(ctx, idx_x, idx, pos_embed, mask_token)

"""Context gather with the positional-embedding add (docs/design.md §7).

``gather_tokens(x, masks, pos_embed)`` ≡ ``apply_masks(x + pos_embed, masks)``, but the
fused paths add the pos-embed only at the kept indices and never build an expanded
(B, K, D) index tensor: the masks are stacked into one (M, B, K) index tensor.
Backward accumulates into ``x.grad`` for repeated indices (a deterministic segmented
sum in fp32, each gradient row written once in x's dtype);
``pos_embed`` gets a gradient only if it requires one.

Triton path: the custom ops ``fastjepa::gather_tokens_triton`` (forward) and
``fastjepa::gather_tokens_triton_backward``, with fake implementations, so
``torch.compile`` traces them without running a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _validate as checks
from ._dispatch import direct, kernels, select
from .masks_reference import apply_masks as _apply_masks_reference


def gather_tokens_reference(
    x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor], pos_embed: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: (B, N, D), M × (B, K), (1, N, D) -> (M·B, K, D)."""
    if pos_embed is not None:
        x = x + pos_embed[:, : x.size(1)]  # (B, N, D)
    return _apply_masks_reference(x, masks)  # (M·B, K, D)


# -- Triton custom ops -------------------------------------------------------------------


@torch.library.custom_op("fastjepa::gather_tokens_triton", mutates_args=())
def _gather_tokens_triton(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D), (M, B, K), (1, Npos, D) or None -> (M·B, K, D)."""
    return kernels().gather_tokens_fwd(x, idx, pos)


@_gather_tokens_triton.register_fake
def _(x, idx, pos):
    M, B, K = idx.shape
    dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    return x.new_empty((M * B, K, x.size(-1)), dtype=dtype)


@torch.library.custom_op("fastjepa::gather_tokens_triton_backward", mutates_args=())
def _gather_tokens_triton_backward(
    grad: torch.Tensor, idx: torch.Tensor, n: int, npos: int, x_dtype: torch.dtype, pos_dtype: torch.dtype, pos_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M·B, K, D) grad -> (grad_x (B, n, D), grad_pos (1, npos, D), or (0,) unless ``pos_grad``)."""
    gx, gpos = _backward_impl(grad, idx, n, npos, x_dtype, pos_dtype, pos_grad)
    return gx, (gpos if pos_grad else grad.new_empty((0,), dtype=pos_dtype))


def _backward_impl(grad, idx, n, npos, x_dtype, pos_dtype, pos_grad):
    """The backward's launches: (grad_x, grad_pos (1, npos, D) or None)."""
    gx, gpos = kernels().gather_tokens_bwd(grad, idx, n, x_dtype, pos_grad)  # (B, n, D), fp32 (n, D)
    if pos_grad:
        if npos != n:
            gpos = F.pad(gpos, (0, 0, 0, npos - n))
        gpos = gpos.unsqueeze(0).to(pos_dtype)  # (1, npos, D)
    return gx, gpos


@_gather_tokens_triton_backward.register_fake
def _(grad, idx, n, npos, x_dtype, pos_dtype, pos_grad):
    B, D = idx.size(1), grad.size(-1)
    gpos = grad.new_empty((1, npos, D), dtype=pos_dtype) if pos_grad else grad.new_empty((0,), dtype=pos_dtype)
    return grad.new_empty((B, n, D), dtype=x_dtype), gpos


def _setup_context(ctx, inputs, output):
    x, idx, pos = inputs
    ctx.save_for_backward(idx)
    ctx.n, ctx.x_dtype = x.size(1), x.dtype
    ctx.npos = 0 if pos is None else pos.size(1)
    ctx.pos_dtype = x.dtype if pos is None else pos.dtype


def _backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    pos_grad = bool(ctx.needs_input_grad[2])
    gx, gpos = _gather_tokens_triton_backward(grad, idx, ctx.n, ctx.npos, ctx.x_dtype, ctx.pos_dtype, pos_grad)
    return gx, None, (gpos if pos_grad else None)


_gather_tokens_triton.register_autograd(_backward, setup_context=_setup_context)


class _GatherTokensDirect(torch.autograd.Function):
    """The custom op's forward and backward without its dispatch layers (eager calls,
    see :func:`fastjepa.ops._dispatch.direct`)."""

    @staticmethod
    def forward(ctx, x, idx, pos):
        out = kernels().gather_tokens_fwd(x, idx, pos)
        _setup_context(ctx, (x, idx, pos), out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        pos_grad = ctx.needs_input_grad[2]
        gx, gpos = _backward_impl(grad, idx, ctx.n, ctx.npos, ctx.x_dtype, ctx.pos_dtype, pos_grad)
        return gx, None, gpos


# -- public op ---------------------------------------------------------------------------


def _check(x, masks, pos_embed, validate):
    checks.check_tokens(x, "x")
    masks = checks.mask_list(masks, "masks")
    checks.check_batch(masks, "masks", x.size(0))
    checks.check_same_device(masks, "masks", x.device)
    if pos_embed is not None:
        checks.check_pos(pos_embed, "pos_embed", x.size(1), x.size(2), x)
    if validate or x.device.type == "cpu":
        checks.check_range(masks, "masks", x.size(1))
    return masks


def gather_tokens(
    x: torch.Tensor,
    masks: torch.Tensor | Sequence[torch.Tensor],
    pos_embed: torch.Tensor | None = None,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """Gather the tokens of ``x`` (B, N, D) at ``masks`` (M × (B, K)), adding ``pos_embed``.

    :returns: (M·B, K, D), mask-major as :func:`fastjepa.masks.apply_masks`, in the dtype
        of ``x + pos_embed``.
    :param validate: on CUDA, also check the index range (syncs with the host; without it
        an out-of-range index yields a NaN row, never a bad memory access).

    :Equivalent pytorch code:
        ``apply_masks(x + pos_embed, masks)``
    """
    masks = _check(x, masks, pos_embed, validate)
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    backend = select("gather_tokens", x.device, dtype)
    if backend == "reference":
        return gather_tokens_reference(x, masks, pos_embed)
    idx = checks.stack_masks(masks, x.device)  # (M, B, K)
    if backend == "triton":
        if direct(x, pos_embed):
            return _GatherTokensDirect.apply(x, idx, pos_embed)
        return _gather_tokens_triton(x, idx, pos_embed)
    from . import cpp

    return cpp.gather_tokens(x, idx, pos_embed)


def apply_masks(
    x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor], concat: bool = True
) -> torch.Tensor | list[torch.Tensor]:
    """Drop-in for the reference ``apply_masks`` (I-JEPA's and V-JEPA's signature), fused.

    :param x: (B, N, D) tokens.
    :param masks: M (B, K_m) index tensors (a single tensor is a list of one).
    :param concat: True: one (M·B, K, D) tensor, mask-major (every K_m equal). False: the
        list of the M per-mask (B, K_m, D) gathers, as V-JEPA's ``concat=False``; here the
        masks may differ in length.

    Also MAE's ``torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))`` with
    ``ids_keep`` of shape (B, K) is ``apply_masks(x, ids_keep)``.

    :Equivalent pytorch code:
        ``out = [torch.gather(x, 1, m[..., None].expand(-1, -1, D)) for m in masks]``;
        ``torch.cat(out) if concat else out``
    """
    if concat:
        return gather_tokens(x, masks)
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    if not isinstance(masks, (list, tuple)) or len(masks) == 0:
        raise ValueError(f"masks: expected a non-empty list of (B, K) index tensors, got {type(masks).__name__}")
    lengths = {m.shape[-1] if isinstance(m, torch.Tensor) else None for m in masks}
    if len(lengths) == 1:  # one fused call for the whole list, then per-mask views
        return list(gather_tokens(x, masks).split(x.size(0)))  # M × (B, K, D)
    return [gather_tokens(x, [m]) for m in masks]  # ragged K: one call per mask

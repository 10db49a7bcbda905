"""Target path (docs/design.md §5, §7): layer-norm (no affine, eps 1e-5) + gather + repeat.

``target_tokens(h, masks_pred, nenc)`` ≡
``repeat_interleave_batch(apply_masks(F.layer_norm(h, (D,)), masks_pred), B, nenc)``.
No gradient (the target encoder is never trained by gradients).

Triton path: the custom op ``fastjepa::target_tokens_triton`` normalises only the
gathered rows (fp32 statistics), each once, and writes each to its nenc output rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _validate as checks
from ._dispatch import direct, kernels, select
from .masks_reference import apply_masks, repeat_interleave_batch


def target_tokens_reference(h: torch.Tensor, masks_pred: torch.Tensor | Sequence[torch.Tensor], nenc: int) -> torch.Tensor:
    """Reference: (B, N, D), npred × (B, Kt) -> (npred·nenc·B, Kt, D)."""
    B = h.size(0)
    h = F.layer_norm(h, (h.size(-1),))  # (B, N, D), eps 1e-5, no affine
    h = apply_masks(h, masks_pred)  # (npred·B, Kt, D)
    return repeat_interleave_batch(h, B, repeat=nenc)  # (npred·nenc·B, Kt, D)


@torch.library.custom_op("fastjepa::target_tokens_triton", mutates_args=())
def _target_tokens_triton(h: torch.Tensor, idx: torch.Tensor, nenc: int) -> torch.Tensor:
    """(B, N, D), (npred, B, Kt) -> (npred·nenc·B, Kt, D). No autograd (targets carry no grad)."""
    return kernels().target_tokens_fwd(h, idx, nenc)


@_target_tokens_triton.register_fake
def _(h, idx, nenc):
    npred, B, Kt = idx.shape
    return h.new_empty((npred * nenc * B, Kt, h.size(-1)))


def target_tokens(
    h: torch.Tensor, masks_pred: torch.Tensor | Sequence[torch.Tensor], nenc: int, *, validate: bool = False
) -> torch.Tensor:
    """Normalised target tokens in the predictor's (j, i, b) batch order. No grad.

    :param h: (B, N, D) target-encoder output.
    :param masks_pred: npred × (B, Kt) indices.
    :param validate: on CUDA, also check the index range (syncs with the host; without it
        an out-of-range index yields NaN rows, never a bad memory access).
    :returns: (npred·nenc·B, Kt, D) in h's dtype, detached.
    """
    checks.check_tokens(h, "h")
    masks_pred = checks.mask_list(masks_pred, "masks_pred")
    checks.check_batch(masks_pred, "masks_pred", h.size(0))
    checks.check_same_device(masks_pred, "masks_pred", h.device)
    checks.check_count(nenc, "nenc")
    if validate or h.device.type == "cpu":
        checks.check_range(masks_pred, "masks_pred", h.size(1))
    backend = select("target_tokens", h.device, h.dtype)
    h = h.detach()
    with torch.no_grad():
        if backend == "reference":
            return target_tokens_reference(h, masks_pred, nenc)
        idx = checks.stack_masks(masks_pred, h.device)  # (npred, B, Kt)
        if backend == "triton":
            if direct(h):  # no autograd to set up: the launcher itself
                return kernels().target_tokens_fwd(h, idx, nenc)
            return _target_tokens_triton(h, idx, nenc)
        from . import cpp

        return cpp.target_tokens(h, idx, nenc)

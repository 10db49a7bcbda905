"""Target path (SPEC §5, §7): layer-norm (no affine, eps 1e-5) + gather + repeat.

``target_tokens(h, masks_pred, nenc)`` ≡
``repeat_interleave_batch(apply_masks(F.layer_norm(h, (D,)), masks_pred), B, nenc)``.
No gradient (the target encoder is never trained by gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..masks.utils import apply_masks, repeat_interleave_batch
from . import _validate as V
from ._dispatch import select


def target_tokens_reference(h: torch.Tensor, masks_pred: torch.Tensor | Sequence[torch.Tensor], nenc: int) -> torch.Tensor:
    """Reference: (B, N, D), npred × (B, Kt) -> (npred·nenc·B, Kt, D)."""
    B = h.size(0)
    h = F.layer_norm(h, (h.size(-1),))  # (B, N, D), eps 1e-5, no affine
    h = apply_masks(h, masks_pred)  # (npred·B, Kt, D)
    return repeat_interleave_batch(h, B, repeat=nenc)  # (npred·nenc·B, Kt, D)


def target_tokens(
    h: torch.Tensor, masks_pred: torch.Tensor | Sequence[torch.Tensor], nenc: int, *, validate: bool = False
) -> torch.Tensor:
    """Normalised target tokens in the predictor's (j, i, b) batch order. No grad."""
    V.check_tokens(h, "h")
    masks_pred = V.mask_list(masks_pred, "masks_pred")
    V.check_batch(masks_pred, "masks_pred", h.size(0))
    V.check_same_device(masks_pred, "masks_pred", h.device)
    if not isinstance(nenc, int) or nenc < 1:
        raise ValueError(f"nenc: expected a positive int, got {nenc!r}")
    if validate or h.device.type == "cpu":
        V.check_range(masks_pred, "masks_pred", h.size(1))
    select("target_tokens", h.device, h.dtype)
    with torch.no_grad():
        return target_tokens_reference(h, masks_pred, nenc)

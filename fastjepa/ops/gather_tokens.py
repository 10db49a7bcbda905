"""Context gather with the positional-embedding add (SPEC §7).

``gather_tokens(x, masks, pos_embed)`` ≡ ``apply_masks(x + pos_embed, masks)``, but the
fused paths add the pos-embed only at the kept indices and never build an expanded
(B, K, D) index tensor. Backward accumulates into ``x.grad`` for repeated indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..masks.utils import apply_masks as _apply_masks_reference
from . import _validate as V
from ._dispatch import select


def gather_tokens_reference(
    x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor], pos_embed: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: (B, N, D), M × (B, K), (1, N, D) -> (M·B, K, D)."""
    if pos_embed is not None:
        x = x + pos_embed[:, : x.size(1)]  # (B, N, D)
    return _apply_masks_reference(x, masks)  # (M·B, K, D)


def _check(x, masks, pos_embed, validate):
    V.check_tokens(x, "x")
    masks = V.mask_list(masks, "masks")
    V.check_batch(masks, "masks", x.size(0))
    V.check_same_device(masks, "masks", x.device)
    if pos_embed is not None:
        V.check_pos(pos_embed, "pos_embed", x.size(1), x.size(2), x)
    if validate or x.device.type == "cpu":
        V.check_range(masks, "masks", x.size(1))
    return masks


def gather_tokens(
    x: torch.Tensor,
    masks: torch.Tensor | Sequence[torch.Tensor],
    pos_embed: torch.Tensor | None = None,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """Gather the tokens of ``x`` (B, N, D) at ``masks`` (M × (B, K)), adding ``pos_embed``.

    :returns: (M·B, K, D), mask-major as :func:`fastjepa.masks.apply_masks`.
    :param validate: on CUDA, also check the index range (syncs with the host).

    :Equivalent pytorch code:
        ``apply_masks(x + pos_embed, masks)``
    """
    masks = _check(x, masks, pos_embed, validate)
    select("gather_tokens", x.device, x.dtype)
    return gather_tokens_reference(x, masks, pos_embed)


def apply_masks(x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Drop-in for the reference ``apply_masks`` (same signature, same result), fused."""
    return gather_tokens(x, masks)

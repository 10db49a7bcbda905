"""Batched predictor input (SPEC §2 step 2, §7).

From the embedded context ``ctx`` (nenc·B, Kc, P), the context and target masks, the
predictor pos table (1, N, P) and ``mask_token`` (1, 1, P), build the
(npred·nenc·B, Kc+Kt, P) predictor input in one pass: row ``(j·nenc + i)·B + b`` is
``[ctx[i·B+b] + pos[masks_x[i][b]] ; mask_token + pos[masks[j][b]]]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..masks.utils import apply_masks, repeat_interleave_batch
from . import _validate as V
from ._dispatch import select


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


def _check(ctx, masks_x, masks, pos_embed, mask_token, validate):
    V.check_tokens(ctx, "ctx")
    masks_x = V.mask_list(masks_x, "masks_x")
    masks = V.mask_list(masks, "masks")
    nenc = len(masks_x)
    if ctx.size(0) % nenc != 0:
        raise ValueError(f"ctx: batch {ctx.size(0)} is not a multiple of len(masks_x)={nenc}")
    B = ctx.size(0) // nenc
    V.check_batch(masks_x, "masks_x", B)
    V.check_batch(masks, "masks", B)
    if masks_x[0].size(1) != ctx.size(1):
        raise ValueError(f"masks_x: {masks_x[0].size(1)} indices per mask, expected ctx.size(1)={ctx.size(1)}")
    P = ctx.size(2)
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 3 or pos_embed.size(0) != 1 or pos_embed.size(2) != P:
        shape = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
        raise ValueError(f"pos_embed: expected shape (1, N, {P}), got {shape}")
    if pos_embed.device != ctx.device:
        raise ValueError(f"pos_embed: on {pos_embed.device}, expected the device of ctx ({ctx.device})")
    if not isinstance(mask_token, torch.Tensor) or mask_token.numel() != P:
        shape = tuple(mask_token.shape) if isinstance(mask_token, torch.Tensor) else type(mask_token).__name__
        raise ValueError(f"mask_token: expected shape (1, 1, {P}), got {shape}")
    if mask_token.device != ctx.device:
        raise ValueError(f"mask_token: on {mask_token.device}, expected the device of ctx ({ctx.device})")
    V.check_same_device(masks_x, "masks_x", ctx.device)
    V.check_same_device(masks, "masks", ctx.device)
    if validate or ctx.device.type == "cpu":
        V.check_range(masks_x, "masks_x", pos_embed.size(1))
        V.check_range(masks, "masks", pos_embed.size(1))
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
    select("predictor_tokens", ctx.device, ctx.dtype)
    return predictor_tokens_reference(ctx, masks_x, masks, pos_embed, mask_token)

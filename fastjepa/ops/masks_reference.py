"""``apply_masks`` and ``repeat_interleave_batch`` (docs/design.md §3), plain PyTorch.

These are the reference definitions; the fused paths in :mod:`fastjepa.ops` are
tested against them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_masks(
    x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor], concat: bool = True
) -> torch.Tensor | list[torch.Tensor]:
    """Keep the tokens of ``x`` at each mask's indices, mask-major.

    :param x: (B, N, D) tokens.
    :param masks: list of (B, K) integer index tensors (a single tensor is a list of one).
    :param concat: False returns the list of per-mask (B, K_m, D) gathers instead (V-JEPA's
        call form; the masks may then differ in length).
    :returns: (len(masks)·B, K, D): for each mask m in order, ``x[b, m[b, k], :]``.

    :Equivalent pytorch code:
        ``torch.cat([torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, D)) for m in masks])``
    """
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    all_x = []
    for m in masks:
        mask_keep = m.long().unsqueeze(-1).repeat(1, 1, x.size(-1))  # (B, K, D)
        all_x.append(torch.gather(x, dim=1, index=mask_keep))  # (B, K, D)
    if not concat:
        return all_x
    return torch.cat(all_x, dim=0)  # (M·B, K, D)


def repeat_interleave_batch(x: torch.Tensor, B: int, repeat: int) -> torch.Tensor:
    """Split dim 0 into chunks of ``B`` and repeat each chunk ``repeat`` times in place.

    ``[c0, c1]`` -> ``[c0, c0, ..., c1, c1, ...]``; (N·B, ...) -> (N·repeat·B, ...).
    """
    if B <= 0 or x.size(0) % B != 0:
        raise ValueError(f"repeat_interleave_batch: x.size(0)={x.size(0)} is not a multiple of B={B}")
    N = x.size(0) // B
    return torch.cat([torch.cat([x[i * B : (i + 1) * B] for _ in range(repeat)], dim=0) for i in range(N)], dim=0)

"""Stand-in for I-JEPA's src/masks/utils.py."""

import torch


def apply_masks(x, masks):
    """x (B, N, D), masks: list of (B, K) -> (len(masks)·B, K, D), mask-major."""
    out = []
    for m in masks:
        index = m.unsqueeze(-1).repeat(1, 1, x.size(-1))  # a bare (B, K) tensor iterates its rows
        out.append(torch.gather(x, 1, index))
    return torch.cat(out, dim=0)

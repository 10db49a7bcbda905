"""Stand-in for V-JEPA 2's src/masks/utils.py."""

import torch


def apply_masks(x, masks, concat=True):
    """x (B, N, D), masks: list of (B, K_m) -> (M·B, K, D), or the list of (B, K_m, D) gathers."""
    out = [torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in masks]
    return torch.cat(out, dim=0) if concat else out

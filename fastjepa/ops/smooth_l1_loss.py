"""The I-JEPA loss: smooth-L1 (beta 1), mean over all elements."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_l1_loss_reference(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(z, h)


def smooth_l1_loss(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 of predictions ``z`` against targets ``h`` (same shape), mean."""
    if not isinstance(z, torch.Tensor) or not isinstance(h, torch.Tensor):
        raise ValueError("smooth_l1_loss: expected two tensors")
    if z.shape != h.shape:
        raise ValueError(f"smooth_l1_loss: z has shape {tuple(z.shape)}, expected the shape of h {tuple(h.shape)}")
    return smooth_l1_loss_reference(z, h)

"""The optimizer (the reference's parameter groups, AdamW) and the autocast dtype of a run."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..models.ijepa import IJEPA
from ..ops import cpu_has_bf16


def param_groups(model: IJEPA) -> list[dict]:
    """The reference's four groups: encoder / predictor × (decayed, no-decay biases & 1-D)."""

    def split(module: nn.Module):
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim == 1 or name.endswith("bias") else decay).append(p)
        return decay, no_decay

    enc_d, enc_n = split(model.encoder)
    pred_d, pred_n = split(model.predictor)
    return [
        {"params": enc_d},
        {"params": pred_d},
        {"params": enc_n, "WD_exclude": True, "weight_decay": 0.0},
        {"params": pred_n, "WD_exclude": True, "weight_decay": 0.0},
    ]


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # torch >= 2.4 has a fused AdamW kernel for both


def make_optimizer(model: IJEPA, device: torch.device, reference_step: bool) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. fastjepa: the fused kernel (one pass over each
    parameter) on CUDA and on the CPU — on the CPU ``foreach`` is a per-tensor loop, slower
    than fused (docs/performance.md) —, ``foreach`` elsewhere.
    The reference step: the per-parameter loop, as the reference code gets by default."""
    kwargs: dict[str, Any] = {}
    if not reference_step:
        kwargs = {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {"foreach": True}
    return torch.optim.AdamW(param_groups(model), **kwargs)


def autocast_dtype(use_bfloat16: bool, device: torch.device, reference_step: bool) -> torch.dtype | None:
    """bf16 autocast on CUDA (docs/design.md §5), and on CPUs with bf16 matrix units — where it pays
    (docs/performance.md) — except for the reference step, which runs fp32 off
    CUDA as the reference code does. None: fp32."""
    if not use_bfloat16:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and not reference_step and cpu_has_bf16():
        return torch.bfloat16
    return None

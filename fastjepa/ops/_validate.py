"""Argument checks shared by the fused ops: clear errors naming the bad value."""

from __future__ import annotations

from collections.abc import Sequence

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


def mask_list(masks: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Normalise ``masks`` to a non-empty list of same-shape (B, K) index tensors."""
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    if not isinstance(masks, (list, tuple)) or len(masks) == 0:
        raise ValueError(f"{name}: expected a non-empty list of (B, K) index tensors, got {type(masks).__name__}")
    out = []
    for i, m in enumerate(masks):
        if not isinstance(m, torch.Tensor):
            raise ValueError(f"{name}[{i}]: expected a tensor, got {type(m).__name__}")
        if m.dim() != 2:
            raise ValueError(f"{name}[{i}]: expected shape (B, K), got {tuple(m.shape)}")
        if m.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name}[{i}]: expected int32 or int64 indices, got {m.dtype}")
        if m.shape != masks[0].shape:
            raise ValueError(f"{name}[{i}]: shape {tuple(m.shape)} differs from {name}[0] {tuple(masks[0].shape)}")
        out.append(m)
    return out


def stack_masks(masks: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(M, B, K) contiguous index tensor on ``device`` (int32/int64 kept)."""
    dtype = torch.int64 if any(m.dtype == torch.int64 for m in masks) else torch.int32
    if len(masks) == 1:  # a view when the mask already is what the kernels take (no copy)
        return masks[0].to(device=device, dtype=dtype).unsqueeze(0).contiguous()
    return torch.stack([m.to(device=device, dtype=dtype) for m in masks]).contiguous()


def check_tokens(x: torch.Tensor, name: str, *, dim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name}: expected shape (B, N, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if dim is not None and x.size(-1) != dim:
        raise ValueError(f"{name}: expected last dim {dim}, got {x.size(-1)}")


def check_pos(pos: torch.Tensor, name: str, N: int, D: int, x: torch.Tensor) -> None:
    if not isinstance(pos, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(pos).__name__}")
    if pos.dim() != 3 or pos.size(0) != 1 or pos.size(-1) != D or pos.size(1) < N:
        raise ValueError(f"{name}: expected shape (1, {N}, {D}), got {tuple(pos.shape)}")
    if pos.device != x.device:
        raise ValueError(f"{name}: on {pos.device}, expected the device of the tokens ({x.device})")


def check_same_device(masks: list[torch.Tensor], name: str, device: torch.device) -> None:
    for i, m in enumerate(masks):
        if m.device != device and m.device.type != "cpu":
            raise ValueError(f"{name}[{i}]: on {m.device}, expected {device} (or the CPU)")


def check_batch(masks: list[torch.Tensor], name: str, B: int) -> None:
    if masks[0].size(0) != B:
        raise ValueError(f"{name}: masks have batch size {masks[0].size(0)}, expected {B}")


def check_range(masks: list[torch.Tensor], name: str, N: int) -> None:
    """Every index in [0, N). Syncs with the device, so on CUDA it runs only when asked
    (``validate=True``) — the kernels themselves mask out-of-range loads. Skipped while
    ``torch.compile`` traces (a data-dependent check would break the graph); eager calls
    check."""
    if torch.compiler.is_compiling():
        return
    for i, m in enumerate(masks):
        if m.numel() == 0:
            continue
        lo, hi = (int(v) for v in torch.aminmax(m))
        if lo < 0 or hi >= N:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name}[{i}]: index {bad} is out of range for {N} tokens (expected 0 <= index < {N})")


def check_count(value: int, name: str) -> None:
    """A positive Python int (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_same_shape(z: torch.Tensor, h: torch.Tensor, op: str) -> None:
    for name, t in (("z", z), ("h", h)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name}: expected a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name}: expected a floating-point tensor, got {t.dtype}")
    if z.shape != h.shape:
        raise ValueError(f"{op}: z has shape {tuple(z.shape)}, expected the shape of h {tuple(h.shape)}")
    if z.device != h.device:
        raise ValueError(f"{op}: h is on {h.device}, expected the device of z ({z.device})")

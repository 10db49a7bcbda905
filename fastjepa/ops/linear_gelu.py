"""The MLP's first layer and its GELU, ``gelu(x @ W.T + b)``, fused on the CPU when no
gradient is needed (the target encoder's forward).

Reference: ``F.gelu(F.linear(x, weight, bias))``. Eager PyTorch on the CPU writes the
broadcast bias into the (tokens, 4·D) output, runs the matmul on it, rounds it to the
compute dtype, then reads and writes it again for the GELU. oneDNN's
``mkldnn._linear_pointwise(x, W, b, "gelu")`` (the kernel inductor emits for the same
pattern) applies bias and exact GELU to the fp32 accumulators in the matmul's epilogue:
one pass fewer over the largest activation of the block, and a single rounding instead of
two, so it is at least as accurate as eager. Measured on this project's CPU (vit_tiny at
128 px, B=32, bf16): the target encoder's forward 184 → 175 ms.

Used only where it is equivalent: CPU tensors, no autograd (a fused forward keeps no
pre-activation for GELU's backward), fp32 or bf16 compute, the oneDNN op present, not
while ``torch.compile`` traces (inductor fuses the pattern itself), and never under
``FASTJEPA_BACKEND=reference``. Everything else takes the reference, which is also what
runs if oneDNN refuses the inputs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._dispatch import cpu_has_bf16, current_backend


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias))


@functools.cache
def onednn_op():
    """oneDNN's fused linear + pointwise op, or None when this torch build has none."""
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_refused: set[tuple] = set()  # (dtype, in_features) combinations oneDNN raised on: not retried


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def _fused_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype | None:
    """The dtype the fused path computes in for these inputs, here and now; None: take the reference."""
    if x.device.type != "cpu" or onednn_op() is None or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if current_backend() == "reference":
        return None
    dtype = _compute_dtype(x)
    if not (dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_bf16())):
        return None
    return None if (dtype, weight.shape[-1]) in _refused else dtype


def fused_linear_gelu_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`linear_gelu` takes the fused path for these inputs, here and now."""
    return _fused_dtype(x, weight, bias) is not None


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` for x (..., in) -> (..., out); fused where
    :func:`fused_linear_gelu_applies`, else the reference."""
    dtype = _fused_dtype(x, weight, bias)
    if dtype is None:
        return linear_gelu_reference(x, weight, bias)
    b = None if bias is None else bias.to(dtype)
    try:
        return onednn_op()(x.to(dtype), weight.to(dtype), b, "gelu", [], "none")
    except RuntimeError:
        _refused.add((dtype, weight.shape[-1]))
        return linear_gelu_reference(x, weight, bias)

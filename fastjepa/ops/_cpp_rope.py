"""The C++ rope op ``torch.ops.fastjepa.rope_fwd`` as a differentiable function.

The extension (``csrc/rope_cpu.cpp``) defines the op and its CPU kernel; this module adds
its fake implementation (shapes only, for ``torch.compile``) and its autograd: the
backward of the op is the same op with ``backward`` flipped (the transpose of the
rotation map), so double backward works too. Import it only when
``fastjepa.ops.available()["cpp"]`` is true.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401 — loads the library, registers torch.ops.fastjepa

_op = torch.ops.fastjepa.rope_fwd


@torch.library.register_fake("fastjepa::rope_fwd")
def _(q, k, ids, n_axes, tpf, tpr, interleaved, backward):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    q, k, ids, n_axes, tpf, tpr, interleaved, backward = inputs
    ctx.save_for_backward(ids)
    ctx.args = (n_axes, tpf, tpr, interleaved, not backward)


def _backward(ctx, gq, gk):
    (ids,) = ctx.saved_tensors
    gq, gk = _op(gq, gk, ids, *ctx.args)
    return gq, gk, None, None, None, None, None, None


torch.library.register_autograd("fastjepa::rope_fwd", _backward, setup_context=_setup)


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor | None, n_axes: int, tpf: int, tpr: int, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, N, D) q, k, (B, N) | (N,) | None ids -> rotated (q, k), contiguous."""
    return _op(q, k, ids, n_axes, tpf, tpr, interleaved, False)

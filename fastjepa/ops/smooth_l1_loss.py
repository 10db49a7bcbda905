"""The I-JEPA loss: smooth-L1 (beta 1), mean over all elements.

Triton path: the custom ops ``fastjepa::smooth_l1_loss_triton`` (one read of z and h,
fp32 partial sums) and ``fastjepa::smooth_l1_loss_triton_backward`` (one read of z and
h, one write of the gradient). These move the same minimal bytes as PyTorch's own two
kernels, so fusing cannot beat it by more than launch overhead: ``auto`` keeps PyTorch's
loss (which torch.compile can also fuse into its producer), and the kernels run only when
the ``triton`` backend is forced. ``benchmarks/bench_smooth_l1_loss.py`` measures both
(see docs/ops.md, "Is the loss fused?").
The C++ extension has no loss kernel of its own: its backend (``cpp``) runs PyTorch's
ATen loss, which already is one C++ reduction and one elementwise backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validate as checks
from ._dispatch import current_backend, direct, kernels, select


def smooth_l1_loss_reference(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(z, h)


@torch.library.custom_op("fastjepa::smooth_l1_loss_triton", mutates_args=())
def _smooth_l1_loss_triton(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Same-shape z, h -> 0-dim mean loss in ``promote(z, h)``."""
    return _forward_impl(z, h)


@_smooth_l1_loss_triton.register_fake
def _(z, h):
    return z.new_empty((), dtype=torch.promote_types(z.dtype, h.dtype))


@torch.library.custom_op("fastjepa::smooth_l1_loss_triton_backward", mutates_args=())
def _smooth_l1_loss_triton_backward(
    grad: torch.Tensor, z: torch.Tensor, h: torch.Tensor, h_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-dim grad -> (grad_z like z, grad_h like h, or (0,) unless ``h_grad``)."""
    gz, gh = kernels().smooth_l1_loss_bwd(grad, z, h, h_grad)
    return gz, (gh if h_grad else h.new_empty((0,)))


def _forward_impl(z, h):
    loss = kernels().smooth_l1_loss_fwd(z, h)  # fp32
    dtype = torch.promote_types(z.dtype, h.dtype)
    return loss if loss.dtype == dtype else loss.to(dtype)


@_smooth_l1_loss_triton_backward.register_fake
def _(grad, z, h, h_grad):
    return torch.empty_like(z, memory_format=torch.contiguous_format), (
        torch.empty_like(h, memory_format=torch.contiguous_format) if h_grad else h.new_empty((0,))
    )


def _setup_context(ctx, inputs, output):
    z, h = inputs
    ctx.save_for_backward(z, h)


def _backward(ctx, grad):
    z, h = ctx.saved_tensors
    h_grad = bool(ctx.needs_input_grad[1])
    gz, gh = _smooth_l1_loss_triton_backward(grad, z, h, h_grad)
    return gz, (gh if h_grad else None)


_smooth_l1_loss_triton.register_autograd(_backward, setup_context=_setup_context)


class _SmoothL1Direct(torch.autograd.Function):
    """The custom op's forward and backward without its dispatch layers (eager calls,
    see :func:`fastjepa.ops._dispatch.direct`)."""

    @staticmethod
    def forward(ctx, z, h):
        ctx.save_for_backward(z, h)
        return _forward_impl(z, h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        z, h = ctx.saved_tensors
        h_grad = ctx.needs_input_grad[1]
        gz, gh = kernels().smooth_l1_loss_bwd(grad, z, h, h_grad)
        return gz, gh


def smooth_l1_loss(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 of predictions ``z`` against targets ``h`` (same shape), mean.

    :Equivalent pytorch code:
        ``F.smooth_l1_loss(z, h)``
    """
    checks.check_same_shape(z, h, "smooth_l1_loss")
    backend = select("smooth_l1_loss", z.device, torch.promote_types(z.dtype, h.dtype))
    if backend == "triton" and current_backend() == "triton":  # opt-in only, see the module docstring
        if direct(z, h):
            return _SmoothL1Direct.apply(z, h)
        return _smooth_l1_loss_triton(z, h)
    return smooth_l1_loss_reference(z, h)  # "reference" and "cpp": ATen's C++ kernels

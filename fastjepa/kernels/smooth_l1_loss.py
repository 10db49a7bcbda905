"""Smooth-L1 loss (beta 1, mean): kernels and launchers.

Forward: one read of ``z`` and ``h``, fp32 partial sums per program divided by the
element count, finished by the caller with one small ``sum``. Backward: ``grad_z = clamp(z − h, −1, 1) · g / n`` (and
``grad_h = −grad_z`` when asked), one read of ``z`` and ``h`` and one write each.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ._launch import jit, on_device
from ._tiles import cdiv

BLOCK = 4096  # elements per program, interpreter and GPU alike
NUM_WARPS = 4  # 32 elements of each input per thread: four 16-byte bf16 vectors in flight


# ``n`` stays specialised: its divisibility by 16 is what lets the masked loads be vectorised,
# and n = rows·Kt·D is a multiple of 16 whenever D is, whatever the mask lengths
@jit(dynamic=())
def _smooth_l1_fwd_kernel(
    Z,  # (n,) contiguous
    H,  # (n,) contiguous
    PART,  # (n_programs,) fp32 partial sums, already divided by n
    n,
    inv_n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # (BLOCK,)
    ok = offs < n
    d = tl.load(Z + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(H + offs, mask=ok, other=0.0).to(tl.float32)
    ad = tl.abs(d)
    loss = tl.where(ad < 1.0, 0.5 * d * d, ad - 0.5)  # (BLOCK,)
    tl.store(PART + pid, tl.sum(loss, axis=0) * inv_n)


@jit(dynamic=())  # ``n`` specialised, as in the forward
def _smooth_l1_bwd_kernel(
    Z,  # (n,) contiguous
    H,  # (n,) contiguous
    G,  # the 0-dim upstream gradient of the mean (any float dtype), read as one element
    GZ,  # (n,) gradient of z
    GH,  # (n,) gradient of h; unused unless H_GRAD
    n,
    inv_n,
    H_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # (BLOCK,)
    ok = offs < n
    scale = tl.load(G).to(tl.float32) * inv_n
    d = tl.load(Z + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(H + offs, mask=ok, other=0.0).to(tl.float32)
    gz = tl.minimum(tl.maximum(d, -1.0), 1.0) * scale  # (BLOCK,)
    tl.store(GZ + offs, gz.to(GZ.dtype.element_ty), mask=ok)
    if H_GRAD:
        tl.store(GH + offs, (-gz).to(GH.dtype.element_ty), mask=ok)


def smooth_l1_loss_fwd(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Mean smooth-L1 of same-shape ``z``, ``h`` -> 0-dim fp32 tensor."""
    z = z if z.is_contiguous() else z.contiguous()  # the kernel reads both flat
    h = h if h.is_contiguous() else h.contiguous()
    n = z.numel()
    if n == 0:
        return torch.full((), float("nan"), device=z.device, dtype=torch.float32)
    n_prog = cdiv(n, BLOCK)
    part = torch.empty(n_prog, device=z.device, dtype=torch.float32)
    with on_device(part.device):
        _smooth_l1_fwd_kernel[(n_prog,)](z, h, part, n, 1.0 / n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return part.sum()  # the mean: each partial sum is already divided by n


def smooth_l1_loss_bwd(
    grad: torch.Tensor, z: torch.Tensor, h: torch.Tensor, h_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """0-dim upstream grad -> (grad_z like z, grad_h like h or None), contiguous."""
    z = z if z.is_contiguous() else z.contiguous()  # the kernel reads and writes all flat
    h = h if h.is_contiguous() else h.contiguous()
    n = z.numel()
    gz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    gh = torch.empty(h.shape, device=h.device, dtype=h.dtype) if h_grad else None
    if n > 0:
        n_prog = cdiv(n, BLOCK)
        with on_device(gz.device):
            _smooth_l1_bwd_kernel[(n_prog,)](
                z, h, grad, gz, gh if h_grad else gz, n, 1.0 / n, H_GRAD=h_grad, BLOCK=BLOCK, num_warps=NUM_WARPS
            )  # grad: the 0-dim upstream gradient, read as one element
    return gz, gh

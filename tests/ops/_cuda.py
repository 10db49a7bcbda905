"""Inputs and the tolerance rule shared by the ops' compiled-kernel cases (``gpu`` mark)."""

import torch

CUDA = "cuda"
DTYPES = [torch.float32, torch.bfloat16]


def tokens(shape, dtype, contiguous):
    """A (.., R, C) tensor; strided: the transpose of a contiguous (.., C, R)."""
    *lead, r, c = shape
    if contiguous:
        return torch.randn(*shape, device=CUDA, dtype=dtype)
    return torch.randn(*lead, c, r, device=CUDA, dtype=dtype).transpose(-1, -2)


def check(kernel, with_torch, exact, dtype, atol32=1e-5):
    """fp32: the kernel equals the fp32 reference to rounding. Low precision: its error
    against the fp32 reference is at most twice PyTorch's own in that dtype, plus 1e-2."""
    if dtype == torch.float32:
        torch.testing.assert_close(kernel, exact, rtol=1e-5, atol=atol32)
        return
    err_k = (kernel.float() - exact).abs().max().item()
    err_t = (with_torch.float() - exact).abs().max().item()
    assert err_k <= 2 * err_t + 1e-2, (err_k, err_t)


def leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad)

"""smooth_l1_loss: the Triton path (interpreter on CPU) against F.smooth_l1_loss."""

import pytest
import torch

from fastjepa.ops import smooth_l1_loss, smooth_l1_loss_reference, use_backend
from fastjepa.ops.smooth_l1_loss import _smooth_l1_loss_triton, _smooth_l1_loss_triton_backward

from ._cuda import CUDA, DTYPES, check, leaf, tokens

pytestmark = pytest.mark.triton  # the interpreter on the CPU: skipped where this Triton's cannot run

SHAPES = [(1, 1, 1), (3, 7, 200), (8, 13, 61)]  # (rows, K, D); 8·13·61 spans several blocks


def run(backend, z, h, g):
    z = z.detach().clone().requires_grad_()
    h = h.detach().clone().requires_grad_(h.requires_grad)
    with use_backend(backend):
        loss = smooth_l1_loss(z, h)
    loss.backward(g)
    return loss.detach(), z.grad, h.grad



@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("h_grad", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_forward_backward_match_reference(shape, h_grad, contiguous, poison_empty):
    z = torch.randn(shape) * 2  # both branches of the loss: |z − h| < 1 and ≥ 1
    h = torch.randn(shape) if contiguous else torch.randn(shape[::-1]).permute(2, 1, 0)
    h.requires_grad_(h_grad)
    g = torch.rand(()) + 0.5
    loss, gz, gh = run("triton", z, h, g)
    ref, gz_ref, gh_ref = run("reference", z, h, g)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gz, gz_ref)
    if h_grad:
        torch.testing.assert_close(gh, gh_ref)
    else:
        assert gh is None


def test_kink_at_beta():
    """|z − h| = 1 exactly: loss 0.5, gradient ±1 as in PyTorch."""
    z = torch.tensor([1.0, -1.0, 0.0, 3.0])
    h = torch.tensor([0.0, 0.0, 0.0, 0.0])
    g = torch.tensor(1.0)
    for a, b in zip(run("triton", z, h, g), run("reference", z, h, g)):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_opcheck():
    z = torch.randn(3, 5, 16, requires_grad=True)
    h = torch.randn(3, 5, 16)
    torch.library.opcheck(_smooth_l1_loss_triton, (z, h))
    for h_grad in (True, False):
        torch.library.opcheck(_smooth_l1_loss_triton_backward, (torch.tensor(0.5), z.detach(), h, h_grad))


def test_torch_compile_parity():
    z = torch.randn(3, 5, 16, requires_grad=True)
    h = torch.randn(3, 5, 16)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def fused(z, h):
        return _smooth_l1_loss_triton(z * 2.0, h)

    loss = fused(z, h)
    (gz,) = torch.autograd.grad(loss, z)
    ref = smooth_l1_loss_reference(z * 2.0, h)
    (gz_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gz, gz_ref)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"z has shape \(2, 3\), expected the shape of h \(3, 2\)"):
        smooth_l1_loss(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="h: expected a tensor"):
        smooth_l1_loss(torch.randn(2, 3), [1.0])
    with pytest.raises(ValueError, match="floating-point"):
        smooth_l1_loss(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_low_precision_tolerance_rule(dtype, atol):
    """Kernel error vs an fp32 reference ≤ 2× the same-dtype PyTorch error + atol (docs/design.md §8)."""
    z, h = torch.randn(512, 44, 1280, device="cuda") * 2, torch.randn(512, 44, 1280, device="cuda")
    # upstream gradient n: each element's gradient is then clamp(z - h, -1, 1), O(1) — with
    # 1 it would be at most 1/n ≈ 3.5e-8, far below atol, and a zero gradient would pass
    g = torch.tensor(float(z.numel()), device="cuda")
    exact = run("reference", z, h, g)
    with_torch = run("reference", z.to(dtype), h.to(dtype), g)
    with_kernel = run("triton", z.to(dtype), h.to(dtype), g)
    assert exact[1].abs().max().item() > 0.5  # the gradient check has something to check
    for k, t, e in zip(with_kernel[:2], with_torch[:2], exact[:2]):
        err_k = (k.float() - e).abs().max().item()
        err_t = (t.float() - e).abs().max().item()
        assert err_k <= 2 * err_t + atol, (err_k, err_t)


# -- compiled on a GPU: ViT-H-sized targets, strided inputs, both inputs' gradients


def _run_loss(backend, z, h, g):
    z, h = leaf(z), leaf(h)
    with use_backend(backend):
        loss = smooth_l1_loss(z, h)
    loss.backward(g)
    return loss.detach(), z.grad, h.grad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_smooth_l1_loss_on_cuda(dtype, contiguous):
    """The forced Triton loss (fwd + bwd, both inputs' gradients) on ViT-H-sized targets."""
    z = 2 * tokens((256, 44, 1280), torch.float32, contiguous)
    h = tokens((256, 44, 1280), torch.float32, contiguous)
    g = torch.tensor(float(z.numel()), device=CUDA)  # per-element gradients O(1), not 1/n
    exact = _run_loss("reference", z, h, g)
    with_torch = _run_loss("reference", z.to(dtype), h.to(dtype), g)
    with_kernel = _run_loss("triton", z.to(dtype), h.to(dtype), g)
    assert exact[1].abs().max().item() > 0.5  # the gradient check has something to check
    for k, t, e in zip(with_kernel, with_torch, exact):
        check(k, t, e, dtype, 1e-5)

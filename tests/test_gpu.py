"""What only a CUDA GPU can check, end to end: `TRITON_INTERPRET=0 pytest -m gpu`.

* two processes on two GPUs over NCCL (DDP and FSDP2): each rank on cuda:LOCAL_RANK;
* no CUDA synchronisation inside a training step (``torch.cuda.set_sync_debug_mode``);
* three bf16 training steps of fastjepa and of the reference path from the same weights
  and masks: finite, losses within bf16 tolerance of each other, the EMA target moved;
* each fused op compiled for the GPU against its reference: pos tables that require grad
  (the atomic paths), int32 and int64 indices, strided inputs, and one gather past 2³¹
  elements.

Everything here carries the ``gpu`` mark: without a CUDA device (or under the CPU tests'
TRITON_INTERPRET=1) it is skipped, saying why (tests/conftest.py).
"""

import math

import pytest
import torch

from fastjepa.config import load_config
from fastjepa.ops import (
    gather_tokens,
    predictor_tokens,
    smooth_l1_loss,
    target_tokens,
    target_tokens_reference,
    use_backend,
)
from fastjepa.trainer import Trainer

from ._tiny import TINY

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# -- two processes, two GPUs


@pytest.mark.skipif(_gpus() < 2, reason=f"needs two CUDA GPUs (one process on each, over NCCL); this machine has {_gpus()}")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_on_two_gpus_over_nccl(tmp_path, mode):
    """torchrun --nproc_per_node=2 with meta.device=cuda: rank r trains on cuda:r (two ranks
    on one GPU would stop NCCL with 'Duplicate GPU detected'); the run finishes with finite
    losses and, under DDP, identical weights on both ranks."""
    from .test_distributed import losses, torchrun

    extra = ["meta.fsdp=true"] if mode == "fsdp" else []
    r = torchrun(tmp_path / mode, "meta.device=cuda", "meta.use_bfloat16=true", *extra, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "vit_tiny on cuda:0 (2 process(es))" in r.stderr, r.stderr[-3000:]
    assert ("parameters identical across 2 ranks" if mode == "ddp" else "FSDP2 run finished on 2 ranks") in r.stderr
    rows = losses(tmp_path / mode)
    assert len(rows) == 8 and all(math.isfinite(v) for _, v in rows)


# -- the training step on CUDA


def _trainer(out, *overrides) -> Trainer:
    cfg = load_config(None, [*TINY, "meta.device=cuda", "meta.use_bfloat16=true", *overrides])
    return Trainer(cfg, out, quiet=True)


def _batch(t: Trainer, first: int = 0):
    """A collated batch of 8 on the trainer's device (the masks drawn once, by ``t``'s collator)."""
    udata, masks_enc, masks_pred = t.collator([t.dataset[i] for i in range(first, first + 8)])
    return t.stepper.to_device(udata, masks_enc, masks_pred)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_no_cuda_synchronisation_inside_a_step(tmp_path, policy):
    """fastjepa's step (bf16, fused AdamW, nan_policy stop or skip) runs under
    ``set_sync_debug_mode("error")``: any host sync inside it — a read of a loss, a flag or a
    gradient norm — would raise. The log step's gradient norms stay on the device too."""
    t = _trainer(tmp_path, f"optimization.nan_policy={policy}")
    assert t.device == torch.device("cuda", 0) and t.amp_dtype is torch.bfloat16 and t.skip_on_device
    batch = _batch(t)  # one batch throughout: Triton compiles (and any autotuning runs) in the warm-up only
    for i in range(2):
        t.stepper.step(*batch, index=i, want_grads=True)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):  # the mode is on: a host read raises
            torch.ones(1, device=t.device).item()
        outs = []
        for i in range(3):
            outs.append(t.stepper.step(*batch, index=2 + i, want_grads=i == 2))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(torch.stack([r.loss for r in outs])).all()
    grads = outs[-1].grads
    assert grads is not None and grads.device == t.device and torch.isfinite(grads).all()
    if policy == "skip":
        assert outs[-1].skipped.item() == 0.0


def test_three_bf16_steps_of_fastjepa_and_the_reference_from_the_same_start(tmp_path):
    """Same seed (so the same initial weights), the same three batches and masks: both paths
    give finite losses within bf16 tolerance of each other, and both move the EMA target."""
    fast = _trainer(tmp_path / "fast")
    ref = _trainer(tmp_path / "ref", "meta.reference_step=true")
    assert ref.scaler is not None and fast.scaler is None  # the reference step keeps its GradScaler
    for (name, a), b in zip(fast.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(a, b), name
    batches = [_batch(fast, first) for first in (0, 8, 16)]
    losses = {}
    for name, t in (("fast", fast), ("ref", ref)):
        start = [p.detach().clone() for p in t.model.target_encoder.parameters()]
        values = []
        for i, b in enumerate(batches):
            with t.stepper.backend():
                loss = t.stepper.step(*b, index=i).loss
            values.append(loss.item())
        losses[name] = values
        moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(t.model.target_encoder.parameters(), start))
        assert moved > 0, f"{name}: the EMA target did not move"
        assert all(p.dtype == torch.float32 for p in t.model.parameters())  # bf16 activations, fp32 weights
    assert all(math.isfinite(v) for v in losses["fast"] + losses["ref"]), losses
    # bf16 keeps 8 significant bits (relative spacing 2^-7 ≈ 0.8%): the paths round differently
    # (fastjepa's residual stream is bf16, the reference's fp32), so allow a few spacings
    for a, b in zip(losses["fast"], losses["ref"]):
        assert a == pytest.approx(b, rel=2e-2), losses


# -- the fused ops, compiled


def _tokens(shape, dtype, contiguous):
    """A (.., R, C) tensor; strided: the transpose of a contiguous (.., C, R)."""
    *lead, r, c = shape
    if contiguous:
        return torch.randn(*shape, device=CUDA, dtype=dtype)
    return torch.randn(*lead, c, r, device=CUDA, dtype=dtype).transpose(-1, -2)


def _check(kernel, with_torch, exact, dtype, atol32=1e-5):
    """fp32: the kernel equals the fp32 reference to rounding. Low precision: its error
    against the fp32 reference is at most twice PyTorch's own in that dtype, plus 1e-2."""
    if dtype == torch.float32:
        torch.testing.assert_close(kernel, exact, rtol=1e-5, atol=atol32)
        return
    err_k = (kernel.float() - exact).abs().max().item()
    err_t = (with_torch.float() - exact).abs().max().item()
    assert err_k <= 2 * err_t + 1e-2, (err_k, err_t)


def _leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad)


def _run_gather(backend, x, masks, pos, grad):
    x, pos = _leaf(x), _leaf(pos)
    with use_backend(backend):
        out = gather_tokens(x, masks, pos)
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad, pos.grad


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_gather_tokens_on_cuda_with_a_trainable_pos_table(dtype, idx_dtype, contiguous):
    """ViT-B/16's context gather (N=196, D=768), two masks of 71 drawn with replacement
    (repeated indices within and across masks) and a pos table that requires grad."""
    B, N, D, M, K = 16, 196, 768, 2, 71
    x, pos = _tokens((B, N, D), torch.float32, contiguous), _tokens((1, N, D), torch.float32, contiguous)
    masks = [torch.randint(0, N, (B, K), device=CUDA, dtype=idx_dtype) for _ in range(M)]
    grad = torch.randn(M * B, K, D, device=CUDA)
    exact = _run_gather("reference", x, masks, pos, grad)
    low = (x.to(dtype), masks, pos.to(dtype), grad)
    assert low[0].is_contiguous() == contiguous
    with_torch = _run_gather("reference", *low)
    with_kernel = _run_gather("triton", *low)
    # the pos gradient sums up to M·B·K / N · (repeats) rows per entry in another order
    for k, t, e, atol in zip(with_kernel, with_torch, exact, (1e-5, 1e-5, 1e-4)):
        _check(k, t, e, dtype, atol)


def _run_predictor(backend, ctx, masks_x, masks, pos, mask_token, grad):
    ctx, pos, mask_token = _leaf(ctx), _leaf(pos), _leaf(mask_token)
    with use_backend(backend):
        out = predictor_tokens(ctx, masks_x, masks, pos, mask_token)
    out.backward(grad.to(out.dtype))
    return out.detach(), ctx.grad, mask_token.grad, pos.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_predictor_tokens_on_cuda_with_a_trainable_pos_table(dtype, idx_dtype, contiguous):
    """ViT-B's predictor input (P=384), nenc=2, npred=4, Kc=54, Kt=34; the pos table
    requires grad (its rows accumulate with atomics)."""
    B, N, P, nenc, npred, Kc, Kt = 8, 196, 384, 2, 4, 54, 34
    ctx = _tokens((nenc * B, Kc, P), torch.float32, contiguous)
    pos = _tokens((1, N, P), torch.float32, contiguous)
    mask_token = torch.randn(1, 1, P, device=CUDA)
    masks_x = [torch.randint(0, N, (B, Kc), device=CUDA, dtype=idx_dtype) for _ in range(nenc)]
    masks = [torch.randint(0, N, (B, Kt), device=CUDA, dtype=idx_dtype) for _ in range(npred)]
    grad = torch.randn(npred * nenc * B, Kc + Kt, P, device=CUDA)
    exact = _run_predictor("reference", ctx, masks_x, masks, pos, mask_token, grad)
    low = (ctx.to(dtype), masks_x, masks, pos.to(dtype), mask_token.to(dtype), grad)
    with_torch = _run_predictor("reference", *low)
    with_kernel = _run_predictor("triton", *low)
    R = npred * nenc * B  # the mask token's gradient sums R·Kt rows, each pos row up to R·(Kc+Kt)/N·(repeats)
    for k, t, e, atol in zip(with_kernel, with_torch, exact, (1e-5, 1e-5, 2e-7 * R * Kt, 2e-7 * R * (Kc + Kt))):
        _check(k, t, e, dtype, max(atol, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_target_tokens_on_cuda(dtype, idx_dtype, contiguous):
    """ViT-B's targets (N=196, D=768), npred=4 masks of 34, nenc=2."""
    B, N, D, npred, nenc, Kt = 16, 196, 768, 4, 2, 34
    h = 3 * _tokens((B, N, D), torch.float32, contiguous) + 1  # not already normalised
    masks = [torch.randint(0, N, (B, Kt), device=CUDA, dtype=idx_dtype) for _ in range(npred)]
    exact = target_tokens_reference(h, masks, nenc)
    with use_backend("reference"):
        with_torch = target_tokens(h.to(dtype), masks, nenc)
    with use_backend("triton"):
        with_kernel = target_tokens(h.to(dtype), masks, nenc)
    assert with_kernel.shape == (npred * nenc * B, Kt, D) and with_kernel.dtype == dtype
    _check(with_kernel, with_torch, exact, dtype, 1e-5)


def _run_loss(backend, z, h, g):
    z, h = _leaf(z), _leaf(h)
    with use_backend(backend):
        loss = smooth_l1_loss(z, h)
    loss.backward(g)
    return loss.detach(), z.grad, h.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_smooth_l1_loss_on_cuda(dtype, contiguous):
    """The forced Triton loss (fwd + bwd, both inputs' gradients) on ViT-H-sized targets."""
    z = 2 * _tokens((256, 44, 1280), torch.float32, contiguous)
    h = _tokens((256, 44, 1280), torch.float32, contiguous)
    g = torch.tensor(float(z.numel()), device=CUDA)  # per-element gradients O(1), not 1/n
    exact = _run_loss("reference", z, h, g)
    with_torch = _run_loss("reference", z.to(dtype), h.to(dtype), g)
    with_kernel = _run_loss("triton", z.to(dtype), h.to(dtype), g)
    assert exact[1].abs().max().item() > 0.5  # the gradient check has something to check
    for k, t, e in zip(with_kernel, with_torch, exact):
        _check(k, t, e, dtype, 1e-5)


def test_gather_tokens_past_2_31_elements():
    """x of 2048 × 1025 × 1024 bf16 elements (2.15e9 > 2³¹, 4.3 GB): the images past
    the first 1024 sit beyond any 32-bit element offset. int32 indices; the forward equals
    PyTorch's gather, the backward writes every element of grad_x (the rows no mask picked
    zero) and the pos gradient sums over the batch. Peak memory about 10 GB."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with at least 24 GiB")
    B, N, D, K = 2048, 1025, 1024, 4
    assert B * N * D > 2**31
    x = torch.randn(B, N, D, device=CUDA, dtype=torch.bfloat16)
    pos = torch.randn(1, N, D, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.rand(B, N, device=CUDA).argsort(dim=1)[:, :K].contiguous()  # (B, K) distinct per image
    idx[-1, 0] = N - 1  # the very last row of x
    masks = [idx.to(torch.int32)]
    with use_backend("triton"):
        out = gather_tokens(x, masks, pos)
    sel = idx.unsqueeze(-1).expand(-1, -1, D)
    expected = torch.gather(x, 1, sel) + pos.detach()[0][idx]  # (B, K, D), PyTorch's 64-bit indexing
    torch.testing.assert_close(out.detach(), expected)  # bf16 tolerance: a wrapped 32-bit offset reads garbage
    grad = torch.randn(B, K, D, device=CUDA, dtype=torch.bfloat16)
    # leave a NaN-filled block of grad_x's size in the allocator's cache: an element the
    # backward forgets to write is then most likely NaN, counted as nonzero below
    torch.full((B, N, D), float("nan"), device=CUDA, dtype=torch.bfloat16)
    x.requires_grad_(True)
    with use_backend("triton"):
        gathered = gather_tokens(x, masks, pos)
    gx, gpos = torch.autograd.grad(gathered, (x, pos), grad)
    assert torch.equal(torch.gather(gx, 1, sel), grad)  # each picked row: its own gradient, once
    assert torch.count_nonzero(gx).item() == torch.count_nonzero(grad).item()  # nothing else, and no NaN
    want = torch.zeros(N, D, device=CUDA).index_add_(0, idx.reshape(-1), grad.reshape(-1, D).float())
    torch.testing.assert_close(gpos[0].float(), want, rtol=1e-2, atol=1e-2)
    del x, gx, gathered, out
    torch.cuda.empty_cache()

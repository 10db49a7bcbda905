"""Attention backends: each one that runs here equals the explicit-softmax reference.

CPU: SDPA (and math) in fp32 and float64 on random inputs, forward and backward with a
random upstream gradient; flash-attn and xformers are skipped with the reason they cannot
run. A forced backend that cannot run raises, naming why. The whole I-JEPA loss and its
gradients agree across backends. GPU-marked tests check flash-attn, xformers and SDPA's
flash kernel in bf16 with the tolerance rule of docs/design.md §8: the error against an fp32
reference is at most twice that of the same-dtype math attention, plus a small atol.
"""

import sys

import pytest
import torch

from fastjepa.ops import attention, attention_available, attention_reference, current_attention, reread_environment, use_attention

from .._tiny import tiny_ijepa_batch

attn_mod = sys.modules["fastjepa.ops.attention"]  # the package re-exports the function under the module's name

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
SHAPES = [(2, 3, 17, 24), (1, 2, 64, 32), (3, 1, 9, 80), (1, 1, 1, 32)]  # (B, H, N, hd): odd N, I-JEPA head dims


def _qkv(shape, dtype, device="cpu"):
    return [torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]


def _fwd_bwd(fn, q, k, v, grad):
    out = fn(q, k, v)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)
    return out.detach(), gq, gk, gv


def _skip_reason(backend: str) -> str | None:
    return attn_mod.why_not(backend, torch.empty(1, 1, 1, 32))


@pytest.mark.parametrize("backend", ["sdpa", "math", "flash", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_math_fwd_bwd(backend, dtype, shape):
    why = _skip_reason(backend)
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    q, k, v = _qkv(shape, dtype)
    grad = torch.randn(shape, dtype=dtype)
    scale = float(torch.empty(()).uniform_(0.05, 0.5))  # a scale other than hd**-0.5 too
    for s in (None, scale):
        got = _fwd_bwd(lambda a, b, c, s=s: attention(a, b, c, scale=s, backend=backend), q, k, v, grad)
        ref = _fwd_bwd(lambda a, b, c, s=s: attention_reference(a, b, c, s), q, k, v, grad)
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
            assert g.dtype == dtype and g.shape == r.shape
            torch.testing.assert_close(g, r, **TOL[dtype], msg=f"{backend} {name}")


def test_auto_picks_sdpa_on_cpu():
    q = torch.randn(1, 2, 5, 24)
    assert attn_mod.select_attention(q) == "sdpa"
    # CPU half precision, short sequences: the explicit softmax (measured faster there)
    assert attn_mod.select_attention(q.bfloat16()) == "math"
    n = attn_mod.CPU_HALF_MATH_MAX_N + 1
    assert attn_mod.select_attention(torch.randn(1, 1, n, 8, dtype=torch.bfloat16)) == "sdpa"
    with use_attention("math"):
        assert attn_mod.select_attention(q) == "math"


@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_forced_unavailable_backend_says_why(backend, env):
    q = torch.randn(1, 2, 5, 32)
    why = attn_mod.why_not(backend, q)
    assert why == f"{backend} needs CUDA tensors, got cpu"  # neither runs on CPU tensors, installed or not
    with pytest.raises(RuntimeError, match=f"{backend}.*cannot run.*needs CUDA tensors"):
        attention(q, q, q, backend=backend)
    env.setenv("FASTJEPA_ATTN", backend)
    with pytest.raises(RuntimeError, match="was forced"):
        attention(q, q, q)


def test_missing_package_reason(monkeypatch):
    """With the package absent (on a CUDA tensor) the reason names the import failure."""
    monkeypatch.setattr(attn_mod, "_import", lambda module: (None, f"{module} does not import (ModuleNotFoundError: test)"))
    q = type("Q", (), {"device": torch.device("cuda"), "dtype": torch.bfloat16, "size": torch.empty(1, 1, 2, 32).size})()
    assert "flash_attn does not import" in attn_mod.why_not("flash", q)
    assert "xformers.ops does not import" in attn_mod.why_not("xformers", q)
    avail = attention_available()
    assert not avail["flash"] and not avail["xformers"] and avail["sdpa"] and avail["math"]


def test_flash_reasons_for_dtype_and_head_dim(monkeypatch):
    """The dtype, head-dim and architecture reasons, checked without a GPU by faking one."""

    class FakeFlash:
        __version__ = "0-test"

    monkeypatch.setattr(attn_mod, "_import", lambda module: (FakeFlash, None))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    meta = torch.device("meta")

    def fake_cuda(shape, dtype):
        t = torch.empty(shape, dtype=dtype, device=meta)
        return type("Q", (), {"device": torch.device("cuda"), "dtype": dtype, "size": t.size})()

    assert "float16 or bfloat16" in attn_mod.why_not("flash", fake_cuda((1, 1, 4, 32), torch.float32))
    assert "head dim" in attn_mod.why_not("flash", fake_cuda((1, 1, 4, 36), torch.bfloat16))
    assert "head dim" in attn_mod.why_not("flash", fake_cuda((1, 1, 4, 264), torch.bfloat16))
    assert attn_mod.why_not("flash", fake_cuda((1, 1, 4, 24), torch.bfloat16)) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability" in attn_mod.why_not("flash", fake_cuda((1, 1, 4, 32), torch.float16))


def test_env_and_context_manager(env):
    env.delenv("FASTJEPA_ATTN")
    assert current_attention() == "auto"
    env.setenv("FASTJEPA_ATTN", "MATH ")
    assert current_attention() == "math"
    with use_attention("sdpa"):
        assert current_attention() == "sdpa"  # the context manager wins over the environment
        with use_attention("math"):
            assert current_attention() == "math"
        assert current_attention() == "sdpa"
    assert current_attention() == "math"
    env.setenv("FASTJEPA_ATTN", "flashy")
    with pytest.raises(ValueError, match="FASTJEPA_ATTN='flashy'.*expected one of auto, flash, xformers, sdpa, math"):
        current_attention()
    with pytest.raises(ValueError, match="use_attention"):
        with use_attention("cudnn"):
            pass


def test_env_reaches_the_op(monkeypatch, env):
    """``FASTJEPA_ATTN`` selects the function that runs (spied), not just the name."""
    calls = []
    real = attn_mod.attention_reference
    monkeypatch.setattr(attn_mod, "attention_reference", lambda *a: calls.append("math") or real(*a))
    q = torch.randn(1, 2, 6, 24)
    env.setenv("FASTJEPA_ATTN", "sdpa")
    attention(q, q, q)
    assert calls == []
    env.setenv("FASTJEPA_ATTN", "math")
    attention(q, q, q)
    assert calls == ["math"]
    env.mp.setenv("FASTJEPA_ATTN", "sdpa")  # read once: a change takes effect when re-read
    attention(q, q, q)
    assert calls == ["math", "math"]
    reread_environment()
    attention(q, q, q)
    assert calls == ["math", "math"]


def test_rejects_bad_shapes_and_names():
    q = torch.randn(1, 2, 6, 24)
    with pytest.raises(ValueError, match=r"\(B, H, N, hd\)"):
        attention(q, q[:, :, :5], q)
    with pytest.raises(ValueError, match="not an attention backend"):
        attention(q, q, q, backend="cudnn")


def _tiny_ijepa(dtype):
    model, (imgs, masks_enc, masks_pred) = tiny_ijepa_batch(pred_dim=64, batch=3, dtype=dtype)  # head dims 24 / 32
    return model, imgs, masks_enc, masks_pred


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whole_model_same_loss_and_grads_each_backend(dtype):
    model, imgs, masks_enc, masks_pred = _tiny_ijepa(dtype)
    results = {}
    for backend in ("math", "sdpa", "flash", "xformers"):
        if _skip_reason(backend) is not None:
            continue
        model.zero_grad(set_to_none=True)
        with use_attention(backend):
            loss = model(imgs, masks_enc, masks_pred)
            loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert {"math", "sdpa"} <= results.keys()
    loss_ref, grads_ref = results.pop("math")
    assert "predictor.mask_token" in grads_ref and "encoder.blocks.0.attn.qkv.weight" in grads_ref
    for backend, (loss, grads) in results.items():
        torch.testing.assert_close(loss, loss_ref, **TOL[dtype], msg=backend)
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], **TOL[dtype], msg=f"{backend} {name}")


# -- GPU: bf16 kernels against an fp32 reference, the tolerance rule of docs/design.md §8


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm())


def _check_rule(name, got, low, ref, atol=1e-3):
    """``got`` (kernel, bf16) vs ``ref`` (fp32): error at most 2x that of ``low`` (math in bf16) + atol."""
    assert torch.isfinite(got).all(), name
    e_got, e_low = _rel_err(got, ref), _rel_err(low, ref)
    assert e_got <= 2 * e_low + atol, f"{name}: rel err {e_got:.2e} > 2 x {e_low:.2e} (math in bf16) + {atol}"


def _gpu_case(backend, shape):
    dev = torch.device("cuda")
    q, k, v = (torch.randn(shape, device=dev) for _ in range(3))
    grad = torch.randn(shape, device=dev)
    leaves32 = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves16 = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    ref = _fwd_bwd(lambda a, b, c: attention_reference(a, b, c), *leaves32, grad)
    low = _fwd_bwd(lambda a, b, c: attention_reference(a, b, c), *leaves16, grad.bfloat16())
    if backend == "sdpa-flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            got = _fwd_bwd(lambda a, b, c: attention(a, b, c, backend="sdpa"), *leaves16, grad.bfloat16())
    else:
        got = _fwd_bwd(lambda a, b, c: attention(a, b, c, backend=backend), *leaves16, grad.bfloat16())
    for name, g, lo, r in zip(("out", "dq", "dk", "dv"), got, low, ref):
        assert g.dtype == torch.bfloat16, f"{backend} {name}: {g.dtype}"
        _check_rule(f"{backend} {name}", g, lo, r)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "xformers", "sdpa-flash", "sdpa"])
@pytest.mark.parametrize("shape", [(4, 16, 257, 80), (8, 12, 196, 64), (64, 16, 99, 24), (32, 12, 111, 32)], ids=str)
def test_gpu_bf16_backends(backend, shape):
    if backend in ("flash", "xformers"):
        why = attn_mod.why_not(backend, torch.empty(1, 1, 1, shape[-1], device="cuda", dtype=torch.bfloat16))
        if why is not None:
            pytest.skip(f"{backend}: {why}")
    _gpu_case(backend, shape)


@pytest.mark.gpu
def test_gpu_auto_under_autocast_gives_bf16():
    """Under bf16 autocast, fp32 q/k/v go to a half-precision kernel (flash or SDPA)."""
    q = torch.randn(2, 4, 50, 24, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        name = attn_mod.select_attention(q)
        out = attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
    assert name in ("flash", "sdpa") and out.dtype == torch.bfloat16

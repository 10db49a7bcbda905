"""The fused ops on a GPU, as library code meets them: `TRITON_INTERPRET=0 pytest -m gpu`.

* tensors on ``cuda:1`` while ``cuda:0`` is current: every op launches on its tensors'
  device (Triton launches on the current device unless the launcher guards it);
* mask lengths that change from batch to batch compile no kernel again (the lengths are
  ``do_not_specialize``; a compile counter reads Triton's per-device kernel caches);
* each op's forward and forward + backward captured in a CUDA graph and replayed on new
  input values equals the eager call on those values.

Everything here carries the ``gpu`` mark (skipped without CUDA or under the CPU tests'
TRITON_INTERPRET=1, tests/conftest.py). ``tests/kernels/test_launch.py`` checks the device
guard and the ``do_not_specialize`` sets on the CPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastjepa import ops
from fastjepa.ops._dispatch import kernels

pytestmark = pytest.mark.gpu
MODULES = ("gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss", "sorted_predictor_tokens", "rope")
TOL = dict(rtol=1e-5, atol=1e-5)


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _masks(B: int, N: int, k: int, n: int, device) -> list[torch.Tensor]:
    """n sorted (B, k) masks of distinct indices in [0, N)."""
    return [torch.sort(torch.rand(B, N, device=device).argsort(dim=1)[:, :k], dim=1).values for _ in range(n)]


def _calls(device, Kc: int = 20, Kt: int = 9, *, N: int = 36, D: int = 64, P: int = 48, head_dim: int = 16, grid=(6, 6)):
    """op name -> (fused fn, reference fn, differentiable inputs), fp32 on ``device``; each fn
    returns one tensor. Masks index N = H·W tokens of ``grid``."""
    B, nenc, npred, nh = 3, 1, 2, 2
    x = torch.randn(B, N, D, device=device, requires_grad=True)
    pos = torch.randn(1, N, D, device=device)
    mx, mp = _masks(B, N, Kc, nenc, device), _masks(B, N, Kt, npred, device)
    ctx = torch.randn(nenc * B, Kc, P, device=device, requires_grad=True)
    ppos = torch.randn(1, N, P, device=device)
    mt = torch.randn(1, 1, P, device=device, requires_grad=True)
    h = torch.randn(B, N, D, device=device)
    z = torch.randn(npred * nenc * B, Kt, D, device=device, requires_grad=True)
    zt = torch.randn(npred * nenc * B, Kt, D, device=device)
    # head_dim a multiple of 16: every stride of q and k stays one as the length changes
    q = torch.randn(B, nh, Kc + Kt, head_dim, device=device, requires_grad=True)
    k = torch.randn(B, nh, Kc + Kt, head_dim, device=device, requires_grad=True)
    ids = torch.cat([mx[0], mp[0]], dim=1).sort(dim=1).values
    sctx = torch.randn(B, Kc, P, device=device, requires_grad=True)

    def sorted_fused():
        y, _, order = ops.sorted_predictor_tokens(sctx, mx[:1], mp[:1], mt, ppos)
        return ops.sorted_predictor_take_targets(y * 2.0, order)

    def sorted_ref():
        y, _, order = ops.sorted_predictor_tokens_reference(sctx, mx[:1], mp[:1], mt, ppos)
        return ops.sorted_predictor_take_targets_reference(y * 2.0, order)

    def rope(fn):
        qr, kr = fn(q, k, ids, tuple(grid))
        return torch.cat([qr, kr])

    return {
        "gather_tokens": (lambda: ops.gather_tokens(x, mx, pos), lambda: ops.gather_tokens_reference(x, mx, pos), [x]),
        "predictor_tokens": (lambda: ops.predictor_tokens(ctx, mx, mp, ppos, mt),
                             lambda: ops.predictor_tokens_reference(ctx, mx, mp, ppos, mt), [ctx, mt]),
        "target_tokens": (lambda: ops.target_tokens(h, mp, nenc), lambda: ops.target_tokens_reference(h, mp, nenc), []),
        "smooth_l1_loss": (lambda: ops.smooth_l1_loss(z, zt), lambda: ops.smooth_l1_loss_reference(z, zt), [z]),
        "sorted_predictor_tokens+take": (sorted_fused, sorted_ref, [sctx, mt]),
        "rope_qk": (lambda: rope(ops.rope_qk), lambda: rope(ops.rope_qk_reference), [q, k]),
    }  # fmt: skip


def _fwd_bwd(fn, inputs, grad=None):
    for t in inputs:
        t.grad = None
    out = fn()
    if inputs:
        out.backward(torch.ones_like(out) if grad is None else grad)
    return out.detach().clone(), [t.grad.clone() for t in inputs]


OPS = ["gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss", "sorted_predictor_tokens+take", "rope_qk"]


# -- the tensors' device, not the current one -------------------------------------------------


@pytest.mark.skipif(_gpus() < 2, reason=f"needs two CUDA GPUs; this machine has {_gpus()}")
@pytest.mark.parametrize("op", OPS)
def test_each_op_runs_on_the_second_gpu_while_the_first_is_current(op):
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    fused, ref, inputs = _calls(dev)[op]
    with ops.use_backend("triton"):
        out, grads = _fwd_bwd(fused, inputs)
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0  # the guard restored the current device
    want, want_grads = _fwd_bwd(ref, inputs)
    assert out.device == dev
    torch.testing.assert_close(out, want, **TOL)
    for g, w in zip(grads, want_grads):
        assert g.device == dev
        torch.testing.assert_close(g, w, **TOL)


# -- no recompiles from mask lengths --------------------------------------------------------------


def _compiled() -> int:
    """Compiled kernel variants in Triton's per-device caches, over every fastjepa kernel."""
    kernels()
    total = 0
    for name in MODULES:
        mod = importlib.import_module("fastjepa.kernels." + name)
        for attr in (a for a in vars(mod) if a.endswith("_kernel")):
            caches = getattr(getattr(mod, attr), "device_caches", {})
            total += sum(len(entry[0]) for entry in caches.values())  # entry[0]: the kernel cache
    return total


def test_mask_lengths_compile_no_kernel_again():
    """Kc and Kt over values on both sides of multiples of 16: after one warm-up call per op
    (at lengths that are not multiples of 16), no new compile. Model-like widths (D = 256,
    P = 384, head_dim 64) and lengths from 33 up, as in training: below ~32 tokens the
    launchers' tile heights follow the length (the next power of two), one kernel per such
    size by design."""
    dev = torch.device("cuda", torch.cuda.current_device())
    shape = dict(N=100, D=256, P=384, head_dim=64, grid=(10, 10))
    with ops.use_backend("triton"):
        for fused, _, inputs in _calls(dev, Kc=37, Kt=35, **shape).values():
            _fwd_bwd(fused, inputs)
        torch.cuda.synchronize()
        before = _compiled()
        assert before > 0, "the compile counter sees no compiled kernel: Triton's cache layout changed"
        for kc, kt in ((48, 48), (64, 33), (49, 47), (65, 63), (80, 64), (33, 40)):
            for fused, _, inputs in _calls(dev, Kc=kc, Kt=kt, **shape).values():
                _fwd_bwd(fused, inputs)
        torch.cuda.synchronize()
    assert _compiled() == before


# -- CUDA graphs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", OPS)
def test_each_op_captures_in_a_cuda_graph_and_replays_equal_to_eager(op, backward):
    """Static inputs, a warm-up on a side stream (compiles, fills caches), capture, then new
    values copied into the inputs and one replay: the graph's output (and gradients) equal
    an eager call on the new values. A host sync, a ``.item()`` or a pageable copy inside
    the op would make the capture raise."""
    dev = torch.device("cuda", torch.cuda.current_device())
    fused, _, inputs = _calls(dev)[op]
    if backward and not inputs:
        pytest.skip(f"{op} has no gradient")
    leaves = _leaves(fused)
    with ops.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                _run(fused, inputs, backward)
        torch.cuda.current_stream().wait_stream(side)
        for t in inputs:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = _run(fused, inputs, backward)
        with torch.no_grad():  # new values in the same storage
            for t in leaves:
                t.copy_(torch.randn_like(t) if t.is_floating_point() else t)
        graph.replay()
        torch.cuda.synchronize()
        got = static_out.clone()
        got_grads = [t.grad.clone() for t in inputs] if backward else []
        for t in inputs:
            t.grad = None
        want = _run(fused, inputs, backward).detach()
        want_grads = [t.grad for t in inputs] if backward else []
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **TOL)


def _run(fn, inputs, backward):
    out = fn()
    if backward:
        out.backward(torch.ones_like(out))
    return out


def _leaves(fn) -> list[torch.Tensor]:
    """The floating-point tensors a call closes over (its inputs), found through the closure."""
    out, seen = [], set()

    def walk(f):
        for cell in getattr(f, "__closure__", None) or ():
            v = cell.cell_contents
            if isinstance(v, torch.Tensor) and v.is_floating_point() and id(v) not in seen:
                seen.add(id(v))
                out.append(v)
            elif callable(v):
                walk(v)

    walk(fn)
    return out

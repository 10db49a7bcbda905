"""Shared pieces of the op benchmarks: device choice, cases, equality check, timer.

Each ``bench_<op>.py`` describes its op as :class:`Case` objects (inputs, providers,
minimal bytes); its pytest-benchmark tests and ``ops_table.py`` both time those.

On a machine without CUDA the Triton kernels run through the interpreter, so this module
sets ``TRITON_INTERPRET=1`` before anything imports triton, and the cases use tiny
shapes (the numbers then say nothing about speed; the run proves the harness works).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("fastjepa") is None:  # a source checkout run as `python benchmarks/...`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastjepa.ops import use_backend  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
PROVIDERS = ("reference", "compiled", "fused")
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}  # (rtol, atol)


def gpu_shapes(cpu: dict[str, dict], gpu: dict[str, dict]) -> dict[str, dict]:
    """The published-model shapes on a GPU, the tiny ones on the CPU interpreter."""
    return gpu if ON_GPU else cpu


def block_masks(count: int, B: int, N: int, K: int, device: torch.device) -> list[torch.Tensor]:
    """``count`` (B, K) int64 masks of sorted distinct indices, like the multi-block sampler's."""
    return [torch.rand(B, N, device=device).argsort(dim=1)[:, :K].sort(dim=1).values for _ in range(count)]


@dataclass
class Case:
    """One op at one shape: ``run[provider][pass]()`` returns the tensors to compare."""

    op: str
    shape: str
    dtype: torch.dtype
    run: dict[str, dict[str, Callable[[], tuple[torch.Tensor, ...]]]] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)  # pass -> minimal bytes moved

    @property
    def passes(self) -> list[str]:
        return list(self.bytes)


def with_backend(backend: str, fn: Callable) -> Callable:
    def call(*args):
        with use_backend(backend):
            return fn(*args)

    return call


def passes(forward: Callable, args: tuple, leaves: tuple[int, ...], grad: torch.Tensor | None) -> dict[str, Callable]:
    """``fwd`` (no autograd graph) and, when ``leaves`` is non-empty, ``fwd+bwd``.

    ``leaves`` index the float args that get gradients; ``grad`` is the upstream gradient.
    """
    out = {}

    def fwd():
        with torch.no_grad():
            return (forward(*args),)

    out["fwd"] = fwd
    if leaves:
        args = tuple(a.detach().requires_grad_(i in leaves) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for i, a in enumerate(args))

        def fwd_bwd():
            y = forward(*args)
            return (y.detach(), *torch.autograd.grad(y, [args[i] for i in leaves], grad))

        out["fwd+bwd"] = fwd_bwd
    return out


def providers(reference: Callable, public: Callable, args: tuple, leaves: tuple[int, ...], grad) -> dict[str, dict[str, Callable]]:
    """reference: the pure-PyTorch function; compiled: it under torch.compile;
    fused: the public op with the Triton backend forced."""
    compiled = torch.compile(reference, dynamic=False)
    return {
        "reference": passes(reference, args, leaves, grad),
        "compiled": passes(compiled, args, leaves, grad),
        "fused": passes(with_backend("triton", public), args, leaves, grad),
    }


def check(case: Case, provider: str, pass_: str) -> None:
    """Once, before timing: the provider computes what the reference computes."""
    got = case.run[provider][pass_]()
    expected = case.run["reference"][pass_]()
    rtol, atol = TOLERANCE[case.dtype]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{case.op}/{case.shape}/{provider}/{pass_} output {i}: {m}")


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def timed(fn: Callable) -> Callable:
    """``fn`` followed by a device synchronize (what pytest-benchmark times)."""

    def call():
        fn()
        sync()

    return call


def measure(fn: Callable, warmup: int = 3, iters: int | None = None) -> float:
    """Median seconds per call: CUDA events on a GPU, perf_counter on the CPU."""
    iters = iters or (50 if ON_GPU else 3)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(benchmark, case: Case, provider: str, pass_: str) -> None:
    """The body of every pytest-benchmark test: check once, time, record GB/s."""
    check(case, provider, pass_)
    fn = timed(case.run[provider][pass_])
    benchmark.extra_info.update(op=case.op, shape=case.shape, dtype=str(case.dtype), min_bytes=case.bytes[pass_])
    benchmark.pedantic(fn, warmup_rounds=2 if ON_GPU else 1, rounds=20 if ON_GPU else 2, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test, nothing timed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = case.bytes[pass_] / median / 1e9 if median > 0 else None

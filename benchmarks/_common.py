"""Shared pieces of the op benchmarks: device choice, cases, equality check, timer.

Each ``bench_<op>.py`` describes its op as :class:`Case` objects (inputs, providers,
minimal bytes); its pytest-benchmark tests and ``ops_table.py`` both time those.

On a machine without CUDA the Triton kernels run through the interpreter, so this module
sets ``TRITON_INTERPRET=1`` before anything imports triton, and the cases use tiny
shapes (the numbers then say nothing about speed; the run proves the harness works).
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

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


# -- device time: many calls between one pair of events, inputs rotated past the L2 --------


class CudaTimer:
    """Times the current stream of ``device`` with one pair of CUDA events.

    ``hold(seconds)`` queues a GPU sleep of about that long first, so that the host can
    queue the timed calls while the GPU sleeps and the GPU then runs them back to back: the
    events measure the kernels, not the Python between them.
    """

    def __init__(self, device: torch.device | int | None = None):
        index = None if device is None else (device if isinstance(device, int) else torch.device(device).index)
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        self._start = None
        self._cycles_per_s = None

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def hold(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self._cycles_per_s is None:  # calibrate the sleep kernel once: cycles per second of this GPU
            with torch.cuda.device(self.device):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                torch.cuda._sleep(1_000_000)
                b.record()
                b.synchronize()
                self._cycles_per_s = 1_000_000 / max(a.elapsed_time(b) / 1e3, 1e-6)
        with torch.cuda.device(self.device):
            torch.cuda._sleep(int(min(seconds, 0.5) * self._cycles_per_s))

    def start(self) -> None:
        with torch.cuda.device(self.device):
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def stop(self) -> float:
        """Seconds on the device since ``start``."""
        with torch.cuda.device(self.device):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self._start.elapsed_time(end) / 1e3


class WallTimer:
    """The CPU's stand-in: the wall clock (the interpreter runs the kernels on the host)."""

    def sync(self) -> None:
        pass

    def hold(self, seconds: float) -> None:
        pass

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._t0


def default_timer():
    return CudaTimer() if ON_GPU else WallTimer()


def l2_bytes() -> int:
    """The current GPU's L2 cache in bytes (0 without CUDA)."""
    if not ON_GPU:
        return 0
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 0) or 64 * 2**20  # unknown: assume a large one


def input_sets(bytes_per_set: int, l2: int, most: int = 64) -> int:
    """How many independent input sets to rotate so that together they exceed twice the L2:
    a set's data is then evicted before its next call reads it (1 where there is no L2)."""
    if l2 <= 0:
        return 1
    return max(2, min(most, math.ceil(2 * l2 / max(1, bytes_per_set)) + 1))


@dataclass
class Timing:
    device_s: float  # per call: the device's time, calls back to back between one event pair (median over repeats)
    host_s: float  # per call: the host's time to issue a call (Python, dispatch, checks, launch), the GPU kept busy
    calls: int  # calls between the two events
    sets: int  # input sets rotated
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def time_calls(fns: Sequence[Callable], *, calls: int | None = None, repeats: int | None = None, warmup: int = 1,
               timer=None) -> Timing:  # fmt: skip
    """Device and host time per call of ``fns`` (one closure per input set, called in turn).

    Warm-up: every set ``warmup`` times (compiles, allocator), then a sync. Host time: ``calls``
    calls issued while the device sleeps (so nothing waits on it). Device time: a sleep long
    enough to cover issuing them, then one start event, ``calls`` calls rotating the sets, one
    end event; the median of ``repeats`` such windows, divided by ``calls``.
    """
    timer = timer or default_timer()
    calls = calls or (20 if ON_GPU else 2)
    repeats = repeats or (7 if ON_GPU else 1)
    n = len(fns)
    if n == 0:
        raise ValueError("time_calls: no input sets")
    for i in range(max(1, warmup) * n):
        fns[i % n]()
    timer.sync()
    host = []
    for _ in range(max(1, repeats // 2)):
        timer.hold(0.05)
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % n]()
        host.append((time.perf_counter() - t0) / calls)
        timer.sync()
    host_s = statistics.median(host)
    device = []
    for _ in range(repeats):
        timer.hold(1.5 * host_s * calls + 1e-3)
        timer.start()
        for i in range(calls):
            fns[i % n]()
        device.append(timer.stop() / calls)
    return Timing(statistics.median(device), host_s, calls, n, repeats)


def copy_peak_gbs(timer=None, nbytes: int = 2**30) -> float | None:
    """Measured device-to-device copy bandwidth (read + write GB/s): the ceiling of these ops."""
    if not ON_GPU:
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], calls=10, repeats=5, timer=timer)
    src = dst = None  # free both before empty_cache
    torch.cuda.empty_cache()
    return 2 * nbytes / t.device_s / 1e9

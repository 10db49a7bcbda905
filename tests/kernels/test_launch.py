"""Every Triton launcher runs on its tensors' device, and mask lengths never recompile a kernel.

* Triton launches on the *current* CUDA device; each launcher enters
  ``fastjepa.kernels._launch.on_device(<its tensors' device>)`` around its launches. Here
  a recording fake of the guard proves, launcher by launcher, that every kernel launch
  happens inside the guard for the tensors' device (an AST check finds every launch site,
  so a new launcher cannot slip past), and the guard's own logic is checked with fakes
  of ``torch.cuda``. The CUDA extension's launches sit behind a ``CUDAGuard`` of their own.
* Triton specialises integer arguments on ``== 1`` and divisibility by 16; the lengths and
  row counts that change from batch to batch are ``do_not_specialize``
  (``_launch.jit(dynamic=...)``). The interpreter compiles nothing, so here the attribute
  is checked for each kernel, and every launch of every op at several mask lengths is
  keyed as Triton's JIT keys a compile (one key per launch site);
  ``tests/kernels/test_launch_gpu.py`` counts compiles on a GPU.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
from pathlib import Path

import pytest
import torch

from fastjepa.ops._dispatch import kernels

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss", "sorted_predictor_tokens", "rope")
# per kernel: the arguments that vary with the masks of a batch (lengths, row counts,
# strides that are a multiple of a length but not of 16 elements)
DYNAMIC = {
    "_gather_tokens_fwd_kernel": {"K", "ROWS"},
    "_gather_tokens_bwd_kernel": {"K", "MK"},
    "_predictor_tokens_fwd_kernel": {"KC", "KT"},
    "_predictor_tokens_bwd_ctx_kernel": {"KC", "KT"},
    "_predictor_tokens_bwd_mask_kernel": {"KC", "KT"},
    "_target_tokens_kernel": {"KT", "ROWS"},
    "_smooth_l1_fwd_kernel": set(),  # n = rows·Kt·D: a multiple of 16 with D; its divisibility vectorises the loads
    "_smooth_l1_bwd_kernel": set(),
    "_sorted_tokens_fwd_kernel": {"KC", "L", "LK"},
    "_rows_gather_kernel": {"LS", "LM", "LO", "MAP_OFF", "SHIFT", "NVALID"},
    "_sorted_tokens_bwd_mask_kernel": {"KC", "L", "LK"},
    "_rope_kernel": {"N", "sib"},
}


def _mod(name):
    kernels()
    return importlib.import_module("fastjepa.kernels." + name)


# -- the guard --------------------------------------------------------------------------------


def test_on_device_guards_only_a_cuda_device_that_is_not_current(monkeypatch):
    launch = _mod("_launch")
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: entered.append(index) or contextlib.nullcontext())
    with launch.on_device(torch.device("cuda", 1)):
        pass
    assert entered == [1]
    for dev in (torch.device("cuda", 0), torch.device("cuda"), torch.device("cpu")):
        with launch.on_device(dev):
            pass
    assert entered == [1], "the current device, the bare 'cuda' and the CPU need no guard"


def _launch_sites(path: Path) -> list[tuple[int, bool]]:
    """(line, inside ``with on_device(...)``) of every ``<name>_kernel[grid](...)`` launch."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, guarded):
        if isinstance(node, ast.With) and any(
            isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "on_device" for i in node.items
        ):
            guarded = True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            v = node.func.value
            if isinstance(v, ast.Name) and v.id.endswith("_kernel"):
                out.append((node.lineno, guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return out


def test_every_launch_site_is_inside_the_device_guard():
    sites = {}
    for path in sorted((ROOT / "fastjepa" / "kernels").glob("*.py")):
        for line, guarded in _launch_sites(path):
            sites[f"{path.name}:{line}"] = guarded
    assert len(sites) >= 12, sites  # one per kernel at least
    assert all(sites.values()), [k for k, ok in sites.items() if not ok]


def test_every_cuda_extension_launch_follows_a_cuda_guard():
    """csrc/cuda: each host function that launches a kernel (``<<<``) sets a CUDAGuard for
    its tensors' device before its first launch (the extension's own device guard)."""
    launches = 0
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "<<<" not in line:
                continue
            launches += 1
            start = max(j for j in range(i + 1) if lines[j][:1].isalpha() and "(" in lines[j])  # the enclosing function
            body = "\n".join(lines[start:i])
            assert "CUDAGuard guard(" in body, f"{path.name}:{i + 1}: a launch without a CUDAGuard in its function"
    assert launches >= 3


def _small_calls():
    """(launcher module, call) for every launcher, at tiny shapes on the CPU."""
    from fastjepa.ops.rope import omega_table
    from fastjepa.ops.sorted_predictor_tokens import _sort

    g, p, t, s, sp, r = (_mod(m) for m in MODULES)
    B, N, D, K, Kt, M = 2, 6, 16, 3, 2, 2
    x = torch.randn(B, N, D)
    pos = torch.randn(1, N, D)
    idx = torch.randint(0, N, (M, B, K))
    idx_t = torch.randint(0, N, (M, B, Kt))
    ctx = torch.randn(M * B, K, D)
    mt = torch.randn(1, 1, D)
    order_args = _sort(idx.reshape(M * B, K), idx_t.reshape(M * B, Kt))  # positions, order, inverse
    positions, order, inverse = order_args
    L = K + Kt
    yield "gather_tokens_fwd", g, lambda: g.gather_tokens_fwd(x, idx, pos)
    yield "gather_tokens_bwd", g, lambda: g.gather_tokens_bwd(torch.randn(M * B, K, D), idx, N, x.dtype, True)
    yield "predictor_tokens_fwd", p, lambda: p.predictor_tokens_fwd(ctx[:B], idx[:1], idx_t, pos, mt)
    yield "predictor_tokens_bwd", p, lambda: p.predictor_tokens_bwd(torch.randn(M * B, L, D), idx[:1], idx_t, x.dtype, N, True)
    yield "target_tokens_fwd", t, lambda: t.target_tokens_fwd(x, idx_t, 2)
    yield "smooth_l1_loss_fwd", s, lambda: s.smooth_l1_loss_fwd(ctx, ctx + 1)
    yield "smooth_l1_loss_bwd", s, lambda: s.smooth_l1_loss_bwd(torch.ones(()), ctx, ctx + 1, True)
    yield "sorted_predictor_tokens_fwd", sp, lambda: sp.sorted_predictor_tokens_fwd(ctx, order, positions, pos, mt, False, 0)
    yield "sorted_predictor_tokens_bwd", sp, lambda: sp.sorted_predictor_tokens_bwd(
        torch.randn(M * B, L, D), order, inverse, positions, K, False, N, x.dtype, True
    )
    yield "sorted_predictor_take_fwd", sp, lambda: sp.sorted_predictor_take_fwd(torch.randn(M * B, L, D), inverse, K, False)
    yield "sorted_predictor_take_bwd", sp, lambda: sp.sorted_predictor_take_bwd(torch.randn(M * B, Kt, D), order, K, False, x.dtype)
    q = torch.randn(B, 2, N, 12)
    yield "rope_fwd", r, lambda: r.rope_fwd(q, q.clone(), None, omega_table(2, q.dtype, q.device), 3, 4, 2, False)


@pytest.mark.parametrize("name", [c[0] for c in _small_calls()])
def test_each_launcher_launches_inside_the_guard_for_its_tensors_device(monkeypatch, name):
    from triton.runtime.interpreter import InterpretedFunction

    _, module, call = next(c for c in _small_calls() if c[0] == name)
    active: list[torch.device] = []  # the guard's device while inside it
    launches: list[tuple[str, torch.device | None]] = []

    @contextlib.contextmanager
    def recording_guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches.append((self.__name__, active[-1] if active else None))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(module, "on_device", recording_guard)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    call()
    assert launches, f"{name} launched no kernel"
    assert all(dev == torch.device("cpu") for _, dev in launches), launches


# -- no specialisation on batch-dependent lengths ---------------------------------------------


def test_batch_dependent_lengths_are_not_specialised():
    launch = _mod("_launch")
    seen = {}
    for m in MODULES:
        mod = _mod(m)
        for attr in dir(mod):
            if attr.endswith("_kernel"):
                seen[attr] = set(launch.dynamic_args(getattr(mod, attr)))
    assert set(seen) == set(DYNAMIC), sorted(set(seen) ^ set(DYNAMIC))
    for name, want in DYNAMIC.items():
        assert seen[name] == want, (name, seen[name], want)
        assert want <= set(getattr(_mod(next(m for m in MODULES if hasattr(_mod(m), name))), name).arg_names), name


def _specialisation(kernel, args: tuple, kwargs: dict) -> tuple:
    """What Triton's JIT keys a compile on, as far as the arguments go: each integer not in
    ``do_not_specialize`` by ``== 1`` and divisibility by 16, each tensor by dtype, and the
    constexprs and launch options."""
    launch = _mod("_launch")
    dynamic = set(launch.dynamic_args(kernel))
    key = []
    for name, v in zip(kernel.arg_names, args):
        if isinstance(v, torch.Tensor):
            key.append((name, v.dtype))
        elif isinstance(v, int) and not isinstance(v, bool) and name not in dynamic:
            key.append((name, v == 1, v % 16 == 0))
    return (*key, *sorted(kwargs.items()))


def test_mask_lengths_leave_every_kernels_specialisation_unchanged(monkeypatch):
    """The CPU stand-in for the GPU's compile counter (``tests/kernels/test_launch_gpu.py``): every
    op, forward and backward, with the GPU's tile choices, at model-like widths and mask
    lengths on both sides of multiples of 16 — each launch site keeps one specialisation
    key, so a GPU compiles each kernel once."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastjepa import ops

    from .test_launch_gpu import _calls, _fwd_bwd

    monkeypatch.setattr(_mod("_tiles"), "interpreting", lambda: False)  # the GPU's tiles
    keys: dict[str, set] = {}
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        site = f"{self.__name__} {kwargs.get('HEAD_COPY', '')}{kwargs.get('BACKWARD', '')}"  # two launch sites each
        keys.setdefault(site, set()).add(_specialisation(self, args, kwargs))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    shape = dict(N=100, D=256, P=384, head_dim=64, grid=(10, 10))
    with ops.use_backend("triton"):
        for kc, kt in ((37, 35), (48, 48), (49, 33), (64, 47)):
            for fused, _, inputs in _calls(torch.device("cpu"), Kc=kc, Kt=kt, **shape).values():
                _fwd_bwd(fused, inputs)
    assert {site.split()[0] for site in keys} == set(DYNAMIC)
    changed = {site: len(k) for site, k in keys.items() if len(k) != 1}
    assert not changed, changed

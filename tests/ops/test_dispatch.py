"""Backend selection: which path each op takes, forced backends, float64, the cpp branch."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import fastjepa.ops as ops
from fastjepa.ops import _dispatch
from fastjepa.ops._dispatch import available, current_backend, reread_environment, select, use_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def small_inputs():
    B, N, D, P, Kc, Kt = 2, 9, 16, 8, 5, 3
    x = torch.randn(B, N, D)
    ctx = torch.randn(2 * B, Kc, P)
    masks_x = [torch.randint(0, N, (B, Kc)) for _ in range(2)]
    masks = [torch.randint(0, N, (B, Kt)) for _ in range(4)]
    return dict(x=x, pos=torch.randn(1, N, D), ctx=ctx, ppos=torch.randn(1, N, P), mt=torch.randn(1, 1, P),
                masks_x=masks_x, masks=masks)


def call_all(t, dtype=None):
    """Run the four ops once; ``dtype`` casts every float input."""
    c = {k: (v.to(dtype) if dtype and isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    out = [
        ops.gather_tokens(c["x"], c["masks_x"], c["pos"]),
        ops.predictor_tokens(c["ctx"], c["masks_x"], c["masks"], c["ppos"], c["mt"]),
        ops.target_tokens(c["x"], c["masks"], 2),
    ]
    out.append(ops.smooth_l1_loss(out[1], torch.zeros_like(out[1])))
    return out


def test_availability_is_data():
    avail = available()
    assert set(avail) == {"reference", "triton", "cpp"}
    assert avail["reference"].ok
    assert avail["triton"].ok, avail["triton"].reason  # tests install triton
    for a in avail.values():
        assert isinstance(a.reason, str) and a.reason


def test_auto_picks_triton_for_cuda_and_reference_or_cpp_for_cpu():
    with use_backend("auto"):
        assert select("gather_tokens", CUDA, torch.float32) == "triton"
        assert select("gather_tokens", CUDA, torch.bfloat16) == "triton"
        cpu = "cpp" if available()["cpp"] else "reference"
        assert select("gather_tokens", CPU, torch.float32) == cpu
        assert select("predictor_tokens", CPU, torch.float32, cpp_op=False) == "reference"


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_auto_sends_float64_to_the_reference(device):
    with use_backend("auto"):
        for op in ("gather_tokens", "predictor_tokens", "target_tokens"):
            assert select(op, device, torch.float64) == "reference"


def test_forced_triton_runs_cpu_tensors_under_the_interpreter(monkeypatch):
    assert _dispatch.triton_interpret()  # set by conftest
    with use_backend("triton"):
        assert select("gather_tokens", CPU, torch.float32) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="need CUDA"):
        select("gather_tokens", CPU, torch.float32)


def test_forced_triton_with_float64_raises():
    t = small_inputs()
    with use_backend("triton"), pytest.raises(RuntimeError, match="float64 is not one of the fused dtypes"):
        ops.gather_tokens(t["x"].double(), t["masks_x"], t["pos"].double())
    with use_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        ops.gather_tokens(t["x"], t["masks_x"], t["pos"].double())  # promotes to float64


def test_env_variable_and_context_manager(env):
    env.setenv("FASTJEPA_BACKEND", "triton")
    assert current_backend() == "triton"
    assert select("target_tokens", CPU, torch.float32) == "triton"
    with use_backend("reference"):
        assert current_backend() == "reference"
        assert select("target_tokens", CPU, torch.float32) == "reference"
    assert current_backend() == "triton"
    env.mp.setenv("FASTJEPA_BACKEND", "reference")  # read once per process: no effect until re-read
    assert current_backend() == "triton"
    reread_environment()
    assert current_backend() == "reference"
    env.setenv("FASTJEPA_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTJEPA_BACKEND='fast' is not a fastjepa backend"):
        current_backend()
    with pytest.raises(ValueError, match="FASTJEPA_BACKEND='fast'"):
        current_backend()  # a bad value raises at every call


def test_each_backend_takes_its_path(monkeypatch):
    """reference never launches a kernel; triton launches one per op; float64 under auto
    runs the reference even where auto would pick triton."""
    kernels = _dispatch.kernels()
    launched = []
    for name in ("gather_tokens_fwd", "predictor_tokens_fwd", "target_tokens_fwd", "smooth_l1_loss_fwd"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: launched.append(_name) or _real(*a, **k))
    t = small_inputs()
    with use_backend("reference"):
        ref = call_all(t)
    assert launched == []
    with use_backend("triton"):
        fused = call_all(t)
    assert sorted(launched) == ["gather_tokens_fwd", "predictor_tokens_fwd", "smooth_l1_loss_fwd", "target_tokens_fwd"]
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b)
    launched.clear()
    monkeypatch.setattr(_dispatch, "_why_not", lambda backend, device, dtype: None if dtype != torch.float64 else "float64")
    with use_backend("auto"):
        call_all(t, torch.float64)
    assert launched == []


def test_cpp_branch_calls_the_extension_wrappers(monkeypatch):
    """With the extension selected, each op calls fastjepa.ops.cpp with stacked (M, B, K) indices."""
    t = small_inputs()
    seen = {}

    def gather(x, idx, pos):
        seen["gather"] = idx.shape
        return ops.gather_tokens_reference(x, list(idx), pos)

    def predictor(ctx, idx_x, idx, pos, mask_token):
        seen["predictor"] = (idx_x.shape, idx.shape)
        return ops.predictor_tokens_reference(ctx, list(idx_x), list(idx), pos, mask_token)

    def target(h, idx, nenc):
        seen["target"] = (idx.shape, nenc)
        return ops.target_tokens_reference(h, list(idx), nenc)

    fake = types.SimpleNamespace(gather_tokens=gather, predictor_tokens=predictor, target_tokens=target)
    monkeypatch.setitem(sys.modules, "fastjepa.ops.cpp", fake)
    monkeypatch.setattr(ops, "cpp", fake, raising=False)
    monkeypatch.setattr(_dispatch, "_why_not", lambda backend, device, dtype: None)
    with use_backend("cpp"):
        out = call_all(t)
    with use_backend("reference"):
        ref = call_all(t)
    assert seen == {"gather": (2, 2, 5), "predictor": ((2, 2, 5), (4, 2, 3)), "target": ((4, 2, 3), 2)}
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_masks_on_another_device_are_rejected():
    x = torch.randn(2, 9, 16, device="meta")
    with pytest.raises(ValueError, match=r"masks\[0\]: on meta"):
        ops.gather_tokens(torch.randn(2, 9, 16), [torch.zeros(2, 3, dtype=torch.long, device="meta")])
    with pytest.raises(ValueError, match="pos_embed: on meta"):
        ops.gather_tokens(torch.randn(2, 9, 16), [torch.zeros(2, 3, dtype=torch.long)], x[:1])


def test_loss_stays_on_pytorch_unless_triton_is_forced(monkeypatch):
    """Fusing the loss saves no bytes (docs/ops.md, "Is the loss fused?"): auto keeps ATen's kernels even where
    it picks Triton for the other ops; a forced ``triton`` runs the fused kernels."""
    kernels = _dispatch.kernels()
    real, launched = kernels.smooth_l1_loss_fwd, []
    monkeypatch.setattr(kernels, "smooth_l1_loss_fwd", lambda *a: launched.append(1) or real(*a))
    loss_module = sys.modules["fastjepa.ops.smooth_l1_loss"]
    monkeypatch.setattr(loss_module, "select", lambda *a, **k: "triton")  # what auto picks for CUDA tensors
    z, h = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    with use_backend("auto"):
        auto = ops.smooth_l1_loss(z, h)
    assert launched == []
    with use_backend("triton"):
        forced = ops.smooth_l1_loss(z, h)
    assert launched == [1]
    torch.testing.assert_close(auto, forced)


def test_forced_cpp_on_cuda_only_for_ops_with_a_cuda_kernel(monkeypatch):
    monkeypatch.setattr(_dispatch, "_why_not", lambda backend, device, dtype: None)  # as if a CUDA build were loaded
    with use_backend("cpp"):
        assert select("gather_tokens", CUDA, torch.float32) == "cpp"
        for op in ("predictor_tokens", "target_tokens"):
            with pytest.raises(RuntimeError, match="CUDA kernels cover only gather_tokens"):
                select(op, CUDA, torch.float32)
        assert select("target_tokens", CPU, torch.float32) == "cpp"


def test_triton_interpreter_known_broken_combination_is_reported(monkeypatch):
    """Triton < 3.7's interpreter + NumPy >= 2.4 fails inside every kernel with a loop;
    it is reported as an unavailable backend with what to install, not left to crash."""
    import numpy as np

    from fastjepa.ops import _dispatch

    try:
        int(np.zeros(1, dtype=np.int64))
        numpy_refuses = False
    except TypeError:
        numpy_refuses = True
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = _dispatch._interpreter_broken("3.6.0")
    assert (why is not None) == numpy_refuses
    if why is not None:
        assert "3.6.0" in why and "triton>=3.7" in why
    assert _dispatch._interpreter_broken("3.7.1") is None
    assert _dispatch._interpreter_broken("3.10.0") is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch._interpreter_broken("3.6.0") is None  # compiled kernels are fine


def test_missing_triton_is_data_not_an_import_error():
    """Without triton the package imports, available() says why, auto runs, and asking for
    triton names the reason (in a fresh interpreter where `import triton` fails)."""
    code = """
import sys
sys.modules["triton"] = None  # import triton -> ImportError, as when it is not installed
import torch
from fastjepa import ops
from fastjepa.ops import available, gather_tokens, use_backend
a = available()["triton"]
assert not a and "triton is not installed" in a.reason, a
x = torch.randn(2, 5, 8); m = [torch.randint(0, 5, (2, 3))]
out = gather_tokens(x, m)  # auto: the reference (or the C++ extension) on the CPU
try:
    with use_backend("triton"):
        gather_tokens(x, m)
    raise SystemExit("forced triton without triton did not raise")
except RuntimeError as exc:
    assert "triton is not installed" in str(exc), exc
print("ok")
"""
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
def test_a_tensor_is_a_one_mask_list_and_index_dtypes_may_mix(backend):
    """Every op takes a (B, K) tensor where it takes a list of one, and a list mixing int32
    and int64 masks, with the same result."""
    B, N, D, P = 2, 12, 16, 8
    x, h, ctx = torch.randn(B, N, D), torch.randn(B, N, D), torch.randn(B, 4, P)
    pos, pos_p, mt = torch.randn(1, N, D), torch.randn(1, N, P), torch.randn(1, 1, P)
    m1, m2 = torch.randint(0, N, (B, 4)), torch.randint(0, N, (B, 3))
    mixed = [torch.randint(0, N, (B, 3), dtype=torch.int32), torch.randint(0, N, (B, 3))]
    with use_backend(backend):
        pairs = [
            (ops.gather_tokens(x, m1, pos), ops.gather_tokens(x, [m1], pos)),
            (ops.target_tokens(h, m2, 1), ops.target_tokens(h, [m2], 1)),
            (ops.predictor_tokens(ctx, m1, m2, pos_p, mt), ops.predictor_tokens(ctx, [m1], [m2], pos_p, mt)),
            (ops.gather_tokens(x, mixed, pos), ops.gather_tokens(x, [m.long() for m in mixed], pos)),
            (ops.target_tokens(h, mixed, 1), ops.target_tokens(h, [m.long() for m in mixed], 1)),
        ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with use_backend("reference"):
        torch.testing.assert_close(pairs[2][0], ops.predictor_tokens(ctx, [m1], [m2], pos_p, mt))


_B, _N, _D = 2, 9, 16
_BAD_INPUTS = {
    "pos not a tensor": (lambda x, m, p: ops.gather_tokens(x, m, [1.0]), ValueError, r"pos_embed: expected a tensor, got list"),
    "pos too short": (lambda x, m, p: ops.gather_tokens(x, m, p[:, :7]), ValueError, r"pos_embed: expected shape \(1, 9, 16\), got \(1, 7, 16\)"),
    "mask not a tensor": (lambda x, m, p: ops.gather_tokens(x, [m[0], [1, 2]], p), ValueError, r"masks\[1\]: expected a tensor, got list"),
    "integer x": (lambda x, m, p: ops.gather_tokens(x.long(), m, p), ValueError, r"x: expected a floating-point tensor, got torch.int64"),
    "3-D mask": (lambda x, m, p: ops.gather_tokens(x, [m[0][..., None]], p), ValueError, r"masks\[0\]: expected shape \(B, K\), got \(2, 3, 1\)"),
    "ragged masks": (lambda x, m, p: ops.gather_tokens(x, [m[0], m[0][:, :2]], p), ValueError, r"masks\[1\]: shape \(2, 2\) differs from masks\[0\] \(2, 3\)"),
    "integer h": (lambda x, m, p: ops.target_tokens(x.long(), m, 1), ValueError, r"h: expected a floating-point tensor, got torch.int64"),
    "int16 masks": (lambda x, m, p: ops.target_tokens(x, [m[0].short()], 1), ValueError, r"masks_pred\[0\]: expected int32 or int64 indices, got torch.int16"),
    "nenc 2.0": (lambda x, m, p: ops.target_tokens(x, m, 2.0), ValueError, r"nenc: expected a positive int, got 2.0"),
    "nenc 0": (lambda x, m, p: ops.target_tokens(x, m, 0), ValueError, r"nenc: expected a positive int, got 0"),
    "target index N": (lambda x, m, p: ops.target_tokens(x, [m[0].fill_(9)], 1), IndexError,
                       r"masks_pred\[0\]: index 9 is out of range for 9 tokens \(expected 0 <= index < 9\)"),
    "loss shapes": (lambda x, m, p: ops.smooth_l1_loss(x, x[:, :4]), ValueError,
                    r"smooth_l1_loss: z has shape \(2, 9, 16\), expected the shape of h \(2, 4, 16\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(_BAD_INPUTS))
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_inputs_name_argument_value_and_expectation(case, backend):
    fn, exc, match = _BAD_INPUTS[case]
    x, m, p = torch.randn(_B, _N, _D), [torch.randint(0, _N, (_B, 3))], torch.randn(1, _N, _D)
    with use_backend(backend), pytest.raises(exc, match=match):
        fn(x, m, p)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"use_backend='bogus' is not a fastjepa backend; expected one of auto, reference, triton, cpp"):
        with use_backend("bogus"):
            pass


@pytest.mark.parametrize("backend", ["triton", "auto", "reference"])
def test_public_ops_compile_in_one_graph(backend):
    """torch.compile(fullgraph=True) of code calling the public ops: one graph, the same
    values and gradients as eager. (Backend selection runs once at trace time; it used to
    break the graph on its availability checks, which import modules.)"""
    B, N, D, P = 2, 9, 16, 8
    x, ctx, mt = (torch.randn(*s, requires_grad=True) for s in ((B, N, D), (B, 4, P), (1, 1, P)))
    pos, pos_p = torch.randn(1, N, D), torch.randn(1, N, P)
    m1, m2 = torch.randint(0, N, (B, 4)), torch.randint(0, N, (B, 3))

    def f(x, ctx, mt, m1, m2):
        a = ops.gather_tokens(x, [m1], pos).sin().sum()
        b = ops.predictor_tokens(ctx, [m1], [m2], pos_p, mt).cos().sum()
        return a + b + ops.smooth_l1_loss(ops.gather_tokens(x, [m2], None), ops.target_tokens(x.detach(), [m2], 1))

    torch._dynamo.reset()
    with use_backend(backend):
        eager = f(x, ctx, mt, m1, m2)
        g_eager = torch.autograd.grad(eager, (x, ctx, mt))
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, ctx, mt, m1, m2)
        g_compiled = torch.autograd.grad(compiled, (x, ctx, mt))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()

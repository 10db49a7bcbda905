"""The CUDA part of the C++ extension (``csrc/cuda/gather_tokens.cu``).

* built for real against a CUDA torch (``benchmarks/cuda_build_check.sh``: nvcc, no spills,
  sm_80 + sm_90 machine code + sm_90 PTX, loads, its CPU ops agree) where one is installed;
* on a GPU, the kernels agree with the reference and treat an out-of-range index as the
  Triton kernels do: the row comes out NaN and its gradient is dropped, not clamped;
* the default architecture list carries ``+PTX`` (GPUs newer than sm_90 JIT-compile it).
"""

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastjepa.ops import available

ROOT = Path(__file__).resolve().parents[2]


def _cuda_home() -> str | None:
    for c in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if c and os.access(os.path.join(c, "bin", "nvcc"), os.X_OK):
            return c
    return None


def test_default_arch_list_has_ptx_for_newer_gpus():
    tree = ast.parse((ROOT / "setup.py").read_text())
    value = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DEFAULT_CUDA_ARCHS")
    archs = value.split(";")
    assert "8.0" in archs and archs[-1] == "9.0+PTX", value


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None, reason=f"torch {torch.__version__} is not a CUDA build (the build check needs one)")
@pytest.mark.skipif(_cuda_home() is None, reason="no CUDA toolkit (nvcc under $CUDA_HOME or /usr/local/cuda)")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_cuda_extension_builds_against_a_cuda_torch(tmp_path):
    """FASTJEPA_CUDA_BUILD_DIR: a build folder to reuse (ninja rebuilds only what changed;
    a fresh build of both architectures takes minutes on a few cores)."""
    import sys

    build = os.environ.get("FASTJEPA_CUDA_BUILD_DIR") or str(tmp_path / "build")
    env = dict(os.environ, PYTHON=sys.executable, CUDA_HOME=_cuda_home(), MAX_JOBS=os.environ.get("MAX_JOBS", "1"))
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "cuda_build_check.sh"), build], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert r.returncode == 0 and "CUDA BUILD OK" in r.stdout, (r.stdout + r.stderr)[-4000:]


def _cuda_ext_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not available()["cpp"]:
        return f"the extension is not built: {available()['cpp'].reason}"
    import fastjepa._C as ext

    return None if ext.WITH_CUDA else "the extension was built without CUDA"


@pytest.mark.gpu
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference_and_drops_out_of_range_rows(idx_dtype, dtype):
    why = _cuda_ext_reason()
    if why:
        pytest.skip(why)
    import fastjepa._C  # noqa: F401 — registers torch.ops.fastjepa

    ops = torch.ops.fastjepa
    dev = torch.device("cuda")
    M, B, N, K, D = 2, 3, 17, 23, 200  # K > N: repeated indices; D not a power of two
    x = torch.randn(B, N, D, device=dev, dtype=dtype)
    pos = torch.randn(1, N, D, device=dev, dtype=dtype)
    idx = torch.randint(0, N, (M, B, K), device=dev, dtype=idx_dtype)
    bad = {(0, 1, 3): -1, (1, 2, 0): N, (1, 0, 22): N + 100}
    for where, value in bad.items():
        idx[where] = value
    ok = (idx >= 0) & (idx < N)
    out = ops.gather_tokens_fwd(x, idx, pos).view(M, B, K, D)
    ref = torch.stack([(x[b].float() + pos[0].float())[idx[m, b].clamp(0, N - 1).long()] for m in range(M) for b in range(B)])
    ref = ref.view(M, B, K, D)
    assert torch.isnan(out[~ok].float()).all(), "an out-of-range row is not NaN"
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out[ok].float(), ref[ok], **tol)

    grad = torch.randn(M * B, K, D, device=dev, dtype=dtype)
    gx, gpos = ops.gather_tokens_bwd(grad, idx, N, dtype, True)
    g = grad.view(M, B, K, D).float() * ok[..., None]  # the bad rows' gradient is dropped
    want = torch.zeros(B, N, D, device=dev)
    for m in range(M):
        for b in range(B):
            want[b].index_add_(0, idx[m, b].clamp(0, N - 1).long(), g[m, b])
    assert torch.isfinite(gx.float()).all()
    torch.testing.assert_close(gx.float(), want, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)))
    torch.testing.assert_close(gpos, want.sum(0), rtol=1e-4, atol=1e-4)  # fp32 sums of the same values

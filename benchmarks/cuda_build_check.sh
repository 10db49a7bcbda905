#!/usr/bin/env bash
# Build fastjepa._C as a CUDAExtension against a CUDA build of torch — no GPU needed — and
# check what came out. For developers; tests/ops/test_cuda_ext.py runs it where a CUDA torch is.
#
#   PYTHON=/path/to/cuda-venv/bin/python bash benchmarks/cuda_build_check.sh [BUILD_DIR]
#
# Environment: PYTHON (default python: its torch must be a CUDA build), CUDA_HOME (default
# /usr/local/cuda: the toolkit's own folder; torch would otherwise derive it from the nvcc on
# PATH, and /usr/local/bin/nvcc gives /usr/local, which has no libcudart: the link fails),
# TORCH_CUDA_ARCH_LIST (default setup.py's "8.0;9.0+PTX"), MAX_JOBS (default 1).
#
# The build goes to BUILD_DIR (default a temporary folder), never into fastjepa/ (whose
# in-place _C may belong to another torch). Then it checks: every nvcc/ptxas pass ran
# without register spills (ptxas -v); the .so holds sm_80 and sm_90 machine code and sm_90
# PTX (cuobjdump); it loads into the CUDA torch, registers gather_tokens' CUDA kernels
# and WITH_CUDA, and its CPU ops agree with the pure-PyTorch reference. Prints "CUDA BUILD OK".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-1}"
BUILD="${1:-$(mktemp -d)}"
mkdir -p "$BUILD"
LOG="$BUILD/build.log"

die() { echo "CUDA BUILD FAILED: $*" >&2; exit 1; }

"$PY" - <<'EOF' || die "$PY has no CUDA build of torch"
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
print(f"torch {torch.__version__}, built with CUDA {torch.version.cuda}")
EOF
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc at CUDA_HOME=$CUDA_HOME (set CUDA_HOME to the CUDA toolkit's folder)"
ls "$CUDA_HOME"/lib64/libcudart.so* >/dev/null 2>&1 || die "no libcudart under $CUDA_HOME/lib64 (CUDA_HOME=$CUDA_HOME is not a toolkit folder)"
"$CUDA_HOME/bin/nvcc" --version | tail -1

echo "building into $BUILD (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-setup.py default}); log: $LOG"
t0=$SECONDS
# -Xptxas -v: ptxas reports registers and spills of every kernel into the log
if ! NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas -v" nice "$PY" setup.py -q build_ext \
        --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp" >"$LOG" 2>&1; then
    grep -E "error|Error" "$LOG" | head -40 >&2 || true
    tail -40 "$LOG" >&2
    die "setup.py build_ext failed (full log: $LOG)"
fi
echo "built in $((SECONDS - t0)) s"
SO="$(ls "$BUILD"/lib/fastjepa/_C*.so)"

# ptxas -v lines: "ptxas info    : Used 32 registers, ..., 0 bytes spill stores, 0 bytes spill loads";
# kept in $BUILD/ptxas.log, so that a rebuild in the same folder with nothing to compile
# (ninja is incremental) still checks the report of the objects it keeps
PTXAS_LOG="$BUILD/ptxas.log"
if grep -q "bytes spill stores" "$LOG"; then grep -E "^ptxas info|bytes spill" "$LOG" >"$PTXAS_LOG"; fi
n_kern=$(grep -c "bytes spill stores" "$PTXAS_LOG" 2>/dev/null || true)
[ "${n_kern:-0}" -gt 0 ] || die "no ptxas -v report in the log: were the .cu files compiled?"
if grep -E "bytes spill (stores|loads)" "$PTXAS_LOG" | grep -v " 0 bytes spill stores, 0 bytes spill loads" >/dev/null; then
    grep -B2 -E "[1-9][0-9]* bytes spill" "$PTXAS_LOG" >&2
    die "register spills in the CUDA kernels"
fi
echo "ptxas: $n_kern kernel compilations, no spills"

CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
[ -x "$CUOBJDUMP" ] || CUOBJDUMP="$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
if [ -x "$CUOBJDUMP" ]; then
    elf="$("$CUOBJDUMP" --list-elf "$SO")"
    ptx="$("$CUOBJDUMP" --list-ptx "$SO")"
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # the default list: check it is what got built
        grep -q "sm_80" <<<"$elf" || die "no sm_80 machine code in $SO: $elf"
        grep -q "sm_90" <<<"$elf" || die "no sm_90 machine code in $SO: $elf"
        grep -q "sm_90" <<<"$ptx" || die "no sm_90 PTX in $SO (+PTX): $ptx"
    fi
    echo "cuobjdump: $(grep -o 'sm_[0-9a-z]*' <<<"$elf" | sort -u | tr '\n' ' ')machine code; $(grep -o 'sm_[0-9a-z]*' <<<"$ptx" | sort -u | tr '\n' ' ')PTX"
else
    echo "cuobjdump not found (neither $CUDA_HOME/bin nor Triton's): architectures not checked"
fi

PYTHONPATH="$PWD" TRITON_INTERPRET=1 "$PY" - "$SO" <<'EOF' || die "the built extension does not load or compute"
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("fastjepa._C", sys.argv[1])
import fastjepa  # the package from this checkout; its _C replaced by the fresh build
ext = importlib.util.module_from_spec(spec)
sys.modules["fastjepa._C"] = ext
spec.loader.exec_module(ext)
assert ext.WITH_CUDA is True, "built without WITH_CUDA"
for op in ("gather_tokens_fwd", "gather_tokens_bwd"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastjepa::{op}", "CUDA"), f"{op}: no CUDA kernel registered"
from fastjepa.ops import gather_tokens_reference, use_backend, gather_tokens
x, pos = torch.randn(2, 9, 20, requires_grad=True), torch.randn(1, 9, 20)
masks = [torch.randint(0, 9, (2, 5)) for _ in range(2)]
with use_backend("cpp"):
    out = gather_tokens(x, masks, pos)
torch.testing.assert_close(out, gather_tokens_reference(x, masks, pos))
print("loaded:", ext.build_info())
EOF
echo "CUDA BUILD OK ($SO)"

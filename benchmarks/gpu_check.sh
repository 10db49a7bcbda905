#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU tests, the op table, the train-step table.
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh            # from the repository root
#
# Offline (installs nothing from a registry). Uses the machine's own torch/Triton. Tries to
# build the C++/CUDA extension in place and carries on without it if that fails. Each part
# is time-boxed with `timeout`; the whole run stays near 8 minutes (a dry run on a CPU
# machine, GPU_CHECK_BUILD=0, takes ~2 minutes and proves the script). Results go to $OUT
# (the device tool's folder) when set, else benchmarks/results/; copy them into
# benchmarks/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1 TRITON_INTERPRET="${TRITON_INTERPRET:-0}"  # compiled kernels (tests/conftest.py would default to the interpreter); a CPU dry run sets 1
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
STAMP="$(date -u +%Y-%m-%d)"
SUMMARY="$DEST/gpu_check.md"
T0=$SECONDS

part() {  # part NAME SECONDS LOG COMMAND... — run one time-boxed part, record its exit status
    local name=$1 limit=$2 log=$3
    shift 3
    local t=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local what="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT"
    [ $rc -ne 0 ] && [ "$what" = ok ] && what="exit $rc"
    echo "| $name | $what | $((SECONDS - t)) s |" >>"$SUMMARY"
    tail -n 25 "$log"
}

{
    echo "# GPU check, $STAMP"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/GPU: /'
    python -c "import torch, triton; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton.__version__}')" 2>&1
    python -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed"
    python -c "import xformers; print('xformers', xformers.__version__)" 2>/dev/null || echo "xformers: not installed"
    echo
    echo "| part | result | time |"
    echo "|---|---|---:|"
} >"$SUMMARY"
cat "$SUMMARY"

# 1. the optional extension (the fused ops fall back to Triton / the reference without it);
#    GPU_CHECK_BUILD=0 skips it (a dry run of this script on a machine whose install is shared)
if [ "${GPU_CHECK_BUILD:-1}" = 1 ]; then
    part "build extension" 75 "$DEST/build.log" python -m pip install --no-deps --no-build-isolation --no-index -e .
fi

# 2. every GPU-marked test
part "pytest -m gpu" 110 "$DEST/pytest_gpu.log" python -m pytest -q -m gpu tests -p no:cacheprovider

# 3. the fused-op table (another engineer's script; run when present)
if [ -f benchmarks/ops_table.py ]; then
    part "ops_table (bf16)" 60 "$DEST/ops_table.log" python benchmarks/ops_table.py --dtype bf16 --out "$DEST/ops_table_gpu.json"
fi

# 3b. the image pipeline: CPU paths per core and on all cores, and data.decode=gpu (nvjpeg;
#     "unavailable" with the reason where torchvision cannot be imported)
part "bench_data (cpu + gpu decode)" 75 "$DEST/bench_data.log" \
    python benchmarks/bench_data.py --gpu --files 32 --rounds 3 --seconds 2 --out "$DEST" --stem "gpu-$STAMP-data"

# 4. the train-step table: ViT-B/16, ViT-L/16, ViT-H/14, fastjepa vs reference, then the largest
#    ViT-H/14 batch per path. Whatever remains of ~8 minutes, at least 3.
left=$((480 - (SECONDS - T0)))
[ $left -lt 180 ] && left=180
cap=$(((left - 150) / 2))
[ $cap -lt 30 ] && cap=30
part "train_step_table" "$left" "$DEST/train_step.log" \
    python benchmarks/train_step_table.py --out "$DEST" --name "gpu-$STAMP-train_step" --max-batch --time-cap "$cap"

{
    echo
    echo "Total: $((SECONDS - T0)) s"
    if [ -f "$DEST/gpu-$STAMP-train_step.md" ]; then
        echo
        echo "## Train step"
        echo
        cat "$DEST/gpu-$STAMP-train_step.md"
    fi
} >>"$SUMMARY"
echo
cat "$SUMMARY"

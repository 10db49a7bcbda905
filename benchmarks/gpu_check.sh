#!/usr/bin/env bash
# One call on a lent GPU machine: preflight, the CUDA extension, the GPU tests, the op table,
# the train-step table with MFU, the data-pipeline benchmark (when present).
#
#   bash benchmarks/gpu_check.sh                 # from anywhere; results in $OUT, else benchmarks/results/gpu_check/
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh # a CPU dry run: tiny sizes, no build (tests/test_benchmarks.py)
#
# Offline: installs nothing, uses the machine's own torch and Triton. The whole run stays under
# 8 minutes (each part is time-boxed; the train-step table gets what is left), so a rerun fits
# in one lease. What comes back fits the device tool's limits (at most 8 files of at most
# 16 MiB, no folders): in $OUT
#   gpu_check.md     the summary: machine, preflight, one row per part (ok / exit N / TIMED OUT),
#                    whether the CUDA kernel was built and tested, the tables
#   logs.tar.gz      every part's full log (re-packed after each part)
#   ops_table.json   the fused-op table (rewritten after every op)
#   train_step.json, train_step.md   the training-step table (rewritten after every model)
#   data.json        the data-pipeline benchmark, when benchmarks/bench_data.py exists
# Each part writes as it goes: a part cut short by its time box loses only its unfinished row.
#
# Knobs: GPU_CHECK_BUILD=0 (skip the extension build), GPU_CHECK_COMPILED=1 (add the
# torch.compile'd reference to the op table: cold inductor compiles cost minutes),
# GPU_CHECK_BUDGET (seconds for the whole run, default 460), CUDA_HOME.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
DRY="${GPU_CHECK_DRY:-0}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET="${TRITON_INTERPRET:-0}"  # compiled kernels (tests/conftest.py defaults to the interpreter)
[ "$DRY" = 1 ] && export TRITON_INTERPRET=1
DEST="${OUT:-$REPO/benchmarks/results/gpu_check}"
mkdir -p "$DEST"
WORK="$(mktemp -d)"
LOGS="$WORK/logs"  # full logs live here and travel as one tar.gz
mkdir -p "$LOGS"
# the GPU machine has no mlxtend, flash-attn or xformers: a dry run hides them (every python
# it starts imports this sitecustomize), so that it proves fastjepa and its benchmarks run
# without them. Not on the GPU machine: there they are absent, and its own sitecustomize, if
# any, stays in force.
if [ "$DRY" = 1 ]; then
mkdir -p "$WORK/absent"
cat >"$WORK/absent/sitecustomize.py" <<'PY'
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    NAMES = {"mlxtend", "flash_attn", "xformers"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.NAMES:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by gpu_check.sh: absent on the GPU machine)", name=name)
sys.meta_path.insert(0, _Absent())
PY
export PYTHONPATH="$WORK/absent:$PYTHONPATH"
fi
SUMMARY="$DEST/gpu_check.md"
BUDGET="${GPU_CHECK_BUDGET:-460}"
T0=$SECONDS
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python

pack_logs() { tar -czf "$DEST/logs.tar.gz.tmp" -C "$(dirname "$LOGS")" logs && mv "$DEST/logs.tar.gz.tmp" "$DEST/logs.tar.gz"; }
say() { echo "$*" | tee -a "$SUMMARY"; }

part() {  # part NAME SECONDS LOGNAME COMMAND... — one time-boxed part; its row goes into the summary at once
    local name=$1 limit=$2 log="$LOGS/$3"
    shift 3
    local t=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local what="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then what="TIMED OUT"; elif [ $rc -ne 0 ]; then what="exit $rc"; fi
    echo "| $name | $what | $((SECONDS - t)) s |" >>"$SUMMARY"
    tail -n 15 "$log"
    pack_logs
    return $rc
}

left() { echo $((BUDGET - (SECONDS - T0))); }
box() {  # box WANT — a time box of WANT seconds, shrunk to what the budget still has (at least 20)
    local l
    l=$(left)
    [ "$1" -lt "$l" ] && l=$1
    [ "$l" -lt 20 ] && l=20
    echo "$l"
}

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M') UTC"
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/GPU: /'
    else
        echo "GPU: no nvidia-smi"
    fi
    echo "git: $(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null | cut -c1-100 || echo 'not a git checkout')"
    echo '```'
    echo
    echo "| part | result | time |"
    echo "|---|---|---:|"
} >"$SUMMARY"  # each part adds its row when it ends

# -- 0. preflight: what the parts need, in a second, before any time is spent --------------
PREFLIGHT_OK=1
part "preflight" 120 preflight.log "$PY" - <<'EOF' || PREFLIGHT_OK=0
import importlib, importlib.util, os, sys
for m in ("mlxtend", "flash_attn", "xformers"):  # absent on the GPU machine; hidden in a dry run
    try:
        importlib.import_module(m)
        print(f"optional {m}: present")
        if os.environ.get("GPU_CHECK_DRY") == "1":
            sys.exit(f"{m} imports: the dry run's sitecustomize that hides it did not load")
    except ModuleNotFoundError:
        print(f"optional {m}: absent")
missing = [m for m in ("torch", "triton", "yaml", "PIL", "pytest", "numpy") if importlib.util.find_spec(m) is None]
print("missing:", ", ".join(missing) or "none")
import torch, triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton.__version__}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
import fastjepa, fastjepa.trainer, fastjepa.train, fastjepa.ops
from fastjepa.ops import available
print("backends:", {k: (v.ok, v.reason) for k, v in available().items()})
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
for m in ("_common", "flops", "ops_table", "train_step_table", "bench_gather_tokens", "bench_predictor_tokens",
          "bench_target_tokens", "bench_smooth_l1_loss"):
    importlib.import_module(m)
from fastjepa.config import load_config
cfg = load_config(None, ["data.dataset=synthetic", "data.batch_size=2", "data.crop_size=128", "mask.patch_size=16",
                         "meta.model_name=vit_tiny", "data.synthetic_samples=2", "meta.device=cpu"])
from fastjepa.data import build_dataset
item = build_dataset(cfg["data"])[0]  # the synthetic data the benchmarks use, without mlxtend
print("imports ok; synthetic data ok")
if missing or (not torch.cuda.is_available() and os.environ.get("GPU_CHECK_DRY") != "1"):
    sys.exit(1)
EOF
if [ "$PREFLIGHT_OK" != 1 ]; then
    say ""
    say "**PREFLIGHT FAILED** — nothing else was run (it would only fail the same way); preflight.log in logs.tar.gz:"
    tail -n 30 "$LOGS/preflight.log" | sed 's/^/    /' >>"$SUMMARY"
    pack_logs
    exit 1
fi

# -- 1. the CUDA extension, sm_90 only, all cores, time-boxed ------------------------------
CUDA_EXT="NOT BUILT"
if [ "${GPU_CHECK_BUILD:-1}" = 1 ] && [ "$DRY" != 1 ]; then
    if [ -z "${CUDA_HOME:-}" ]; then
        for c in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
            if [ -x "$c/bin/nvcc" ] && ls "$c"/lib64/libcudart.so* >/dev/null 2>&1; then export CUDA_HOME="$c"; break; fi
        done
    fi
    if part "build extension (sm_90, 16 jobs)" "$(box 120)" build.log \
        env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace; then
        "$PY" -c "import fastjepa._C as c, sys; sys.exit(0 if c.WITH_CUDA else 1)" >>"$LOGS/build.log" 2>&1 && CUDA_EXT="built"
    fi
else
    echo "| build extension | skipped (GPU_CHECK_BUILD=0 or dry run) | 0 s |" >>"$SUMMARY"
fi

# -- 2. every GPU-marked test, compiled kernels --------------------------------------------
PYTEST_ARGS=(-q -m gpu tests -p no:cacheprovider -rA)
[ "$DRY" = 1 ] && PYTEST_ARGS=(-q -m gpu tests/test_cuda_ext.py -p no:cacheprovider -rA)  # the dry run: the marker plumbing only
part "pytest -m gpu" "$(box 100)" pytest_gpu.log env TRITON_INTERPRET="$TRITON_INTERPRET" "$PY" -m pytest "${PYTEST_ARGS[@]}"
CUDA_TESTED="NOT TESTED"
grep -qE "^PASSED tests/test_cuda_ext.py" "$LOGS/pytest_gpu.log" && CUDA_TESTED="tested"
grep -qE "^FAILED tests/test_cuda_ext.py" "$LOGS/pytest_gpu.log" && CUDA_TESTED="FAILED its tests"

# -- 3. the fused-op table (no torch.compile provider unless asked) ------------------------
PROVIDERS="reference,fused"
[ "${GPU_CHECK_COMPILED:-0}" = 1 ] && PROVIDERS="reference,compiled,fused"
OPS_ARGS=(--providers "$PROVIDERS" --out "$DEST/ops_table.json")
if [ "$DRY" = 1 ]; then OPS_ARGS+=(--iters 1 --ops smooth_l1_loss); else OPS_ARGS+=(--dtype bf16); fi
part "ops_table" "$(box 70)" ops_table.log "$PY" benchmarks/ops_table.py "${OPS_ARGS[@]}"

# -- 4. the data pipeline (another engineer's script; run when present) --------------------
if [ -f benchmarks/bench_data.py ]; then
    # CPU paths per core and on all cores, and data.decode=gpu (nvjpeg; "unavailable" with the
    # reason where torchvision cannot be imported): data.json + data.md
    DATA_ARGS=(--gpu --files 32 --rounds 3 --seconds 2)
    [ "$DRY" = 1 ] && DATA_ARGS=(--quick)
    part "bench_data" "$(box 60)" bench_data.log "$PY" benchmarks/bench_data.py "${DATA_ARGS[@]}" --out "$DEST" --stem data
else
    echo "| bench_data | skipped (benchmarks/bench_data.py not in this checkout) | 0 s |" >>"$SUMMARY"
fi

# -- 5. the training-step table with MFU: whatever the budget has left (at least 2 minutes) -
TS_LEFT=$(left)
[ "$TS_LEFT" -lt 120 ] && TS_LEFT=120
if [ "$DRY" = 1 ]; then
    TS_ARGS=(--repeats 1 --steps 1 --warmup 1 --paths fastjepa)
else
    TS_ARGS=(--max-batch --time-cap $(((TS_LEFT - 150) / 2 > 30 ? (TS_LEFT - 150) / 2 : 30)))
fi
part "train_step_table" "$TS_LEFT" train_step.log "$PY" benchmarks/train_step_table.py --out "$DEST" --name train_step "${TS_ARGS[@]}"

# -- the summary ---------------------------------------------------------------------------
{
    echo
    echo "Total: $((SECONDS - T0)) s of a ${BUDGET} s budget."
    echo
    echo '```'
    grep -E "^(missing|optional|python|GPU|backends|imports)" "$LOGS/preflight.log" | cut -c1-400
    echo '```'
    echo
    if [ "$CUDA_EXT" = built ] && [ "$CUDA_TESTED" = tested ]; then
        echo "CUDA kernel (fastjepa._C, csrc/cuda): built for sm_90 and tested."
    else
        echo "**CUDA KERNEL (fastjepa._C, csrc/cuda): ${CUDA_EXT}, ${CUDA_TESTED}.** The fused ops ran on Triton / the reference."
    fi
    if [ -f "$DEST/train_step.md" ]; then
        echo
        echo "## Train step"
        echo
        cat "$DEST/train_step.md"
    fi
    if [ -f "$DEST/ops_table.json" ]; then
        echo
        echo "## Ops"
        echo
        sed -n '/^| op |/,/^$/p' "$LOGS/ops_table.log"
    fi
} >>"$SUMMARY"
pack_logs
echo
cat "$SUMMARY"

#!/usr/bin/env bash
# A lent GPU machine, in two parts that each fit one command of the lease (docs/performance.md):
#
#   bash benchmarks/gpu_check.sh correctness   # preflight, the CUDA extension build, the GPU tests   (<= 5 min)
#   bash benchmarks/gpu_check.sh speed         # preflight, the op table, the training-step table, data (<= 5 min)
#   bash benchmarks/gpu_check.sh               # both, one after the other
#   GPU_CHECK_DRY=1 OUT=DIR bash benchmarks/gpu_check.sh  # a CPU dry run: tiny sizes, no build (tests/benchmarks/test_benchmarks.py)
#
# Results go to $OUT (else benchmarks/results/gpu_check/). Offline: installs nothing, uses the
# machine's own torch and Triton. Each part runs its steps in time boxes that add up to at most
# GPU_CHECK_BUDGET seconds per part (default 270); a step that fails, hangs or is cut short costs
# only its own rows: every step writes as it goes and the others still run. What comes back fits
# the device tool's limits (at most 8 files of at most 16 MiB, no folders):
#   gpu_check.md     the summary: machine, one row per step (ok / exit N / TIMED OUT), whether the
#                    CUDA kernel was built and tested, the GPU tests' counts, the tables
#   logs.tar.gz      every step's full log (re-packed after each step; pytest's has one line per test)
#   ops_table.json, ops_table.md     the fused-op table (rewritten after every row)
#   train_step.json, train_step.md   the training-step table (rewritten after every path)
#   data.json, data.md               the data-pipeline benchmark (rewritten after every pipeline)
#
# Knobs: GPU_CHECK_BUILD=0 (skip the extension build), GPU_CHECK_COMPILED=1 (add the
# torch.compile'd reference to the op table: cold inductor compiles cost minutes),
# GPU_CHECK_MAX_BATCH=1 (the ViT-H/14 largest-batch search: minutes), GPU_CHECK_BUDGET (seconds
# per part), the time boxes GPU_CHECK_BOX_{PREFLIGHT,BUILD,PYTEST,OPS,TRAIN,DATA} (seconds),
# GPU_CHECK_TEST_TIMEOUT (seconds per GPU test, with pytest-timeout), CUDA_HOME.
set -uo pipefail
MODE="${1:-all}"
case "$MODE" in
    correctness | speed | all) ;;
    *) echo "gpu_check.sh: unknown part '$MODE'; expected correctness, speed or nothing (both)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
REPO="$PWD"
DRY="${GPU_CHECK_DRY:-0}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET="${TRITON_INTERPRET:-0}"  # compiled kernels (tests/conftest.py defaults to the interpreter)
[ "$DRY" = 1 ] && export TRITON_INTERPRET=1
DEST="${OUT:-$REPO/benchmarks/results/gpu_check}"
mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOGS="$WORK/logs"  # full logs live here and travel as one tar.gz
mkdir -p "$LOGS"
# the GPU machine has no mlxtend, flash-attn or xformers: a dry run hides them (every python
# it starts imports this sitecustomize), so that it proves fastjepa and its benchmarks run
# without them. A sitecustomize further down the path (the machine's own, or a test's) still
# runs after it. Not on the GPU machine: there they are absent, and its own sitecustomize, if
# any, stays in force.
if [ "$DRY" = 1 ]; then
mkdir -p "$WORK/absent"
cat >"$WORK/absent/sitecustomize.py" <<'PY'
import importlib.abc, importlib.util, os, sys
class _Absent(importlib.abc.MetaPathFinder):
    NAMES = {"mlxtend", "flash_attn", "xformers"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.NAMES:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by gpu_check.sh: absent on the GPU machine)", name=name)
sys.meta_path.insert(0, _Absent())
_here = os.path.dirname(os.path.abspath(__file__))
for _d in sys.path:
    _f = os.path.join(os.path.abspath(_d or "."), "sitecustomize.py")
    if os.path.dirname(_f) != _here and os.path.isfile(_f):
        _spec = importlib.util.spec_from_file_location("_next_sitecustomize", _f)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
PY
export PYTHONPATH="$WORK/absent:$PYTHONPATH"
fi
SUMMARY="$DEST/gpu_check.md"
BUDGET="${GPU_CHECK_BUDGET:-270}"  # seconds per part: a part and its kill grace stay under 5 minutes
KILL_AFTER="${GPU_CHECK_KILL_AFTER:-5}"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python

pack_logs() { tar -czf "$DEST/logs.tar.gz.tmp" -C "$(dirname "$LOGS")" logs && mv "$DEST/logs.tar.gz.tmp" "$DEST/logs.tar.gz"; }
say() { echo "$*" | tee -a "$SUMMARY"; }

START=$SECONDS
T0=$SECONDS
left() { echo $((BUDGET - (SECONDS - T0))); }
box() {  # box WANT — a time box of WANT seconds, shrunk to what the part's budget still has (at least 10)
    local l
    l=$(left)
    [ "$1" -lt "$l" ] && l=$1
    [ "$l" -lt 10 ] && l=10
    echo "$l"
}

step() {  # step NAME SECONDS LOGNAME COMMAND... — one time-boxed step; its row goes into the summary at once
    local name=$1 limit=$2 log="$LOGS/$3"
    shift 3
    local t=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after="$KILL_AFTER" "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local what="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then what="TIMED OUT"; elif [ $rc -ne 0 ]; then what="exit $rc"; fi
    echo "| $name | $what | $((SECONDS - t)) s |" >>"$SUMMARY"
    tail -n 15 "$log"
    pack_logs
    return $rc
}

{
    echo "# GPU check ($MODE), $(date -u '+%Y-%m-%d %H:%M') UTC"
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
} >"$SUMMARY"  # each step adds its row when it ends

# -- preflight: what the steps need, in seconds, before any time is spent -------------------
preflight() {
    local ok=1
    step "preflight" "$(box "${GPU_CHECK_BOX_PREFLIGHT:-60}")" preflight.log "$PY" - <<'EOF' || ok=0
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
print("pytest-timeout:", "present" if importlib.util.find_spec("pytest_timeout") else "absent")
import torch, triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton.__version__}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
import fastjepa, fastjepa.training.trainer, fastjepa.train, fastjepa.ops
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
    if [ "$ok" != 1 ]; then
        say ""
        say "**PREFLIGHT FAILED** — nothing else was run (it would only fail the same way); preflight.log in logs.tar.gz:"
        tail -n 30 "$LOGS/preflight.log" | sed 's/^/    /' >>"$SUMMARY"
        pack_logs
        exit 1
    fi
}

# -- correctness: the CUDA extension (sm_90, all cores), then every GPU-marked test -------
CUDA_EXT="NOT BUILT"
CUDA_TESTED="NOT TESTED"
TEST_COUNTS=""
correctness() {
    if [ "${GPU_CHECK_BUILD:-1}" = 1 ] && [ "$DRY" != 1 ]; then
        if [ -z "${CUDA_HOME:-}" ]; then
            for c in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
                if [ -x "$c/bin/nvcc" ] && ls "$c"/lib64/libcudart.so* >/dev/null 2>&1; then export CUDA_HOME="$c"; break; fi
            done
        fi
        if step "build extension (sm_90, $(nproc) jobs)" "$(box "${GPU_CHECK_BOX_BUILD:-150}")" build.log \
            env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace; then
            "$PY" -c "import fastjepa._C as c, sys; sys.exit(0 if c.WITH_CUDA else 1)" >>"$LOGS/build.log" 2>&1 && CUDA_EXT="built"
        fi
    else
        echo "| build extension | skipped (GPU_CHECK_BUILD=0 or dry run) | 0 s |" >>"$SUMMARY"
    fi
    # the CUDA extension's cases first, then the ops' compiled kernels (tests/ops), the
    # launchers (tests/kernels) and the training step (tests/training), then every other file;
    # one line per test as it ends (-v), so a run cut short still shows what passed; a file
    # that fails to collect costs only its own tests
    local first=(tests/ops/test_cuda_ext.py) rest=() f
    if [ "$DRY" != 1 ]; then
        while IFS= read -r f; do
            [ "$f" = tests/ops/test_cuda_ext.py ] || rest+=("$f")
        done < <(for d in ops kernels training; do find "tests/$d" -name 'test_*.py' | sort; done
                 find tests -name 'test_*.py' -not -path 'tests/ops/*' -not -path 'tests/kernels/*' -not -path 'tests/training/*' | sort)
    fi
    local args=(-m gpu -v -rfE -p no:cacheprovider --continue-on-collection-errors "${first[@]}" "${rest[@]}")
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        args+=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-90}")
    else
        echo "pytest-timeout absent: no per-test timeout (the step's time box still holds)" >"$LOGS/pytest_gpu.note"
    fi
    step "pytest -m gpu" "$(box "${GPU_CHECK_BOX_PYTEST:-$(left)}")" pytest_gpu.log env TRITON_INTERPRET="$TRITON_INTERPRET" "$PY" -m pytest "${args[@]}"
    local log="$LOGS/pytest_gpu.log" p fl e s
    grep -qE "^tests/ops/test_cuda_ext.py::\S+ PASSED" "$log" && CUDA_TESTED="tested"
    grep -qE "^tests/ops/test_cuda_ext.py::\S+ (FAILED|ERROR)" "$log" && CUDA_TESTED="FAILED its tests"
    p=$(grep -cE "^tests/\S+ PASSED" "$log")
    fl=$(grep -cE "^tests/\S+ FAILED" "$log")
    e=$(grep -cE "^tests/\S+ ERROR" "$log")
    s=$(grep -cE "^tests/\S+ SKIPPED" "$log")
    TEST_COUNTS="GPU tests: $p passed, $fl failed, $e errors, $s skipped (from the per-test lines of pytest_gpu.log)."
}

# -- speed: the op table, the training-step table, the data pipeline -------------------------
speed() {
    local providers="reference,fused" ops_args ts_args data_args
    [ "${GPU_CHECK_COMPILED:-0}" = 1 ] && providers="reference,compiled,fused"
    ops_args=(--providers "$providers" --out "$DEST/ops_table.json")
    if [ "$DRY" = 1 ]; then ops_args+=(--iters 1); else ops_args+=(--dtype bf16); fi
    step "ops_table" "$(box "${GPU_CHECK_BOX_OPS:-75}")" ops_table.log "$PY" benchmarks/ops_table.py "${ops_args[@]}"

    if [ "$DRY" = 1 ]; then
        ts_args=(--repeats 1 --steps 1 --warmup 1 --paths fastjepa --in-process)  # the GPU's one-process code
    else
        ts_args=(--steps 5 --warmup 4)
        [ "${GPU_CHECK_MAX_BATCH:-0}" = 1 ] && ts_args+=(--max-batch --time-cap 60)
    fi
    local ts_box
    ts_box=$(box "${GPU_CHECK_BOX_TRAIN:-150}")
    step "train_step_table" "$ts_box" train_step.log \
        "$PY" benchmarks/train_step_table.py --out "$DEST" --name train_step --time-budget $((ts_box - 10)) "${ts_args[@]}"

    # the dataset as training uses it, one loader core; data.decode=gpu (nvjpeg; "unavailable"
    # with the reason where torchvision cannot be imported): data.json + data.md
    data_args=(--gpu --files 32 --rounds 3 --seconds 2)
    [ "$DRY" = 1 ] && data_args=(--quick)
    step "bench_data" "$(box "${GPU_CHECK_BOX_DATA:-45}")" bench_data.log "$PY" benchmarks/bench_data.py "${data_args[@]}" --out "$DEST" --stem data
}

preflight
case "$MODE" in
    correctness) correctness ;;
    speed) speed ;;
    all) correctness; T0=$SECONDS; speed ;;  # each part its own budget
esac

# -- the summary ---------------------------------------------------------------------------
{
    echo
    echo "Total: $((SECONDS - START)) s; each part's budget ${BUDGET} s (the last part took $((SECONDS - T0)) s)."
    echo
    echo '```'
    grep -E "^(missing|optional|pytest-timeout|python|GPU|backends|imports)" "$LOGS/preflight.log" | cut -c1-400
    echo '```'
    if [ "$MODE" != speed ]; then
        echo
        if [ "$CUDA_EXT" = built ] && [ "$CUDA_TESTED" = tested ]; then
            echo "CUDA kernel (fastjepa._C, csrc/cuda): built for sm_90 and tested."
        else
            echo "**CUDA KERNEL (fastjepa._C, csrc/cuda): ${CUDA_EXT}, ${CUDA_TESTED}.** The fused ops ran on Triton / the reference."
        fi
        echo
        echo "$TEST_COUNTS"
        grep -E "^tests/\S+ (FAILED|ERROR)" "$LOGS/pytest_gpu.log" 2>/dev/null | head -n 20 | sed 's/^/    /'
    fi
    for t in train_step ops_table data; do
        if [ -f "$DEST/$t.md" ]; then
            echo
            echo "## $t"
            echo
            cat "$DEST/$t.md"
        fi
    done
} >>"$SUMMARY"
pack_logs
echo
cat "$SUMMARY"

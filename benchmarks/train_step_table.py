"""The training step, fastjepa vs the reference path, in one run: a markdown table + JSON.

    PYTHONPATH=. python benchmarks/train_step_table.py [--out DIR] [--repeats R] [--max-batch]

On a CUDA machine: ViT-B/16, ViT-L/16 and ViT-H/14 at 224 px with the published mask
config and batch (bf16 autocast, as the published runs), fastjepa's default step vs the
reference path (``meta.reference_step=true``: reference ops, math attention, per-parameter
EMA, non-fused AdamW, GradScaler with bf16); with ``--max-batch``, the largest ViT-H/14
batch that fits for each path (doubling, then bisection, under a time cap).

On the CPU: the issue's configuration — vit_tiny at 128 px / patch 16, predictor depth 4 ×
width 96, batch 32, synthetic data — fastjepa's default step vs the reference step run as
the reference code runs off CUDA (fp32, its Python mask collator ``mask.compat=reference``,
per-parameter EMA, non-fused AdamW, math attention), plus the options that might pay here
(bf16 autocast around the step, compiled blocks) as extra rows.

Each (path, repeat) runs in its own child process, paths interleaved (A B A B …), so that
one path's allocations and warm caches do not leak into the other's numbers and slow
drifts of a shared machine hit both alike. A child: builds the Trainer from the config,
checks the loss on one fixed batch (compared across paths before any number is printed),
draws warm-up + timed batches from the real DataLoader and collator (timing that as
"load"), then times the steps on those batches (synchronised). Reported: images/s for the
step alone and with loading + collation (num_workers=0, as the CPU default), median step
time, peak memory (CUDA: ``max_memory_allocated``; CPU: the child's peak RSS), MFU =
counted FLOPs (``flops.py``, from the model and the actual mask sizes) / time / the
machine's measured matmul peak in the step's dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import flops  # noqa: E402
import torch  # noqa: E402
from _report import write_report  # noqa: E402

COMMON = ["data.dataset=synthetic", "data.num_workers=0", "data.pin_mem=false", "logging.probe=false", "logging.plots=false",
          "logging.tensorboard=false", "logging.wandb=false"]  # fmt: skip

# the CPU configuration (vit_tiny = 192 wide, 12 deep, 3 heads)
CPU_MODEL = ["data.crop_size=128", "data.batch_size=32", "mask.patch_size=16", "meta.model_name=vit_tiny",
             "meta.model_kwargs={}", "meta.pred_depth=4", "meta.pred_emb_dim=96", "meta.device=cpu"]  # fmt: skip
CPU_PATHS = {
    "fastjepa": [],
    "fastjepa+bf16": [],  # the trainer's CUDA bf16 step (autocast, no GradScaler) on the CPU: trainer.amp_dtype set by the child
    "reference": ["meta.reference_step=true", "mask.compat=reference", "meta.use_bfloat16=false"],
}
CPU_EXTRA_PATHS = {  # --paths fastjepa+compile,... (minutes of inductor compiling)
    "fastjepa+compile": ["meta.compile=true"],
    "fastjepa+bf16+compile": ["meta.compile=true"],
}
GPU_MODELS = {  # in this order: the targets first, the batch search after ViT-H/14, ViT-L/16 last
    "ViT-B/16": "in1k_vitb16_ep300.yaml",
    "ViT-H/14": "in1k_vith14_ep300.yaml",
    "ViT-L/16": "in1k_vitl16_ep300.yaml",
}
GPU_PATHS = {
    "fastjepa": [],
    "reference": ["meta.reference_step=true", "mask.compat=reference"],
    # not the published architecture: 6 predictor heads of dim 64 instead of the encoder's
    # 12 or 16 (dim 32 / 24, which flash kernels pad); measured to decide whether to offer it
    "fastjepa+pred_hd64": ["meta.pred_num_heads=6"],
}


def config_file(name: str) -> str:
    return str(ROOT / "fastjepa" / "configs" / name)


# -- the child: one path, one process


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_batch(cfg: dict, device: torch.device):
    """One fixed batch and masks (same for every path): the cross-path loss check."""
    from fastjepa.masks import MaskCollator

    data, mask = cfg["data"], cfg["mask"]
    g = torch.Generator().manual_seed(1234)
    imgs = torch.randn(min(8, data["batch_size"]), 3, data["crop_size"], data["crop_size"], generator=g)
    collate = MaskCollator(
        input_size=data["crop_size"], patch_size=mask["patch_size"], enc_mask_scale=mask["enc_mask_scale"],
        pred_mask_scale=mask["pred_mask_scale"], aspect_ratio=mask["aspect_ratio"], nenc=mask["num_enc_masks"],
        npred=mask["num_pred_masks"], min_keep=mask["min_keep"], allow_overlap=mask["allow_overlap"], generator=g,
    )  # fmt: skip
    _, me, mp = collate(list(imgs))
    return imgs.to(device), [m.to(device) for m in me], [m.to(device) for m in mp]


class CompileCounter:
    """Counts Triton kernel compilations (new specialisations) and torch.compile graphs while
    active: a timed step that compiles measures the compiler, so the table reports it."""

    def __init__(self):
        self.triton = 0
        self._restore = None

    def _hook(self, *args, **kwargs):
        self.triton += 1
        return False  # go on compiling

    def __enter__(self):
        try:
            import triton

            knobs = getattr(triton, "knobs", None)
            if knobs is not None and hasattr(knobs.runtime, "jit_cache_hook"):
                prev = knobs.runtime.jit_cache_hook
                knobs.runtime.jit_cache_hook = self._hook
                self._restore = lambda: setattr(knobs.runtime, "jit_cache_hook", prev)
            else:  # Triton < 3.3: a class attribute
                from triton.runtime.jit import JITFunction

                prev = JITFunction.cache_hook
                JITFunction.cache_hook = self._hook
                self._restore = lambda: setattr(JITFunction, "cache_hook", prev)
        except Exception:  # no hook in this Triton: the count stays unknown
            self.triton = None
        try:
            from torch._dynamo.utils import counters

            self._graphs0 = counters["stats"]["unique_graphs"]
        except Exception:
            self._graphs0 = None
        return self

    def __exit__(self, *exc):
        if self._restore:
            self._restore()
        return False

    @property
    def graphs(self) -> int | None:
        if self._graphs0 is None:
            return None
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"] - self._graphs0


def run_path(config: str | None, overrides: list[str], *, steps: int, warmup: int, cpu_bf16: bool = False, threads: int = 0) -> dict:
    """One path: build the Trainer, check the loss on a fixed batch, draw warm-up + timed
    batches from the real loader (timed as "load"), put each on the device (pinned,
    non-blocking, synchronised) before its step's clock starts, time the steps."""
    from fastjepa.config import load_config
    from fastjepa.training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(config, [*COMMON, *overrides])
    B = cfg["data"]["batch_size"]
    n_batches = warmup + steps
    cfg["data"]["synthetic_samples"] = B * n_batches
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tmp, quiet=True)
    device = tr.device
    if cpu_bf16 and device.type == "cpu":
        tr.amp_dtype = tr.stepper.amp_dtype = torch.bfloat16  # what the trainer does on CUDA with meta.use_bfloat16 (no GradScaler)
    step_dtype = tr.amp_dtype or torch.float32

    # correctness once: the loss on a fixed batch, before any parameter moves
    imgs, me, mp = _check_batch(cfg, device)
    with torch.no_grad(), tr.stepper.backend(), torch.autocast(device.type, dtype=step_dtype, enabled=tr.amp_dtype is not None):
        check_loss = float(tr.model(imgs, me, mp))
    del imgs, me, mp

    # the real loader and collator: time fetching the batches
    batches, load_s, load_cpu = [], [], []
    it = iter(tr._loader())
    for _ in range(n_batches):
        t0, c0 = time.perf_counter(), time.process_time()
        udata, masks_enc, masks_pred = next(it)
        load_s.append(time.perf_counter() - t0)
        load_cpu.append(time.process_time() - c0)
        batches.append((udata[0] if isinstance(udata, (list, tuple)) else udata, masks_enc, masks_pred))
    del it

    def to_device(t: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step_s, step_cpu, step_flops, compiles = [], [], [], []
    for i, (x, masks_enc, masks_pred) in enumerate(batches):
        x = to_device(x)  # the batch is on the device before the clock starts, as a prefetching loader leaves it
        masks_enc = [to_device(m) for m in masks_enc]
        masks_pred = [to_device(m) for m in masks_pred]
        _sync(device)
        with CompileCounter() as cc:
            t0, c0 = time.perf_counter(), time.process_time()
            with tr.stepper.backend():
                loss = tr.stepper.step(x, masks_enc, masks_pred, index=0).loss
            _sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= warmup:
            step_s.append(dt)
            step_cpu.append(dc)
            step_flops.append(flops.step_flops(flops.shape_of(tr.model, B, masks_enc, masks_pred))["total"])
            compiles.append({"triton": cc.triton, "graphs": cc.graphs})
    final_loss = float(loss)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device)
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    triton_compiles = None if any(c["triton"] is None for c in compiles) else sum(c["triton"] for c in compiles)
    graphs = None if any(c["graphs"] is None for c in compiles) else sum(c["graphs"] for c in compiles)
    return {
        "batch": B, "step_s": step_s, "load_s": load_s[warmup:], "step_cpu_s": step_cpu, "load_cpu_s": load_cpu[warmup:], "flops": step_flops, "peak_mem_bytes": peak_mem,
        "check_loss": check_loss, "final_loss": final_loss, "step_dtype": str(step_dtype).replace("torch.", ""),
        "device": str(device), "threads": torch.get_num_threads(), "timed_triton_compiles": triton_compiles,
        "timed_compiled_graphs": graphs,
    }  # fmt: skip


def run_in_process(config: str | None, overrides: list[str], **kw) -> dict:
    """:func:`run_path` in this process; its error (any exception) is the row's; the path's
    memory is freed before the next (gc, then the CUDA cache)."""
    import gc
    import traceback

    try:
        return run_path(config, overrides, **kw)
    except Exception as exc:
        tb = traceback.format_exc().strip().splitlines()
        return {"error": f"{type(exc).__name__}: {str(exc)[:500]} ({tb[-3].strip() if len(tb) > 2 else ''})"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_child(args) -> dict:
    return run_path(args.config, args.set, steps=args.steps, warmup=args.warmup, cpu_bf16=args.cpu_bf16, threads=args.threads)


def _fits(tr, B: int, crop: int, device: torch.device) -> bool:
    from fastjepa.masks import MaskCollator

    mask = tr.cfg["mask"]
    collate = MaskCollator(
        input_size=crop, patch_size=mask["patch_size"], enc_mask_scale=mask["enc_mask_scale"],
        pred_mask_scale=mask["pred_mask_scale"], aspect_ratio=mask["aspect_ratio"], nenc=mask["num_enc_masks"],
        npred=mask["num_pred_masks"], min_keep=mask["min_keep"], allow_overlap=mask["allow_overlap"],
    )  # fmt: skip
    imgs = torch.randn(B, 3, crop, crop)
    _, me, mp = collate(list(imgs[:, :, :1, :1]))  # masks depend on B and the grid only
    try:
        x, me, mp = imgs.to(device), [m.to(device) for m in me], [m.to(device) for m in mp]
        for _ in range(2):  # the second step holds optimizer state too
            with tr.stepper.backend():
                tr.stepper.step(x, me, mp, index=0)
        _sync(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        tr.optimizer.zero_grad(set_to_none=True)
        imgs = x = None
        torch.cuda.empty_cache()


def run_max_batch(args) -> dict:
    """The largest batch (a multiple of 8) whose step fits: doubling from 64, then bisection."""
    from fastjepa.config import load_config
    from fastjepa.training.trainer import Trainer

    cfg = load_config(args.config, [*COMMON, *args.set])
    cfg["data"]["synthetic_samples"] = cfg["data"]["batch_size"]  # the loader is not used here
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tmp, quiet=True)
    crop, deadline = cfg["data"]["crop_size"], time.perf_counter() + args.time_cap
    tried: dict[int, bool] = {}
    lo, hi, B = 0, None, 64
    while hi is None and time.perf_counter() < deadline:
        tried[B] = _fits(tr, B, crop, tr.device)
        lo, hi, B = (B, None, 2 * B) if tried[B] else (lo, B, B)
    while hi is not None and hi - lo > 8 and time.perf_counter() < deadline:
        mid = (lo + hi) // 16 * 8
        tried[mid] = _fits(tr, mid, crop, tr.device)
        lo, hi = (mid, hi) if tried[mid] else (lo, mid)
    exact = hi is not None and hi - lo <= 8
    return {"max_batch": lo, "first_failure": hi, "exact_to_8": exact, "tried": tried,
            "capped": time.perf_counter() >= deadline}  # fmt: skip


# -- the parent: children, interleaved; the table


def child(config: str | None, overrides: list[str], *, steps: int, warmup: int, cpu_bf16: bool = False, threads: int = 0,
          max_batch: bool = False, time_cap: float = 120.0, timeout: float = 900.0) -> dict:  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = (
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            out,
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--time-cap",
            str(time_cap),
            "--threads",
            str(threads),
        ]
        + (["--config", config] if config else [])
        + (["--cpu-bf16"] if cpu_bf16 else [])
    )
    cmd += ["--max-batch"] if max_batch else []
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            return {"error": f"child exited {proc.returncode}: {proc.stderr.strip()[-800:]}"}
        return json.loads(Path(out).read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"child ran past {timeout:.0f} s"}
    finally:
        Path(out).unlink(missing_ok=True)


# dense tensor-core peaks from the vendors' datasheets (TFLOP/s, bf16/fp16 without sparsity)
DATASHEET_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0), ("H200", 989.0),
                    ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))  # fmt: skip


def datasheet_peak(device_name: str, dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, which datasheet figure) for bf16/fp16 steps on a known GPU; None otherwise."""
    if dtype not in ("bfloat16", "float16"):
        return None
    for key, tflops in DATASHEET_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12, f"{key} datasheet {dtype} dense {tflops:g} TFLOP/s"
    return None


def summarise(runs: list[dict], peak: dict[str, float], clock: str, datasheet: dict[str, tuple[float, str] | None] | None = None) -> dict:
    """Medians over every timed step of every run. ``clock="cpu"`` times with the process's
    CPU time (one thread: the step's own cycles, robust to other work on a shared machine),
    ``"wall"`` with the wall clock (always reported too)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "no runs"}
    key = "_cpu_s" if clock == "cpu" else "_s"
    steps = [s for r in ok for s in r["step" + key]]
    loads = [s for r in ok for s in r["load" + key]]
    wall = [s for r in ok for s in r["step_s"]]
    fl = [f for r in ok for f in r["flops"]]
    B = ok[0]["batch"]
    step, load = statistics.median(steps), statistics.median(loads)
    flops_per_s = statistics.mean(fl) / step
    dtype = ok[0]["step_dtype"]
    return {
        "clock": clock, "batch": B, "step_ms": 1e3 * step, "step_ms_min": 1e3 * min(steps), "step_ms_max": 1e3 * max(steps),
        "load_ms": 1e3 * load, "imgs_per_s": B / step, "imgs_per_s_with_loading": B / (step + load),
        "wall_step_ms": 1e3 * statistics.median(wall), "wall_imgs_per_s": B / statistics.median(wall),
        "peak_mem_gib": max(r["peak_mem_bytes"] for r in ok) / 2**30,
        "tflops_per_s": flops_per_s / 1e12, "mfu": flops_per_s / peak[dtype], "step_dtype": dtype,
        "mfu_datasheet": flops_per_s / ds[0] if (ds := (datasheet or {}).get(dtype)) else None, "datasheet": ds[1] if ds else None,
        "timed_triton_compiles": _sum_known(r.get("timed_triton_compiles") for r in ok),
        "timed_compiled_graphs": _sum_known(r.get("timed_compiled_graphs") for r in ok), "gflops_per_step": statistics.mean(fl) / 1e9,
        "check_loss": ok[0]["check_loss"], "final_loss": ok[-1]["final_loss"], "timed_steps": len(steps), "runs": len(ok),
        "per_run_imgs_per_s": [B / statistics.median(r["step" + key]) for r in ok], "errors": [r["error"] for r in runs if "error" in r],
        "threads": ok[0]["threads"],
    }  # fmt: skip


def _sum_known(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "threads": torch.get_num_threads()}  # fmt: skip
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        name = platform.processor()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
            flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
            info["bf16_units"] = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
        except (OSError, StopIteration):
            pass
        info["device"] = name
        info["cores"] = os.cpu_count()
        info["load_avg_start"] = os.getloadavg()
    return info


def markdown(rows: list[dict], info: dict) -> str:
    peaks = info.get("measured_peak_tflops", {})
    datasheets = sorted({r["result"]["datasheet"] for r in rows if r["result"].get("datasheet")})
    lines = [
        f"Device: {info['device']} · torch {info['torch']} · {info['date_utc']} UTC · "
        + ("timed by process CPU time, 1 thread per run" if info.get("clock") == "cpu" else "timed by wall clock")
        + (" · all paths in one process" if info.get("in_process") else " · one process per path and repeat")
        + (
            f" · load average at start {info['load_avg_start'][0]:.1f} on {info['cores']} cores"
            if "load_avg_start" in info
            else ""
        ),
        "",
        "MFU = counted FLOPs / step time / peak: against the measured matmul peak ("
        + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in peaks.items())
        + ")" + (" and against the datasheet (" + "; ".join(datasheets) + ")" if datasheets else "; no datasheet peak for this device")
        + ". Compiles: Triton kernels compiled (and torch.compile graphs) during the timed steps; should be 0.",
        "",
        "| model | path | batch | step ms (median, range) | img/s (step) | img/s (with loading) | vs reference | wall step ms "
        "| peak mem GiB | TFLOP/s | MFU (measured peak) | MFU (datasheet) | compiles in timed steps | loss check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip

    def n(v):
        return "?" if v is None else str(v)

    for r in rows:
        s = r["result"]
        if "error" in s:
            lines.append(f"| {r['model']} | {r['path']} |" + " |" * 11 + f" error: {s['error'][:160]} |")
            continue
        ds = f"{100 * s['mfu_datasheet']:.1f}%" if s.get("mfu_datasheet") is not None else "–"
        lines.append(
            f"| {r['model']} | {r['path']} | {s['batch']} | {s['step_ms']:.1f} ({s['step_ms_min']:.0f}–{s['step_ms_max']:.0f}) | "
            f"{s['imgs_per_s']:.1f} | {s['imgs_per_s_with_loading']:.1f} | {r.get('speedup', float('nan')):.2f}× "
            f"({r.get('speedup_with_loading', float('nan')):.2f}× w/ loading) | {s['wall_step_ms']:.0f} | {s['peak_mem_gib']:.2f} | {s['tflops_per_s']:.3f} | "
            f"{100 * s['mfu']:.1f}% ({s['step_dtype']}) | {ds} | {n(s.get('timed_triton_compiles'))} / {n(s.get('timed_compiled_graphs'))} "
            f"| {r.get('check', '')} |"
        )
    return "\n".join(lines)


def compare(rows: list[dict], model: str, tol: float) -> None:
    """Speed-ups against the reference row of the same model; the loss on the fixed batch
    must agree (fp32: to rounding; bf16: bf16 rounding) or the row says so."""
    ref = next((r["result"] for r in rows if r["model"] == model and r["path"] == "reference"), None)
    for r in rows:
        s = r["result"]
        if r["model"] != model or ref is None or "error" in s or "error" in ref:
            continue
        r["speedup"] = s["imgs_per_s"] / ref["imgs_per_s"]
        r["speedup_with_loading"] = s["imgs_per_s_with_loading"] / ref["imgs_per_s_with_loading"]
        rel = abs(s["check_loss"] - ref["check_loss"]) / abs(ref["check_loss"])
        t = tol if s["step_dtype"] == ref["step_dtype"] == "float32" else 3e-2
        r["check"] = f"ok ({rel:.1e})" if rel <= t else f"MISMATCH {rel:.1e} > {t:g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the .md and .json (default benchmarks/results)")
    ap.add_argument("--name", help="file stem (default <cpu|gpu>-<date>-train_step)")
    ap.add_argument("--repeats", type=int, default=None, help="child processes per path (default 3 on CPU, 1 on GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per child (default 4 on CPU, 6 on GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per child (default 2 on CPU and GPU)")
    ap.add_argument("--paths", help="comma-separated subset of the paths")
    ap.add_argument("--models", help="comma-separated subset of the GPU models (e.g. ViT-B/16)")
    ap.add_argument("--max-batch", action="store_true", help="GPU: also search the largest ViT-H/14 batch per path")
    ap.add_argument("--time-cap", type=float, default=120.0, help="seconds per path for the batch search")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: start no further path once the next would likely end past this (the rows so far stand)")  # fmt: skip
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                    help="all paths in this process (default on a GPU; on the CPU one child process per path and repeat)")  # fmt: skip
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--cpu-bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch threads per child (default 1, timed by CPU time: robust on a shared machine; 0 = torch's default, wall clock)",
    )
    args = ap.parse_args(argv)

    if args.child:
        result = run_max_batch(args) if args.max_batch else run_child(args)
        Path(args.child).write_text(json.dumps(result))
        return 0

    gpu = torch.cuda.is_available()
    repeats = args.repeats or (1 if gpu else 3)
    steps = args.steps or (6 if gpu else 4)
    warmup = args.warmup if args.warmup is not None else 2
    threads = 0 if gpu else (1 if args.threads is None else args.threads)
    clock = "cpu" if threads == 1 else "wall"
    if threads:
        torch.set_num_threads(threads)
    info = machine()
    info["clock"] = clock
    dev = torch.device("cuda" if gpu else "cpu")
    peak = {dt: flops.measured_peak_flops(dev, getattr(torch, dt), clock=clock)["flops_per_s"] for dt in ("float32", "bfloat16")}
    if gpu:
        torch.cuda.empty_cache()  # the peak's operands: not held while the paths run
    info["measured_peak_tflops"] = {k: v / 1e12 for k, v in peak.items()}
    datasheet = {dt: datasheet_peak(info["device"], dt) for dt in ("float32", "bfloat16")}
    in_process = gpu if args.in_process is None else args.in_process
    info["in_process"] = in_process
    print(
        f"# {info['device']}: measured matmul peak " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peak.items()),
        flush=True,
    )

    if gpu:
        models = {m: (config_file(f), []) for m, f in GPU_MODELS.items()}
        paths = dict(GPU_PATHS)
    else:
        models = {"vit_tiny 128px/16, pred 4×96, B=32": (None, CPU_MODEL)}
        paths = dict(CPU_PATHS)
    if args.paths:
        known = {**paths, **({} if gpu else CPU_EXTRA_PATHS)}
        paths = {p: known[p] for p in args.paths.split(",")}
    if args.models:
        models = {m: models[m] for m in args.models.split(",")}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{'gpu' if gpu else 'cpu'}-{time.strftime('%Y-%m-%d', time.gmtime())}-train_step"
    rows: list[dict] = []
    search: dict[str, dict] = {}

    def write(done: list[dict] | None = None) -> str:  # after every child: a time-boxed run cut short keeps its finished rows
        done = rows if done is None else done
        table = markdown(done, info)
        if search:
            table += ("\n\nLargest ViT-H/14 batch (224 px, published masks) whose step fits on this GPU:\n\n"
                      "| path | batch | first failing | exact to 8 |\n|---|---:|---:|---|\n")  # fmt: skip
            for path, s in search.items():
                if "error" in s:
                    table += f"| {path} | error: {s['error'][:100]} | | |\n"
                else:
                    table += f"| {path} | {s['max_batch']} | {s['first_failure']} | {'yes' if s['exact_to_8'] else 'no (time cap)'} |\n"
        if skipped:
            table += f"\n\nNot run (the --time-budget of {args.time_budget:g} s would have been passed): {', '.join(skipped)}."
        write_report(out, stem, {"machine": info, "rows": done, "max_batch": search, "skipped": skipped,
                                 "repeats": repeats, "steps": steps, "warmup": warmup}, table, indent=1)  # fmt: skip
        return table

    # the order: ViT-B/16 and ViT-H/14, fastjepa vs reference, first; the other paths next; the
    # other models last (a run cut short by its time box keeps the rows that matter most)
    first_models = [m for m in models if m in ("ViT-B/16", "ViT-H/14")] or list(models)[:1]
    main_paths = [p for p in paths if p in ("fastjepa", "reference")]
    jobs = [(m, p) for m in first_models for p in main_paths]
    jobs += [(m, p) for m in first_models for p in paths if p not in main_paths]
    jobs += [(m, p) for m in models if m not in first_models for p in paths]
    runs: dict[tuple[str, str], list[dict]] = {}
    started, longest, skipped = time.perf_counter(), 0.0, []
    for rep in range(repeats):
        for model, path in jobs:  # repeats interleave: A B A B ...
            config, base = models[model]
            if args.time_budget and time.perf_counter() - started + 1.3 * longest > args.time_budget:
                skipped.append(f"{model} {path}")  # would end past the budget: left out, said so below
                continue
            t0 = time.perf_counter()
            kw = dict(steps=steps, warmup=warmup, cpu_bf16="+bf16" in path, threads=threads)
            r = run_in_process(config, base + paths[path], **kw) if in_process else child(config, base + paths[path], **kw)
            runs.setdefault((model, path), []).append(r)
            what = r.get("error") or (
                f"median step {1e3 * statistics.median(r['step_s']):.1f} ms wall"
                + (f", {1e3 * statistics.median(r['step_cpu_s']):.1f} ms CPU" if clock == "cpu" else "")
            )
            print(f"  {model} {path} run {rep + 1}/{repeats}: {what} ({time.perf_counter() - t0:.0f} s)", flush=True)
            longest = max(longest, time.perf_counter() - t0)
            rows[:] = [{"model": m, "path": p, "result": summarise(rs, peak, clock, datasheet)} for (m, p), rs in runs.items()]
            for m in models:
                compare(rows, m, tol=1e-4)
            write()
            if gpu and args.max_batch and rep == 0 and "ViT-H/14" in models and (model, path) == jobs[len(first_models) * len(main_paths) - 1]:
                for mb_path in ("fastjepa", "reference"):  # after the main rows; the published architecture only
                    t0 = time.perf_counter()
                    search[mb_path] = child(models["ViT-H/14"][0], GPU_PATHS[mb_path], steps=1, warmup=0, max_batch=True,
                                            time_cap=args.time_cap, timeout=args.time_cap + 240)  # fmt: skip
                    print(f"  ViT-H/14 {mb_path} largest batch: {search[mb_path]} ({time.perf_counter() - t0:.0f} s)", flush=True)
                    write()

    print()
    print(write())
    print(f"\nwrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

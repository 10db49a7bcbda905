"""Hugging Face transformers' V-JEPA 2 (and I-JEPA) without and with
``fastjepa.integrations.transformers.apply()``, in one process, interleaved.

::

    python benchmarks/bench_transformers.py                 # CPU, float32, tiny random-weight models
    python benchmarks/bench_transformers.py --gpu           # CUDA, bf16 autocast, ViT-L/16 V-JEPA 2 shapes
    python benchmarks/bench_transformers.py --json out.json

Rows (random weights from the configs below, no download):

* ``vjepa2 step``: ``VJEPA2Model(clips, context_mask=[cm], target_mask=[tm])``, the L1 loss of
  the predictor's output against the (detached) target tokens, backward; no optimizer.
* ``vjepa2 features``: ``get_vision_features(clips)`` under ``torch.no_grad()`` (the encoder).
* ``ijepa features``: ``IJepaModel(pixel_values)`` under ``torch.no_grad()``.

Each row is first checked (loss / features and every gradient, original against patched,
max relative difference printed), then timed alternating ``revert()`` and ``apply()`` so
both modes see the same machine state; medians of wall time (the headline) and of the
process's CPU time (``time.process_time``: with ``--threads 1`` on a shared machine it leaves
out the time the process waited for a core), the first repetition dropped as warm-up.

CPU shapes: V-JEPA 2 64 px / 8, 4 frames, tubelet 2 (128 tokens), hidden 96, 4 heads, depth
4, predictor 64 / 4 heads / depth 2, batch 4, a context of 40 tokens and 88 targets per clip
(V-JEPA 2's masks keep about a third as context); I-JEPA 96 px / 16 (36 tokens), hidden 96,
depth 4, batch 8. ``--gpu``: V-JEPA 2 ViT-L/16 at 256 px, 16 frames (2,048 tokens),
predictor 384 / 12 heads / depth 12, batch 8, a 30 % context.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def import_transformers():
    """transformers (a clear ImportError where it is not installed)."""
    return importlib.import_module("transformers")


def _integration():
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module("fastjepa.integrations.transformers")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-30)).item()


def setups(device, gpu: bool):
    t = import_transformers()
    IJepaConfig, IJepaModel, VJEPA2Config, VJEPA2Model = t.IJepaConfig, t.IJepaModel, t.VJEPA2Config, t.VJEPA2Model
    torch.manual_seed(0)
    if gpu:
        vc = VJEPA2Config(crop_size=256, frames_per_clip=16, patch_size=16, tubelet_size=2, hidden_size=1024, num_attention_heads=16,
                          num_hidden_layers=24, pred_hidden_size=384, pred_num_attention_heads=12, pred_num_hidden_layers=12)
        B, frames, crop, keep = 8, 16, 256, 0.3
        ic = IJepaConfig(image_size=224, patch_size=14, hidden_size=1280, num_attention_heads=16, num_hidden_layers=32, intermediate_size=5120)
        iB = 32
    else:
        vc = VJEPA2Config(crop_size=64, frames_per_clip=4, patch_size=8, tubelet_size=2, hidden_size=96, num_attention_heads=4,
                          num_hidden_layers=4, pred_hidden_size=64, pred_num_attention_heads=4, pred_num_hidden_layers=2)
        B, frames, crop, keep = 4, 4, 64, 40 / 128
        ic = IJepaConfig(image_size=96, patch_size=16, hidden_size=96, num_attention_heads=3, num_hidden_layers=4, intermediate_size=384)
        iB = 8
    vjepa = VJEPA2Model(vc).to(device)
    N = (frames // 2) * (crop // vc.patch_size) ** 2
    clips = torch.randn(B, frames, 3, crop, crop, device=device)
    perm = torch.argsort(torch.rand(B, N, device=device), dim=1)
    kc = int(round(keep * N))
    cm, tm = perm[:, :kc].sort(1).values, perm[:, kc:].sort(1).values
    ijepa = IJepaModel(ic).to(device)
    images = torch.randn(iB, 3, ic.image_size, ic.image_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)

    def vjepa_step():
        vjepa.zero_grad(set_to_none=True)
        with amp:
            p = vjepa(clips, context_mask=[cm], target_mask=[tm]).predictor_output
            loss = (p.last_hidden_state - p.target_hidden_state.detach()).abs().mean()
        loss.backward()
        return [loss.detach()] + [q.grad for q in vjepa.parameters() if q.grad is not None]

    def vjepa_features():
        with torch.no_grad(), amp:
            return [vjepa.get_vision_features(clips)]

    def ijepa_features():
        with torch.no_grad(), amp:
            return [ijepa(images).last_hidden_state]

    return [
        ("vjepa2 step", vjepa_step, dict(batch=B, tokens=N, context=kc, targets=N - kc)),
        ("vjepa2 features", vjepa_features, dict(batch=B, tokens=N)),
        ("ijepa features", ijepa_features, dict(batch=iB, tokens=(ic.image_size // ic.patch_size) ** 2)),
    ]


def run(gpu: bool, reps: int) -> dict:
    transformers = import_transformers()
    integration = _integration()
    device = torch.device("cuda" if gpu else "cpu")
    rows = []
    for name, fn, info in setups(device, gpu):
        integration.revert()
        ref = [t.clone() for t in fn()]
        patched = integration.apply()
        new = fn()
        worst = max(_rel(a, b) for a, b in zip(ref, new))
        times = {"original": [], "patched": []}
        cpu = {"original": [], "patched": []}
        for _ in range(reps):
            for mode in ("original", "patched"):
                integration.revert() if mode == "original" else integration.apply()
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                _sync(device)
                times[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
        ms = {m: 1e3 * statistics.median(ts[1:] if len(ts) > 1 else ts) for m, ts in times.items()}
        cpu_ms = {m: 1e3 * statistics.median(ts[1:] if len(ts) > 1 else ts) for m, ts in cpu.items()}
        rows.append({"row": name, **info, "original_ms": ms["original"], "patched_ms": ms["patched"],
                     "speedup": ms["original"] / ms["patched"], "original_cpu_ms": cpu_ms["original"],
                     "patched_cpu_ms": cpu_ms["patched"], "cpu_speedup": cpu_ms["original"] / cpu_ms["patched"],
                     "max_rel_diff": worst, "n_tensors": len(ref),
                     "value_original": ref[0].float().mean().item(), "value_patched": new[0].float().mean().item()})  # fmt: skip
    integration.revert()
    return {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu", "dtype": "bf16 autocast" if gpu else "float32",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "patched": patched, "rows": rows,
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="ViT-L V-JEPA 2 / ViT-H I-JEPA shapes on CUDA, bf16 autocast")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per mode (default 15 CPU, 10 GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        print("bench_transformers: --gpu needs CUDA, which this torch does not see", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.gpu, args.reps or (10 if args.gpu else 15))
    print(f"{result['device']}, {result['dtype']}, {result['threads']} threads, torch {result['torch']}, transformers {result['transformers']}")
    for r in result["rows"]:
        print(f"  {r['row']:16s} batch {r['batch']:3d}, {r['tokens']:5d} tokens: original {r['original_ms']:8.2f} ms, "
              f"patched {r['patched_ms']:8.2f} ms, x{r['speedup']:.2f} (process CPU time x{r['cpu_speedup']:.2f}); max rel diff {r['max_rel_diff']:.1e} over {r['n_tensors']} tensors")  # fmt: skip
    print(f"  patched: {', '.join(result['patched'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the live health metrics cost: a log step with them against one without, interleaved.

    python benchmarks/bench_health.py                          # default-run and ViT-B/16 shapes
    python benchmarks/bench_health.py --shapes default --repeats 20 --out benchmarks/results --stem cpu-health

At every log step the trainer keeps the outputs of the target encoder, the context
encoder and the predictor (forward hooks), pools them, takes their stds and the
prediction-target cosine (in the step), and the RankMe SVDs of at most
``health.max_rows`` pooled rows (just before the log step's one host read). Between log
steps it does nothing. This script times, on one trainer and one batch:

* ``off``: a log step without health — ``Step.step(want_grads=True)`` and the read of its loss;
* ``on``: the same step with ``want_health=True``, the RankMe SVDs and the read of both;
* ``metrics``: the health work alone on the outputs of one step (pooling, stds, cosine,
  SVDs), which is what ``on`` adds (the hooks themselves only keep references).

``off`` and ``on`` alternate (on, off, off, on, ...) so that drifting machine load hits
both alike. Reported: the medians, the log step's overhead ``metrics / off`` and the
amortised overhead per step ``metrics / off / logging.log_freq``. On a shared, busy machine
the numbers are contended: the ratio from one interleaved run is what to quote.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _common import DEVICE, ON_GPU, sync  # sets TRITON_INTERPRET on CPU; puts the checkout on sys.path
from _report import cpu_name, write_report

from fastjepa import health
from fastjepa.config import load_config
from fastjepa.training.trainer import Trainer

COMMON = ["data.dataset=synthetic", "logging.probe=false", "logging.plots=false", "logging.tensorboard=false",
          "optimization.time_budget_s=null", f"meta.device={DEVICE.type}"]  # fmt: skip
SHAPES = {
    # the packaged default run (fastjepa/configs/default.yaml), on synthetic images of its size
    "default": [],
    # ViT-B/16 at 224 px, the published predictor; a small batch on a CPU (the cost per image is what matters)
    "vitb16": ["data.crop_size=224", "mask.patch_size=16", "mask.min_keep=10", "meta.model_name=vit_base", "meta.model_kwargs={}",
               "meta.pred_depth=6", "meta.pred_emb_dim=384", f"data.batch_size={64 if ON_GPU else 4}"],
    # a tiny model: proves the harness in seconds (tests)
    "tiny": ["data.crop_size=16", "data.batch_size=8", "mask.patch_size=4", "mask.min_keep=0", "meta.model_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
             "meta.pred_depth=1", "meta.pred_emb_dim=16"],
}  # fmt: skip


def _trainer(shape: str, tmp: str) -> tuple[Trainer, tuple]:
    cfg = load_config(None, [*COMMON, *SHAPES[shape], f"data.synthetic_samples={4 * 64}"])
    t = Trainer(cfg, tmp, quiet=True)
    udata, me, mp = next(iter(t._loader()))
    return t, t.stepper.to_device(udata, me, mp)


def _log_step(t: Trainer, batch: tuple, health: bool) -> None:
    with t.stepper.backend():
        r = t.stepper.step(*batch, index=0, want_grads=True, want_health=health)
    parts = [r.loss.reshape(1).double(), r.grads.double()]
    if health:
        parts.append(t.log.health_row(r.health))
    torch.cat(parts).tolist()  # the log step's one host read


def _metrics_only(t: Trainer, batch: tuple):
    """The health work of one log step, on outputs kept from one forward."""
    outputs: dict = {}
    hooks = t.stepper.health_hooks(outputs)
    try:
        with torch.no_grad(), t.stepper.backend():
            t.model(*batch)
    finally:
        for h in hooks:
            h.remove()
    masks_pred, nenc = batch[2], len(batch[1])

    def run():  # the hooks' pooling, the step's stds and cosine, the log step's SVDs
        fresh = {k: outputs[k] for k in ("target", "context", "pred")}
        fresh.update({f"{k}_pooled": [health.pooled(outputs[k])] for k in ("target", "context", "pred")})
        t.log.health_row(t.stepper.health_tensors(fresh, masks_pred, nenc)).tolist()

    return run


def _timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench_shape(shape: str, repeats: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t, batch = _trainer(shape, tmp)
        for _ in range(warmup):
            _log_step(t, batch, True)
            _log_step(t, batch, False)
        on, off = [], []
        for i in range(repeats):
            order = (True, False) if i % 2 == 0 else (False, True)
            for health in order:
                (on if health else off).append(_timed(lambda health=health: _log_step(t, batch, health)))
        metrics = _metrics_only(t, batch)
        for _ in range(warmup):
            metrics()
        cost = [_timed(metrics) for _ in range(max(repeats, 5))]
        cfg = t.cfg
    m_on, m_off, m_cost = statistics.median(on), statistics.median(off), statistics.median(cost)
    log_freq = cfg["logging"]["log_freq"]
    return {
        "shape": shape,
        "model": cfg["meta"]["model_name"],
        "model_kwargs": cfg["meta"]["model_kwargs"],
        "batch_size": cfg["data"]["batch_size"],
        "crop_size": cfg["data"]["crop_size"],
        "max_rows": cfg["health"]["max_rows"],
        "log_freq": log_freq,
        "repeats": repeats,
        "step_off_ms": 1e3 * m_off,
        "step_on_ms": 1e3 * m_on,
        "metrics_ms": 1e3 * m_cost,
        "on_vs_off": m_on / m_off,
        "log_step_overhead": m_cost / m_off,
        "per_step_overhead": m_cost / m_off / log_freq,
    }


def markdown(rows: list[dict], note: str) -> str:
    lines = [
        "# Cost of the live health metrics",
        "",
        f"{note}",
        "",
        "| shape | model | batch | step off (ms) | step on (ms) | on/off | health work (ms) | per log step | per step (÷ log_freq) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['model']} {r['model_kwargs'] or ''} | {r['batch_size']} | {r['step_off_ms']:.1f} | {r['step_on_ms']:.1f} | "
            f"{r['on_vs_off']:.3f} | {r['metrics_ms']:.2f} | {100 * r['log_step_overhead']:.2f}% | {100 * r['per_step_overhead']:.3f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="default,vitb16", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--repeats", type=int, default=10, help="timed log steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--contended", action="store_true", help="say in the report that the machine was shared while it ran")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default=f"{'gpu' if ON_GPU else 'cpu'}-health")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if ON_GPU else cpu_name()
    rows = []
    for shape in args.shapes.split(","):
        rows.append(bench_shape(shape.strip(), args.repeats, args.warmup))
        r = rows[-1]
        print(f"{shape}: off {r['step_off_ms']:.1f} ms, on {r['step_on_ms']:.1f} ms, health work {r['metrics_ms']:.2f} ms "
              f"({100 * r['log_step_overhead']:.2f}% of a log step, {100 * r['per_step_overhead']:.3f}% per step)", flush=True)  # fmt: skip
    note = (f"{device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
            + (" — CONTENDED: a shared machine, other jobs running; ratios from one interleaved run only" if args.contended else ""))  # fmt: skip
    md = write_report(args.out, args.stem, {"device": device, "contended": args.contended, "rows": rows}, markdown(rows, note))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

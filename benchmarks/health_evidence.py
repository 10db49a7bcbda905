"""Does RankMe pick the better checkpoint? Per-epoch RankMe beside the per-epoch probe.

    nice -n 10 python benchmarks/health_evidence.py --stem cpu-health-evidence-default
    nice -n 10 python benchmarks/health_evidence.py --config my.yaml --stem cpu-health-evidence-ema optimization.ema=[0.999,1.0]

Trains one run (a YAML config, default the packaged one, plus ``section.key=value``
overrides) with a checkpoint every epoch, then, for every epoch's target encoder and the
random initialisation, the quick probe of the end of training (linear probe and k-NN on
the embedded digits, ``--train-images`` training images, all 1,000 held-out ones scored)
and the centred effective rank of the held-out features. Beside each epoch: the live
``target_rankme`` the trainer logged at the epoch's last log step — the score it keeps
``<tag>-best.pth.tar`` by — and its mean over the epoch's log steps.

Writes ``<out>/<stem>.json`` and ``<stem>.md``: the per-epoch table, the Spearman rank
correlations of the per-epoch probe with the live RankMe and with the held-out
effective rank, and the probe of the best-by-RankMe checkpoint against the last epoch's
and the random init's (docs/eval.md, "Representation health"). The run folder stays
(``--run-dir``; default ``runs/health-evidence-<stem>``) for ``python -m fastjepa.plot``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("fastjepa") is None:  # a source checkout run as `python benchmarks/...`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _report import cpu_name, write_report  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from fastjepa.build import random_init_encoder  # noqa: E402
from fastjepa.checkpoint import read_checkpoint  # noqa: E402
from fastjepa.config import load_config  # noqa: E402
from fastjepa.encoder import load_run_encoder  # noqa: E402
from fastjepa.evaluation.classifiers import evaluate_encoder  # noqa: E402
from fastjepa.evaluation.features import eval_datasets  # noqa: E402
from fastjepa.training.trainer import Trainer  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side."""
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return None
    from scipy.stats import spearmanr

    xs, ys = zip(*pairs)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def live_rankme(run: Path) -> dict[int, dict[str, float]]:
    """Per epoch: the target RankMe of its last log step, and the mean over its log steps."""
    per: dict[int, list[float]] = {}
    with open(run / "log.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("target_rankme"):
                per.setdefault(int(row["epoch"]), []).append(float(row["target_rankme"]))
    return {e: {"last": v[-1], "mean": statistics.fmean(v)} for e, v in per.items()}


def fixed_batch(cfg: dict, rows: int = 64):
    """One batch of the run's training crops (its first ``rows``) and its autocast dtype:
    what the live health column sees, the same for every epoch."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp) / "r", quiet=True)
        udata, me, mp = next(iter(tr._loader()))
        return tr.stepper.to_device(udata, me, mp)[0][:rows], tr.amp_dtype


def batch_ranks(encoder, imgs, amp) -> dict[str, float]:
    """RankMe (as published) and the centred effective rank of ``encoder``'s pooled
    features on ``imgs`` under autocast ``amp`` — what the live column measures, for every
    epoch alike, whichever definition the run logged."""
    import torch

    from fastjepa import health

    encoder.eval()
    with torch.no_grad(), torch.autocast(imgs.device.type, dtype=amp, enabled=amp is not None):
        f = health.pooled(encoder(imgs))
    return {"rankme": float(health.rankme(f)), "centred": float(health.effective_rank(f, center=True))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config (default: the packaged one)")
    p.add_argument("--run-dir", help="training folder (default: runs/health-evidence-<stem>)")
    p.add_argument("--train-images", type=int, default=1000, help="probe training images (the end-of-run quick probe's 1,000)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="cpu-health-evidence-default")
    p.add_argument("--skip-training", action="store_true", help="evaluate an existing --run-dir again")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print one summary table of these reports (docs/eval.md) and exit")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    if args.table:
        print(summary_table(args.table))
        return 0
    overrides = [*args.overrides, "logging.checkpoint_freq=1", "logging.probe=false", "logging.plots=false"]
    cfg = load_config(args.config, overrides)
    run = Path(args.run_dir or f"runs/health-evidence-{args.stem}")
    t0 = time.perf_counter()
    if not args.skip_training:
        summary = Trainer(cfg, run, quiet=True).fit()
        print(f"trained {summary['epochs']} epoch(s) into {run} in {summary['wall_time_s']:.0f} s ({summary['status']})", flush=True)
    train_s = time.perf_counter() - t0
    cfg = load_config(run / "config.yaml")  # as resolved (the time budget may have changed the epochs)
    tag = cfg["logging"]["write_tag"]
    live = live_rankme(run)
    train, val, desc = eval_datasets(cfg, "embedded")
    train = Subset(train, range(min(args.train_images, len(train))))
    common = dict(layers=1, cache_dir=None, quiet=True)
    baseline = evaluate_encoder(random_init_encoder(cfg), train, val, name="random init", **common)
    paths = {e: run / f"{tag}-ep{e}.pth.tar" for e in range(1, cfg["optimization"]["epochs"] + 1)}
    paths = {e: p for e, p in paths.items() if p.is_file()}
    imgs, amp = fixed_batch(cfg)
    epochs = []
    for e, path in paths.items():
        encoder, _, _ = load_run_encoder(path)
        fixed = batch_ranks(encoder, imgs, amp)
        r = evaluate_encoder(encoder, train, val, name=f"epoch {e}", **common)
        row = {"epoch": e, "linear_probe_top1": r["linear_probe_top1"], "knn_top1": r["knn_top1"],
               "heldout_effective_rank": r["feature_effective_rank"], "target_rankme_last": live.get(e, {}).get("last", float("nan")),
               "target_rankme_mean": live.get(e, {}).get("mean", float("nan")),
               "batch_rankme": fixed["rankme"], "batch_centred_rank": fixed["centred"]}  # fmt: skip
        epochs.append(row)
        print(f"epoch {e}: probe {100 * row['linear_probe_top1']:.1f}%, k-NN {100 * row['knn_top1']:.1f}%, "
              f"live RankMe {row['target_rankme_last']:.2f}, held-out eff. rank {row['heldout_effective_rank']:.2f}", flush=True)  # fmt: skip
    best_path = run / f"{tag}-best.pth.tar"
    best_epoch = int(read_checkpoint(best_path)["epoch"]) if best_path.is_file() else None
    by_epoch = {r["epoch"]: r for r in epochs}
    probe = [r["linear_probe_top1"] for r in epochs]
    result = {
        "config": args.config or "default",
        "overrides": args.overrides,
        "data": desc,
        "probe_train_images": len(train),
        "device": cpu_name(),
        "train_wall_s": round(train_s, 1),
        "epochs": epochs,
        "random_init": {k: baseline[k] for k in ("linear_probe_top1", "knn_top1", "feature_effective_rank")},
        "spearman_probe_vs_live_rankme": spearman(probe, [r["target_rankme_last"] for r in epochs]),
        "spearman_probe_vs_live_rankme_mean": spearman(probe, [r["target_rankme_mean"] for r in epochs]),
        "spearman_probe_vs_heldout_effective_rank": spearman(probe, [r["heldout_effective_rank"] for r in epochs]),
        "spearman_probe_vs_batch_rankme": spearman(probe, [r["batch_rankme"] for r in epochs]),
        "spearman_probe_vs_batch_centred_rank": spearman(probe, [r["batch_centred_rank"] for r in epochs]),
        "best_epoch": best_epoch,
        "best": by_epoch.get(best_epoch),
        "last": epochs[-1] if epochs else None,
        "best_probe_epoch": max(epochs, key=lambda r: r["linear_probe_top1"])["epoch"] if epochs else None,
    }
    write_report(args.out, args.stem, result, markdown(result))
    print(f"wrote {Path(args.out) / args.stem}.md", flush=True)
    return 0


def summary_table(paths: list[str]) -> str:
    """One row per report: the kept (best-by-RankMe) checkpoint's probe against the last
    epoch's, the best epoch's and random init's, and the rank correlations."""
    import json

    lines = [
        "| settings (changes to the default) | epochs | random init | kept: epoch, probe | last epoch | best epoch's probe | Spearman with the probe: live / fixed-batch RankMe / fixed-batch centred / held-out centred |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        r = json.loads(Path(path).read_text())
        by_epoch = {e["epoch"]: e for e in r["epochs"]}
        best, last, top = r["best"], r["last"], by_epoch.get(r["best_probe_epoch"])
        name = " ".join(f"`{o}`" for o in r["overrides"] if o != "optimization.time_budget_s=null") or "none (the default)"
        lines.append(
            f"| {name} | {len(r['epochs'])} | {_pct(r['random_init']['linear_probe_top1'])} | "
            f"{r['best_epoch']}: {_pct(best and best['linear_probe_top1'])} | "
            f"{last and last['epoch']}: {_pct(last and last['linear_probe_top1'])} | "
            f"{top and top['epoch']}: {_pct(top and top['linear_probe_top1'])} | "
            f"{_num(r['spearman_probe_vs_live_rankme'])} / {_num(r.get('spearman_probe_vs_batch_rankme'))} / "
            f"{_num(r.get('spearman_probe_vs_batch_centred_rank'))} / {_num(r['spearman_probe_vs_heldout_effective_rank'])} |"
        )
    return "\n".join(lines)


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if v is not None else "–"


def _num(v, fmt=".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def markdown(r: dict) -> str:
    lines = [
        f"# RankMe vs probe — {r['config']} {' '.join(r['overrides'])}".rstrip(),
        "",
        f"{r['data']}; probe trained on {r['probe_train_images']} images, scored on the held-out 1,000; {r['device']}; "
        f"training {r['train_wall_s']} s.",
        "",
        "| epoch | linear probe | k-NN | live target RankMe (last log step) | (epoch mean) | fixed batch: RankMe | centred | held-out eff. rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ri = r["random_init"]
    lines.append(f"| random init | {_pct(ri['linear_probe_top1'])} | {_pct(ri['knn_top1'])} | – | – | – | – | {_num(ri['feature_effective_rank'])} |")
    for e in r["epochs"]:
        mark = " (best)" if e["epoch"] == r["best_epoch"] else ""
        lines.append(f"| {e['epoch']}{mark} | {_pct(e['linear_probe_top1'])} | {_pct(e['knn_top1'])} | {_num(e['target_rankme_last'])} | "
                     f"{_num(e['target_rankme_mean'])} | {_num(e.get('batch_rankme'), '.3f')} | {_num(e.get('batch_centred_rank'))} | "
                     f"{_num(e['heldout_effective_rank'])} |")  # fmt: skip
    best, last = r["best"], r["last"]
    lines += [
        "",
        f"Spearman (per-epoch probe vs): live RankMe {_num(r['spearman_probe_vs_live_rankme'])}, "
        f"its epoch mean {_num(r['spearman_probe_vs_live_rankme_mean'])}, fixed batch RankMe "
        f"{_num(r.get('spearman_probe_vs_batch_rankme'))} / centred {_num(r.get('spearman_probe_vs_batch_centred_rank'))}, "
        f"held-out effective rank {_num(r['spearman_probe_vs_heldout_effective_rank'])}.",
        "",
        f"Kept checkpoint (best by RankMe): epoch {r['best_epoch']}, probe {_pct(best and best['linear_probe_top1'])}; "
        f"last epoch {last and last['epoch']}: {_pct(last and last['linear_probe_top1'])}; random init {_pct(ri['linear_probe_top1'])}; "
        f"best probe of any epoch: epoch {r['best_probe_epoch']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

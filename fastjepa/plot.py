"""``python -m fastjepa.plot RUN_DIR``: PNG plots of a run's ``log.csv``.

Writes ``loss.png`` (loss per step with a moving average), ``schedules.png`` (lr, wd,
EMA momentum), ``throughput.png`` (images/s), ``health.png`` (the log steps' RankMe, stds and
prediction-target cosine, when the run logged them) and ``overview.png`` (all of them, the mask
sizes and, when the run has an ``eval.json``, the probe accuracies, in one figure) into
the run folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path


def read_log(run_dir: str | Path) -> dict[str, list[float]]:
    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a fastjepa run folder?")
    cols: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                try:
                    cols.setdefault(k, []).append(float(v))
                except (TypeError, ValueError):
                    cols.setdefault(k, []).append(float("nan"))
    if not cols.get("step"):
        raise ValueError(f"{path} has no rows yet")
    return cols


def _smooth(values: list[float], n: int) -> list[float]:
    out, acc, window = [], 0.0, []
    for v in values:
        window.append(v)
        acc += v
        if len(window) > n:
            acc -= window.pop(0)
        out.append(acc / len(window))
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNGs for ``run_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    log = read_log(run_dir)
    step = log["step"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(step, log["loss"], lw=0.6, alpha=0.4, label="loss")
    ax.plot(step, _smooth(log["loss"], max(1, len(step) // 50)), lw=1.8, label="moving average")
    ax.set(xlabel="step", ylabel="smooth-L1 loss", title=f"I-JEPA loss — {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(run_dir / "loss.png")
    fig.savefig(written[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=120)
    for ax, key, label in zip(axes, ("lr", "wd", "momentum"), ("learning rate", "weight decay", "EMA momentum")):
        ax.plot(step, log[key], lw=1.5)
        ax.set(xlabel="step", title=label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(run_dir / "schedules.png")
    fig.savefig(written[-1])
    plt.close(fig)

    pts = [(s, v) for s, v in zip(step, log["imgs_per_sec"]) if v == v]  # drop NaN (partial windows)
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=120)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1.2)
    ax.set(xlabel="step", ylabel="images / s", title="throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(run_dir / "throughput.png")
    fig.savefig(written[-1])
    plt.close(fig)

    written.append(plot_overview(run_dir, log))
    if any(math.isfinite(v) for v in log.get("target_rankme", [])):
        written.append(plot_health(run_dir, log))
    return written


def plot_health(run_dir: str | Path, log: dict[str, list[float]] | None = None) -> Path:
    """``health.png``: the log steps' RankMe and std of the target and context encoders'
    pooled features, the predictor outputs' std and the prediction-target cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    log = read_log(run_dir) if log is None else log
    step = log["step"]

    def series(key):
        pts = [(s, v) for s, v in zip(step, log.get(key, [])) if math.isfinite(v)]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    for ax, keys, title in (
        (axes[0], ("target_rankme", "context_rankme"), "RankMe of the pooled features"),
        (axes[1], ("target_std", "context_std", "pred_std"), "std across the batch (per dim., mean)"),
        (axes[2], ("pred_target_cos",), "cosine(prediction, target)"),
    ):
        for key in keys:
            x, y = series(key)
            ax.plot(x, y, marker=".", lw=1.2, label=key)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"representation health — {run_dir.name}", fontsize=11)
    fig.tight_layout()
    path = run_dir / "health.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _probe_text(run_dir: Path) -> str:
    path = run_dir / "eval.json"
    if not path.is_file():
        return ""
    try:
        res = json.loads(path.read_text())
        text = f"linear probe {100 * res['linear_probe_top1']:.1f}%, k-NN {100 * res['knn_top1']:.1f}%"
        base = res.get("random_init")
        if base:
            text += f"  (random init {100 * base['linear_probe_top1']:.1f}%, {100 * base['knn_top1']:.1f}%)"
        return text
    except (ValueError, KeyError, TypeError):
        return ""


def plot_overview(run_dir: str | Path, log: dict[str, list[float]] | None = None) -> Path:
    """One 2x3 figure of the run: loss, lr, wd, EMA momentum, throughput, mask sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    log = read_log(run_dir) if log is None else log
    step = log["step"]
    nan = [float("nan")] * len(step)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), dpi=110)
    ax = axes[0, 0]
    ax.plot(step, log["loss"], lw=0.6, alpha=0.35, color="C0")
    ax.plot(step, _smooth(log["loss"], max(1, len(step) // 50)), lw=1.8, color="C0")
    ax.set(title="loss (smooth-L1)", xlabel="step")
    if all(v > 0 for v in log["loss"] if math.isfinite(v)):
        ax.set_yscale("log")
    for ax, key, title, color in ((axes[0, 1], "lr", "learning rate", "C1"), (axes[0, 2], "wd", "weight decay", "C2"),
                                  (axes[1, 0], "momentum", "EMA momentum", "C3")):  # fmt: skip
        ax.plot(step, log.get(key, nan), lw=1.5, color=color)
        ax.set(title=title, xlabel="step")
    ax = axes[1, 1]
    pts = [(s, v) for s, v in zip(step, log.get("imgs_per_sec", nan)) if math.isfinite(v)]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1.2, color="C4")
    ax.set(title="throughput (images / s)", xlabel="step")
    ax = axes[1, 2]
    ax.plot(step, log.get("mask_enc", nan), lw=0.8, label="context")
    ax.plot(step, log.get("mask_pred", nan), lw=0.8, label="target")
    ax.set(title="mask sizes (patches per block)", xlabel="step")
    ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    title = f"fastjepa run {run_dir.name}"
    probe = _probe_text(run_dir)
    fig.suptitle(title + (f" — {probe}" if probe else ""), fontsize=11)
    fig.tight_layout()
    path = run_dir / "overview.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastjepa.plot", description="Plot a fastjepa run's log.csv to PNGs.")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    try:
        paths = plot_run(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fastjepa.plot: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

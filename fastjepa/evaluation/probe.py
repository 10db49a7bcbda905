"""The evaluation's report (the score table, ``eval.json``) and the quick probe that
``python -m fastjepa.train`` runs at the end of a run on the embedded digits (docs/eval.md)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, atomic_write_text, check_module_state, read_checkpoint
from ..build import config_encoder, random_init_encoder
from .classifiers import KNN_K, KNN_T, evaluate_encoder
from .features import default_cache_dir, eval_datasets, limit

QUICK_TRAIN = 1000  # quick_probe: training images used (all 1,000 held-out images are scored)


# -- reporting


def score_lines(rows: list[tuple[str, dict[str, Any]]], width: int) -> list[str]:
    """A header and one line per encoder: linear probe, k-NN and (when known) effective rank."""
    lines = [f"{'':{width}}  linear probe   k-NN (k={KNN_K})   eff. rank"]
    for name, r in rows:
        erank = r.get("feature_effective_rank")
        erank = f"{erank:12.1f}" if erank is not None else f"{'':12}"
        lines.append(f"{name:{width}}  {100 * r['linear_probe_top1']:10.1f} %  {100 * r['knn_top1']:10.1f} %{erank}")
    return lines


def format_table(result: dict[str, Any], baseline: dict[str, Any] | None, label: str) -> str:
    rows = [(label, result)]
    if baseline is not None and baseline is not result:
        rows.append(("random init", baseline))
    width = max(len(r[0]) for r in rows + [("difference", None)])
    lines = score_lines(rows, width)
    if len(rows) == 2:
        d_lin = 100 * (result["linear_probe_top1"] - baseline["linear_probe_top1"])
        d_knn = 100 * (result["knn_top1"] - baseline["knn_top1"])
        lines.append(f"{'difference':{width}}  {d_lin:+10.1f} pt {d_knn:+10.1f} pt")
    return "\n".join(lines)


def write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def model_summary(cfg: dict) -> dict[str, Any]:
    return {
        "model_name": cfg["meta"]["model_name"],
        "model_kwargs": cfg["meta"]["model_kwargs"],
        "patch_size": cfg["mask"]["patch_size"],
        "crop_size": cfg["data"]["crop_size"],
        "seed": cfg["meta"]["seed"],
    }


# -- quick probe at the end of training


def quick_probe(
    run_dir: str | os.PathLike, cfg: dict, *, quiet: bool | None = None, cache_dir: Path | None = None
) -> dict[str, Any]:
    """The end-of-training check on the embedded digits: the run's latest target encoder
    and its own random initialisation, linear probe and k-NN, trained on the first 1,000
    training digits and scored on the 1,000 held-out ones. Writes ``run_dir/eval.json``;
    returns the dict (with ``random_init`` inside). ``python -m fastjepa.eval`` uses all
    4,000 training digits and is the number to quote.

    About 10–20 s on a 2-core CPU for the default model; the random-init features are
    cached, so later runs of the same architecture and seed pay only for the trained ones.
    """
    run_dir = Path(run_dir)
    quiet = (not sys.stderr.isatty()) if quiet is None else quiet
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    ckpt_path = run_dir / f"{cfg['logging']['write_tag']}-latest.pth.tar"
    best_path = run_dir / f"{cfg['logging']['write_tag']}-best.pth.tar"
    encoder, ckpt = _quick_encoder(cfg, ckpt_path)
    train, val, desc = eval_datasets(cfg, "embedded")
    train = limit(train, QUICK_TRAIN)
    common = dict(layers=1, cache_dir=cache_dir, quiet=quiet)
    t0 = time.perf_counter()
    result = evaluate_encoder(encoder, train, val, name="trained", **common)
    baseline = evaluate_encoder(random_init_encoder(cfg), train, val, name="random init", **common)
    best = None
    if best_path.is_file():  # the kept checkpoint (highest target RankMe): probed too, unless it is the latest
        best_encoder, best_ckpt = _quick_encoder(cfg, best_path)
        same = best_ckpt.get("epoch") == ckpt.get("epoch")
        scores = result if same else evaluate_encoder(best_encoder, train, val, name="best", **common)
        best = {**scores, "epoch": best_ckpt.get("epoch"), "checkpoint": str(best_path), "same_as_latest": same,
                "target_rankme": best_ckpt.get("fastjepa", {}).get("health", {}).get("best_rankme")}  # fmt: skip
    out = {
        **result,
        "random_init": baseline,
        "best": best,
        "checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "evaluated": "checkpoint",
        "quick": True,
        "data": {"name": "embedded", "description": desc, "n_train": len(train), "n_val": len(val)},
        "model": model_summary(cfg),
        "layers": 1,
        "knn": {"k": KNN_K, "temperature": KNN_T},
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    write_json(run_dir / "eval.json", out)
    print(format_table(result, baseline, f"epoch {ckpt.get('epoch')}"), file=sys.stderr, flush=True)
    return out


def _quick_encoder(cfg: dict, path: Path) -> tuple[Any, dict[str, Any]]:
    """The target encoder of the run's checkpoint ``path`` (built from the run's own config),
    its tensors checked before they are loaded."""
    encoder = config_encoder(cfg)
    ckpt = read_checkpoint(path)
    if "target_encoder" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no 'target_encoder'")
    state = check_module_state(path, "target_encoder", ckpt["target_encoder"], encoder)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: 'target_encoder' does not fit the config's model: {exc}") from None
    return encoder, ckpt

"""``python -m fastjepa.eval --checkpoint PATH [--random-init] [--output DIR] [--data embedded|imagefolder]``

Frozen-feature evaluation of an I-JEPA **target encoder**: a linear probe and a k-NN
classifier on held-out images, with the same architecture at random initialisation
beside them as the baseline. Writes ``DIR/eval.json``; accuracies are fractions in [0, 1].
``--encoder context`` evaluates the checkpoint's context encoder instead (a diagnostic).

Features. Each image is resized to the model's crop size (no augmentation), encoded by
the target encoder (the network the paper evaluates), and its output tokens are
average-pooled: (B, N, D) -> (B, D), as the paper's linear evaluation. ``--layers 4``
instead concatenates the pooled tokens of the last four blocks, each passed through the
encoder's final LayerNorm, (B, 4·D). Features are extracted once, in batches, and cached
on disk keyed by a digest of the weights, of the data and of the settings, so a second
evaluation of the same checkpoint (or the same random init) costs only the probe.

Linear probe: scikit-learn's ``LogisticRegression`` (L-BFGS, multinomial, L2) on
standardised features. Why this and not a PyTorch probe trained by SGD:

* it is a convex problem solved to convergence by a well-kept library: no learning rate,
  epochs or batch size to tune, the same answer on every run and every machine;
* standardising (zero mean, unit variance per feature, fitted on the training split)
  puts every feature on the same scale, so L-BFGS converges in tens of iterations and the
  single L2 strength ``C`` means the same thing for any encoder width or layer. Raw ViT
  features have a few channels orders of magnitude larger than the rest; without it the
  solver crawls and the penalty mostly ignores the small channels;
* ``C`` is picked from a short grid on a held-out fifth of the training features, then
  the probe is refitted on all of them (``--C`` fixes it instead).

At the feature sizes this evaluation is meant for (up to ~10^5 images × a few thousand
dimensions) it runs in seconds to minutes on a CPU; for ImageNet-scale probes use a
GPU-trained probe instead.

k-NN: cosine similarity between L2-normalised raw features, the k = 20 nearest training
images vote with weight ``exp(sim / T)``, T = 0.07 (the weighted k-NN of Wu et al. 2018
and DINO).

Checkpoints: a fastjepa checkpoint carries its resolved config (``ckpt["fastjepa"]["config"]``),
which builds the model. A reference I-JEPA checkpoint (keys ``encoder``, ``predictor``,
``target_encoder``, with or without ``module.``) has no config: the architecture comes
from ``--config`` and ``section.key=value`` overrides, or, without them, is read off the
weights' shapes (width, depth, patch, image size, MLP ratio; the head count is the
standard one for that width). ``--random-init`` evaluates only the random initialisation
(the run's own step-0 weights: ``meta.seed`` seeds them exactly as training does).
An encoder exported with ``python -m fastjepa.checkpoint export`` (``.safetensors``) is
rebuilt from the architecture in its metadata. Checkpoints are opened weights-only (no
code in a file runs); ``--trust-checkpoint`` opens one that needs more, with a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .checkpoint import CheckpointError, atomic_write_text, read_checkpoint, resolve_run_checkpoint, strip_module_prefix
from .config import ConfigError, load_config

# the features and classifiers live in fastjepa/evaluation/; they are this module's API too
from .evaluation.classifiers import (  # noqa: F401
    C_GRID,
    KNN_K,
    KNN_T,
    effective_rank,
    evaluate_encoder,
    knn_classify,
    knn_top1,
    linear_probe,
)
from .evaluation.features import (  # noqa: F401
    ENCODER_KEYS,
    FEATURE_VERSION,
    EvalError,
    _build_encoder,
    _limit,
    cached_features,
    dataset_fingerprint,
    default_cache_dir,
    describe_model,
    eval_datasets,
    extract_features,
    infer_architecture,
    load_target_encoder,
    random_init_encoder,
    weights_fingerprint,
)

QUICK_TRAIN = 1000  # quick_probe: training images used (all 1,000 held-out images are scored)


# -- reporting


def _score_lines(rows: list[tuple[str, dict[str, Any]]], width: int) -> list[str]:
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
    lines = _score_lines(rows, width)
    if len(rows) == 2:
        d_lin = 100 * (result["linear_probe_top1"] - baseline["linear_probe_top1"])
        d_knn = 100 * (result["knn_top1"] - baseline["knn_top1"])
        lines.append(f"{'difference':{width}}  {d_lin:+10.1f} pt {d_knn:+10.1f} pt")
    return "\n".join(lines)


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _model_summary(cfg: dict) -> dict[str, Any]:
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
    train = _limit(train, QUICK_TRAIN)
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
        "model": _model_summary(cfg),
        "layers": 1,
        "knn": {"k": KNN_K, "temperature": KNN_T},
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    _write_json(run_dir / "eval.json", out)
    print(format_table(result, baseline, f"epoch {ckpt.get('epoch')}"), file=sys.stderr, flush=True)
    return out


def _quick_encoder(cfg: dict, path: Path) -> tuple[Any, dict[str, Any]]:
    """The target encoder of the run's checkpoint ``path`` (the run's own config)."""
    encoder = _build_encoder(cfg)
    ckpt = read_checkpoint(path)
    if "target_encoder" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no 'target_encoder'")
    try:
        encoder.load_state_dict(strip_module_prefix(ckpt["target_encoder"]), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: 'target_encoder' does not fit the config's model: {exc}") from None
    return encoder, ckpt


# -- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastjepa.eval",
        description="Linear probe and k-NN on frozen target-encoder features, beside the random-init baseline.",
        epilog="example: python -m fastjepa.eval --checkpoint runs/a/jepa-latest.pth.tar --output runs/a/eval",
    )
    p.add_argument(
        "--checkpoint",
        help="a fastjepa checkpoint, a reference I-JEPA one (keys encoder/predictor/target_encoder), an encoder "
        "exported to .safetensors (python -m fastjepa.checkpoint export), or a run folder (its <tag>-best.pth.tar, "
        "the epoch with the highest target RankMe, else its <tag>-latest.pth.tar); opened weights-only",
    )
    p.add_argument("--latest", action="store_true", help="with a run folder: its latest checkpoint, not the best")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="open a checkpoint that needs more than a weights-only load (it can run code: only for files you trust)",
    )
    p.add_argument("--random-init", action="store_true", help="evaluate the random initialisation only (the baseline)")
    p.add_argument(
        "--encoder",
        choices=tuple(ENCODER_KEYS),
        default="target",
        help="which network of the checkpoint: the target encoder (default; the paper's protocol) or the context "
        "encoder (diagnostic: does the student collapse before the EMA target does?)",
    )
    p.add_argument(
        "--epochs",
        help="evaluate a run's per-epoch checkpoints (<tag>-ep<N>.pth.tar in --checkpoint's folder, or --checkpoint "
        "itself when it is a run folder): 'all' or a list like 1,2,5; one row per epoch, with the effective rank "
        "that shows collapse (train with logging.checkpoint_freq=1 to keep every epoch)",
    )
    p.add_argument("--output", help="folder for eval.json (default: the checkpoint's folder, else eval/)")
    p.add_argument(
        "--data", choices=("embedded", "imagefolder"), help="evaluation data (default: embedded, or the config's image folders)"
    )
    p.add_argument("--train-dir", help="imagefolder: training images, <class>/<image>")
    p.add_argument("--val-dir", help="imagefolder: held-out images, same class folders")
    p.add_argument("--config", help="YAML config for the architecture (needed for --random-init without a checkpoint)")
    p.add_argument(
        "--layers", type=int, choices=(1, 4), default=1, help="pooled tokens of the last layer, or the last 4 concatenated"
    )
    p.add_argument("--C", type=float, help=f"fix the probe's inverse L2 strength (default: picked from {list(C_GRID)})")
    p.add_argument("--batch-size", type=int, default=256, help="images per feature-extraction batch")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--limit-train", type=int, help="use only the first N training images")
    p.add_argument("--limit-val", type=int, help="use only the first N held-out images")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--cache-dir", help="feature cache folder (default: $FASTJEPA_CACHE/features or ~/.cache/fastjepa/features)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    p.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides (architecture of a reference checkpoint)"
    )
    return p.parse_intermixed_args(argv)  # options may come between the overrides


def _eval_setup(args: argparse.Namespace, cfg: dict, quiet: bool) -> tuple[Dataset, Dataset, str, dict[str, Any]]:
    """The command line's data (limited as asked) and the keyword arguments of :func:`evaluate_encoder`."""
    from .trainer import pick_device

    train, val, desc = eval_datasets(cfg, args.data, args.train_dir, args.val_dir)
    train, val = _limit(train, args.limit_train), _limit(val, args.limit_val)
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    common = dict(
        layers=args.layers,
        device=pick_device(args.device, "--device {}"),
        batch_size=args.batch_size,
        cache_dir=cache_dir,
        C=args.C,
        quiet=quiet,
    )
    return train, val, desc, common


def _encoder_note(args: argparse.Namespace) -> str:
    """What a table row adds to its label when the context encoder was asked for."""
    return ", context encoder" if args.encoder == "context" else ""


def _run_fields(args: argparse.Namespace, cfg: dict, desc: str, train: Dataset, val: Dataset, t0: float) -> dict[str, Any]:
    """The eval.json fields every command-line evaluation writes: data, model, settings, time."""
    return {
        "data": {"name": args.data or "auto", "description": desc, "n_train": len(train), "n_val": len(val)},
        "model": _model_summary(cfg),
        "layers": args.layers,
        "encoder": "random_init" if args.random_init else args.encoder,
        "knn": {"k": KNN_K, "temperature": KNN_T},
        "quick": False,
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }


_EPOCH_FILE = re.compile(r"^(?P<tag>.+)-ep(?P<epoch>\d+)\.pth\.tar$")


def epoch_checkpoints(where: str | os.PathLike, epochs: str) -> list[tuple[int, Path]]:
    """The per-epoch checkpoints of a run, ``[(epoch, path)]`` in epoch order.

    ``where``: the run folder, or any checkpoint inside it. ``epochs``: ``"all"`` or a
    comma-separated list of epoch numbers, each of which must have a checkpoint.
    """
    where = Path(where)
    folder = where if where.is_dir() else where.parent
    if not folder.is_dir():
        raise EvalError(f"--epochs: {where} is neither a run folder nor a checkpoint inside one")
    found: dict[int, Path] = {}
    for path in sorted(folder.glob("*-ep*.pth.tar")):
        m = _EPOCH_FILE.match(path.name)
        if m:
            found.setdefault(int(m["epoch"]), path)
    if not found:
        raise EvalError(
            f"--epochs: {folder} holds no <tag>-ep<N>.pth.tar checkpoints; a run keeps one every "
            "logging.checkpoint_freq epochs (train with logging.checkpoint_freq=1 to keep them all)"
        )
    if epochs.strip().lower() == "all":
        return sorted(found.items())
    try:
        wanted = sorted({int(e) for e in epochs.split(",") if e.strip()})
    except ValueError:
        raise EvalError(f"--epochs={epochs!r}: expected 'all' or epoch numbers like 1,2,5") from None
    missing = [e for e in wanted if e not in found]
    if missing or not wanted:
        raise EvalError(
            f"--epochs={epochs!r}: no checkpoint for epoch(s) {missing or wanted} in {folder}; it has {sorted(found)}"
        )
    return [(e, found[e]) for e in wanted]


def format_epochs(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One line per encoder (random init, then each epoch): linear probe, k-NN and effective rank."""
    return "\n".join(_score_lines(rows, max(len(name) for name, _ in rows)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet = args.quiet or not sys.stderr.isatty()
    if args.epochs is not None:
        return run_epochs(args, quiet)
    if args.checkpoint is not None and Path(args.checkpoint).is_dir():
        # a run folder: its best checkpoint (highest target RankMe), else its latest; --latest: the latest
        folder = Path(args.checkpoint)
        picked = resolve_run_checkpoint(folder, "latest" if args.latest else "best")
        why = " (the epoch with the highest target RankMe; --latest for the latest)" if picked.name.endswith("-best.pth.tar") else ""
        print(f"fastjepa.eval: {folder} is a run folder: evaluating {picked.name}{why}", file=sys.stderr, flush=True)
        args.checkpoint = str(picked)
    if args.checkpoint is None and not args.random_init:
        raise EvalError("no --checkpoint given: pass --checkpoint runs/<run>/jepa-latest.pth.tar, or --random-init --config FILE")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        hint = Path(args.checkpoint)
        near = sorted(hint.parent.glob("*.pth.tar")) if hint.parent.is_dir() else []
        also = f" ({hint.parent} holds: {', '.join(p.name for p in near[:5])})" if near else ""
        raise EvalError(
            f"checkpoint {args.checkpoint} does not exist{also}: pass the .pth.tar a training run wrote "
            "(e.g. runs/<run>/jepa-latest.pth.tar), or --random-init --config FILE for the baseline alone"
        )
    info: dict[str, Any] = {}
    if args.checkpoint is not None:
        encoder, cfg, info = load_target_encoder(args.checkpoint, args.config, args.overrides, args.encoder, trust=args.trust_checkpoint)
    else:
        cfg, encoder = load_config(args.config, args.overrides), None
    train, val, desc, common = _eval_setup(args, cfg, quiet)
    print(f"fastjepa.eval: {describe_model(cfg)} on {desc}, {common['device']}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    baseline = None
    if args.random_init or not args.no_baseline:
        baseline = evaluate_encoder(random_init_encoder(cfg), train, val, name="random init", **common)
    if args.random_init:
        result, label = baseline, "random init"
    else:
        result = evaluate_encoder(encoder, train, val, name="checkpoint", **common)
        label = f"checkpoint (epoch {info.get('epoch')}{_encoder_note(args)})"
    out: dict[str, Any] = {
        **result,
        "random_init": baseline,
        "evaluated": "random_init" if args.random_init else "checkpoint",
        "checkpoint": info or None,
        **_run_fields(args, cfg, desc, train, val, t0),
    }
    output = Path(args.output) if args.output else (Path(args.checkpoint).parent if args.checkpoint else Path("eval"))
    _write_json(output / "eval.json", out)
    print(format_table(result, baseline, label), flush=True)
    print(f"fastjepa.eval: wrote {output / 'eval.json'}", file=sys.stderr, flush=True)
    return out


def run_epochs(args: argparse.Namespace, quiet: bool) -> dict[str, Any]:
    """``--epochs``: every chosen epoch's encoder (``--encoder``), and the random init, in one table."""
    if args.checkpoint is None or args.random_init:
        raise EvalError("--epochs needs --checkpoint RUN_FOLDER (or a checkpoint in it), and not --random-init")
    chosen = epoch_checkpoints(args.checkpoint, args.epochs)
    t0 = time.perf_counter()
    trust = args.trust_checkpoint
    encoder, cfg, info = load_target_encoder(chosen[0][1], args.config, args.overrides, args.encoder, trust=trust)  # its config: data, baseline
    train, val, desc, common = _eval_setup(args, cfg, quiet)
    print(
        f"fastjepa.eval: {describe_model(cfg)} on {desc}, {common['device']}, epochs {[e for e, _ in chosen]}",
        file=sys.stderr,
        flush=True,
    )
    rows: list[tuple[str, dict[str, Any]]] = []
    if not args.no_baseline:
        rows.append(("random init", evaluate_encoder(random_init_encoder(cfg), train, val, name="random init", **common)))
    per_epoch: list[dict[str, Any]] = []
    for i, (epoch, path) in enumerate(chosen):
        if i:  # the first one is loaded above
            encoder, _, info = load_target_encoder(path, args.config, args.overrides, args.encoder, trust=trust)
        result = evaluate_encoder(encoder, train, val, name=f"epoch {epoch}", **common)
        rows.append((f"epoch {epoch}{_encoder_note(args)}", result))
        per_epoch.append({"epoch": epoch, **result, "checkpoint": info})
    baseline = rows[0][1] if not args.no_baseline else None
    out: dict[str, Any] = {
        **per_epoch[-1],  # the top-level numbers are the last chosen epoch's
        "epochs": per_epoch,
        "random_init": baseline,
        "evaluated": "epochs",
        **_run_fields(args, cfg, desc, train, val, t0),
    }
    folder = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    output = Path(args.output) if args.output else folder
    _write_json(output / "eval.json", out)
    print(format_epochs(rows), flush=True)
    print(f"fastjepa.eval: wrote {output / 'eval.json'}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (EvalError, CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"fastjepa.eval: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fastjepa.eval --checkpoint PATH [--random-init] [--output DIR] [--data embedded|imagefolder]``

Frozen-feature evaluation of an I-JEPA target encoder (``--encoder context``: the context
encoder): a linear probe and a k-NN classifier on held-out images, beside the same
architecture at random initialisation. Writes ``DIR/eval.json``; accuracies are fractions
in [0, 1]. The features, the probe, the k-NN and how a checkpoint's architecture is found
are defined in docs/eval.md.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .architecture import describe_model
from .build import pick_device, random_init_encoder
from .checkpoint import ENCODER_KEYS, CheckpointError
from .config import ConfigError, load_config, one_line, os_error_line
from .data import NoReadableImage
from .encoder import EvalError, load_run_encoder
from .evaluation.classifiers import C_GRID, KNN_K, KNN_T, evaluate_encoder
from .evaluation.features import default_cache_dir, eval_datasets, limit
from .evaluation.probe import format_table, model_summary, score_lines, write_json


# -- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastjepa.eval",
        description="Linear probe and k-NN on frozen target-encoder features, beside the random-init baseline.",
        epilog="example: python -m fastjepa.eval --checkpoint runs/a/jepa-latest.pth.tar --output runs/a/eval",
    )
    p.add_argument(
        "--checkpoint",
        help="a run folder (its best, else latest checkpoint), a fastjepa checkpoint, a reference I-JEPA one (keys "
        "encoder/predictor/target_encoder), an encoder exported to .safetensors (python -m fastjepa.checkpoint export), "
        "a Hugging Face IJepaModel folder or its model.safetensors, or a timm ViT state dict; opened weights-only",
    )
    p.add_argument("--latest", action="store_true", help="with a run folder: its latest checkpoint, not the best (highest target RankMe)")
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
    train, val, desc = eval_datasets(cfg, args.data, args.train_dir, args.val_dir)
    train, val = limit(train, args.limit_train), limit(val, args.limit_val)
    check_classes(train, desc)
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
        "model": model_summary(cfg),
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
    return "\n".join(score_lines(rows, max(len(name) for name, _ in rows)))


def check_options(args: argparse.Namespace) -> None:
    """The command line's numbers and output folder, checked before any work: a bad one is
    one :class:`EvalError` line instead of an error after every feature was extracted."""
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size}: expected an integer >= 1")
    if args.C is not None and not (math.isfinite(args.C) and args.C > 0):
        raise EvalError(f"--C {args.C}: expected a finite number > 0 (the probe's inverse L2 strength)")
    for name in ("limit_train", "limit_val"):
        n = getattr(args, name)
        if n is not None and n < 1:
            raise EvalError(f"--{name.replace('_', '-')} {n}: expected an integer >= 1")
    out = _output_folder(args)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--output {out} is a file: eval.json goes into a folder; pass a folder")
    if args.output is not None or args.checkpoint is None or Path(args.checkpoint).exists():
        _check_writable(out)


def _output_folder(args: argparse.Namespace) -> Path:
    """Where eval.json goes: --output, else the checkpoint's folder (the run folder with
    --epochs), else eval/."""
    if args.output:
        return Path(args.output)
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        return ckpt if ckpt.is_dir() else ckpt.parent
    return Path("eval")


def _check_writable(folder: Path) -> None:
    """Raise EvalError unless a file can be created in ``folder`` (or, when it does not exist
    yet, in the nearest folder above it that does): an unnamed scratch file, nothing left."""
    where = folder
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        raise EvalError(f"cannot write eval.json into {folder}: {os_error_line(exc)}") from None


def _labels(ds: Dataset) -> list[int] | None:
    """The labels of an evaluation dataset without reading its images (None: unknown)."""
    from torch.utils.data import Subset

    from .data import EmbeddedMNIST, ImageFolder

    if isinstance(ds, Subset):
        inner = _labels(ds.dataset)
        return None if inner is None else [inner[i] for i in ds.indices]
    if isinstance(ds, ImageFolder):
        return [label for _, label in ds.samples]
    if isinstance(ds, EmbeddedMNIST):
        return ds.labels.tolist()
    return None


def check_classes(train: Dataset, desc: str) -> None:
    """A probe needs at least two classes among its training images."""
    labels = _labels(train)
    if labels is not None and len(set(labels)) < 2:
        raise EvalError(
            f"the training images ({desc}, {len(labels)} image(s)) hold one class: a probe needs at least two "
            "(<class>/<image> folders, one per class; or raise --limit-train)"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet = args.quiet or not sys.stderr.isatty()
    check_options(args)
    if args.epochs is not None:
        return run_epochs(args, quiet)
    if args.checkpoint is None and not args.random_init:
        raise EvalError("no --checkpoint given: pass --checkpoint runs/<run>/jepa-latest.pth.tar, or --random-init --config FILE")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        hint = Path(args.checkpoint)
        near = sorted(hint.parent.glob("*.pth.tar")) if hint.parent.is_dir() else []
        also = f" ({hint.parent} holds: {', '.join(p.name for p in near[:5])})" if near else ""
        raise EvalError(
            f"checkpoint {args.checkpoint} does not exist{also}: pass the .pth.tar a training run wrote "
            "(e.g. runs/<run>/jepa-latest.pth.tar), or --random-init --config FILE for the baseline alone"
        )
    info: dict[str, Any] = {}
    if args.checkpoint is not None:
        encoder, cfg, info = load_run_encoder(
            args.checkpoint, args.config, args.overrides, args.encoder, trust=args.trust_checkpoint, prefer="latest" if args.latest else "best"
        )
        if info.get("chosen"):
            why = " (the epoch with the highest target RankMe; --latest for the latest)" if info["chosen"] == "best" else ""
            print(f"fastjepa.eval: {args.checkpoint} is a run folder: evaluating {Path(info['path']).name}{why}", file=sys.stderr, flush=True)
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
    output = _output_folder(args)
    write_json(output / "eval.json", out)
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
    encoder, cfg, info = load_run_encoder(chosen[0][1], args.config, args.overrides, args.encoder, trust=trust)  # its config: data, baseline
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
            encoder, _, info = load_run_encoder(path, args.config, args.overrides, args.encoder, trust=trust)
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
    output = _output_folder(args)
    write_json(output / "eval.json", out)
    print(format_epochs(rows), flush=True)
    print(f"fastjepa.eval: wrote {output / 'eval.json'}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (EvalError, CheckpointError, ConfigError, FileNotFoundError, NoReadableImage) as exc:
        print(f"fastjepa.eval: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment: a read-only or full disk
        print(f"fastjepa.eval: {os_error_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

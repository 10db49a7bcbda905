"""``python -m fastjepa.checkpoint export|convert``: share an encoder as ``.safetensors`` or
as a Hugging Face / timm folder (:func:`fastjepa.encoder.export_encoder`), rewrite a checkpoint of an earlier fastjepa so that it loads weights-only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError
from ..encoder import EXPORT_FORMATS, EvalError, export_encoder
from .core import ENCODER_KEYS, CheckpointError, resolve_run_checkpoint
from .tools import ARCH_FIELDS, convert_checkpoint


def _parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="python -m fastjepa.checkpoint",
        description="Checkpoint tools: share an encoder as safetensors, rewrite an old checkpoint to load weights-only.",
    )
    sub = top.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "export",
        help="write a run's target encoder to a .safetensors file, a Hugging Face IJepaModel folder or a timm folder",
        description="Write the target encoder of a run folder or checkpoint to OUT.safetensors (parameter names as "
        "the reference's, the architecture in the metadata; load_encoder and fastjepa.eval read it), or with "
        "--format hf to a folder that transformers' IJepaModel.from_pretrained(OUT) loads, or with --format timm to "
        "a folder for timm.create_model('local-dir:OUT', pretrained=True); both folders carry a model card (README.md).",
    )
    ex.add_argument(
        "source",
        metavar="RUN_OR_FILE",
        help="a run folder (its <tag>-best.pth.tar, else <tag>-latest.pth.tar), a checkpoint, or any file fastjepa.load_encoder reads",
    )
    ex.add_argument("output", metavar="OUT")
    ex.add_argument("--latest", action="store_true", help="from a run folder: its latest checkpoint, not the best (highest target RankMe)")
    ex.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        help="safetensors (default for OUT.safetensors), hf (transformers IJepaModel folder) or timm (timm model folder)",
    )
    ex.add_argument(
        "--which", "--encoder", dest="encoder", choices=tuple(ENCODER_KEYS), default="target", help="which network (default: target)"
    )
    ex.add_argument("--config", help="YAML config for the architecture of a reference checkpoint (default: its weight shapes)")
    ex.add_argument("--trust-checkpoint", action="store_true", help="open a checkpoint that needs more than weights-only (it may run code)")
    ex.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="architecture overrides for a reference checkpoint")
    cv = sub.add_parser(
        "convert",
        help="rewrite a checkpoint of an earlier fastjepa (or a trusted one) so that it loads weights-only",
        description="Rewrite OLD as NEW, which loads weights-only. Checkpoints of earlier fastjepa versions convert as "
        "they are; any other file that needs more than weights-only takes --trust-checkpoint.",
    )
    cv.add_argument("old", metavar="OLD")
    cv.add_argument("new", metavar="NEW")
    cv.add_argument("--trust-checkpoint", action="store_true", help="open OLD even if it needs more than the NumPy array types")
    if not argv or argv[0] not in sub.choices:
        return top.parse_args(argv)  # help, or the error naming the commands
    args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])  # options may come between the overrides
    args.command = argv[0]
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)

    try:
        prefer = "latest" if getattr(args, "latest", False) else "best"
        if args.command == "export" and Path(args.source).is_dir() and any(Path(args.source).glob("*.pth.tar")):
            picked = resolve_run_checkpoint(args.source, prefer)
            why = " (the epoch with the highest target RankMe; --latest for the latest)" if picked.name.endswith("-best.pth.tar") else ""
            print(f"fastjepa.checkpoint: {args.source} is a run folder: exporting {picked.name}{why}", file=sys.stderr)
        if args.command == "export":
            out = export_encoder(
                args.source, args.output, format=args.format or "safetensors", which=args.encoder, config=args.config,
                overrides=args.overrides, trust=args.trust_checkpoint, prefer=prefer,
            )  # fmt: skip
            if out["format"] == "safetensors":
                meta = out["metadata"]
                arch = ", ".join(f"{k} {meta[k]}" for k in ARCH_FIELDS)
                print(f"fastjepa.checkpoint: wrote {args.output}: {meta['network']}, {meta['model_name']} ({arch})")
            else:
                arch = ", ".join(f"{k} {v}" for k, v in out["arch"].items())
                print(f"fastjepa.checkpoint: wrote {args.output}/ ({args.format}: config.json, model.safetensors, README.md): "
                      f"{out['info']['network']} of {out['info'].get('checkpoint') or out['info']['path']} ({arch})")  # fmt: skip
        else:
            how = convert_checkpoint(args.old, args.new, trust=args.trust_checkpoint)
            print(f"fastjepa.checkpoint: wrote {args.new} ({how})")
    except (CheckpointError, ConfigError, EvalError, FileNotFoundError) as exc:
        print(f"fastjepa.checkpoint: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fastjepa.checkpoint export|convert``: share an encoder as ``.safetensors``,
rewrite a checkpoint of an earlier fastjepa so that it loads weights-only."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..encoder import EvalError, export_encoder
from .core import CheckpointError
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
        help="write a run's target encoder (with its architecture) to a .safetensors file",
        description="Write the target encoder of a run folder or checkpoint to OUT.safetensors, parameter names as "
        "the reference's, the architecture in the metadata (load_encoder and fastjepa.eval read it).",
    )
    ex.add_argument("source", metavar="RUN_OR_FILE", help="a run folder (its <tag>-latest.pth.tar) or a checkpoint file")
    ex.add_argument("output", metavar="OUT.safetensors")
    ex.add_argument("--encoder", choices=("target", "context"), default="target", help="which network (default: target)")
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
        if args.command == "export":
            meta = export_encoder(
                args.source, args.output, which=args.encoder, config=args.config, overrides=args.overrides, trust=args.trust_checkpoint
            )
            arch = ", ".join(f"{k} {meta[k]}" for k in ARCH_FIELDS)
            print(f"fastjepa.checkpoint: wrote {args.output}: {meta['network']}, {meta['model_name']} ({arch})")
        else:
            how = convert_checkpoint(args.old, args.new, trust=args.trust_checkpoint)
            print(f"fastjepa.checkpoint: wrote {args.new} ({how})")
    except (CheckpointError, ConfigError, EvalError, FileNotFoundError) as exc:
        print(f"fastjepa.checkpoint: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

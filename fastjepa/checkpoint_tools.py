"""Sharing an encoder and upgrading old files: the tools beside :mod:`fastjepa.checkpoint`.

* safetensors: ``export_encoder`` writes one network (the target encoder by default) under
  the reference's parameter names with its architecture in the metadata;
  ``read_safetensors`` / ``check_architecture`` read it back for ``load_encoder`` and
  ``python -m fastjepa.eval``.
* ``convert_checkpoint``: rewrites a checkpoint of an earlier fastjepa (NumPy's RNG state
  pickled as an array) as a weights-only file, once.
* ``main``: ``python -m fastjepa.checkpoint export|convert``.

Everything here reads through :mod:`fastjepa.checkpoint`'s one weights-only loader; these
names are re-exported there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import (
    ENCODER_FORMAT,
    ENCODER_FORMAT_VERSION,
    FORMAT_VERSION,
    OLD_NUMPY_GLOBALS,
    SAFETENSORS_SUFFIX,
    CheckpointError,
    UnsafeCheckpointError,
    _damaged,
    _torch_load,
    _unwrap,
    atomic_save,
    atomic_write,
    numpy_rng_to_plain,
    plain,
    read_checkpoint,
    resolve_run_checkpoint,
    strip_module_prefix,
)

# -- safetensors: one encoder with its architecture, for sharing

ENCODER_FLAG = {"target_encoder": "target", "encoder": "context"}
ARCH_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size", "in_chans")


def int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "", "None") else None
    except ValueError:
        return None


def encoder_architecture(encoder: nn.Module) -> dict[str, Any]:
    """What rebuilding ``encoder`` (a fastjepa / reference ViT) takes, read off the module:
    width, depth, heads, MLP ratio, patch and image size, input channels."""
    enc = _unwrap(encoder)
    try:
        embed_dim = int(enc.embed_dim)
        fc1 = enc.blocks[0].mlp.fc1 if len(enc.blocks) else None
        return {
            "embed_dim": embed_dim,
            "depth": len(enc.blocks),
            "num_heads": int(enc.num_heads),
            "mlp_ratio": float(fc1.out_features / embed_dim) if fc1 is not None else None,
            "patch_size": int(enc.patch_embed.patch_size),
            "img_size": int(enc.patch_embed.img_size),
            "in_chans": int(enc.patch_embed.proj.in_channels),
        }
    except AttributeError as exc:
        raise CheckpointError(f"{type(enc).__name__} is not a fastjepa VisionTransformer encoder ({exc})") from None


def encoder_metadata(encoder: nn.Module, cfg: Mapping[str, Any], *, network: str = "target_encoder", epoch: Any = None, source: str = "") -> dict[str, str]:
    """The safetensors metadata of an exported encoder (all values strings)."""
    from . import __version__

    arch = encoder_architecture(encoder)
    meta = {
        "format": ENCODER_FORMAT,
        "format_version": str(ENCODER_FORMAT_VERSION),
        "network": network,
        "model_name": str(cfg["meta"]["model_name"]),
        "model_kwargs": json.dumps(cfg["meta"]["model_kwargs"] or {}, sort_keys=True),
        "seed": str(cfg["meta"]["seed"]),
        "epoch": str(epoch) if epoch is not None else "",
        "source": source,
        "fastjepa_version": __version__,
    }
    meta.update({k: repr(v) if isinstance(v, float) else str(v) for k, v in arch.items()})
    return meta


def check_architecture(path: Path, meta: Mapping[str, str], encoder: nn.Module) -> None:
    """Fail, naming every field that differs, when ``encoder`` is not the architecture
    a safetensors file's metadata records (shapes alone miss a different head count)."""
    have = encoder_architecture(encoder)
    bad = []
    for field in ARCH_FIELDS:
        if field not in meta or have[field] is None:
            continue
        try:
            want = float(meta[field])
        except ValueError:
            raise CheckpointError(f"{path}: metadata {field}={meta[field]!r} is not a number") from None
        if abs(want - have[field]) > 1e-9 * max(1.0, abs(want)):
            bad.append(f"{field} {meta[field]} in the file, {have[field]} in the model")
    if bad:
        raise CheckpointError(
            f"{path} holds a different encoder architecture ({meta.get('model_name', '?')}): " + "; ".join(bad)
        )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, metadata)`` of a safetensors file (no code can run: it holds raw
    tensors and a JSON header)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _damaged(path, exc) from exc
    return strip_module_prefix(state), meta


def save_safetensors(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | os.PathLike) -> None:
    """Write ``state`` (names as given, e.g. the reference's) and ``metadata`` atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=dict(metadata))
    atomic_write(path, lambda f, tmp: f.write(data))


def export_encoder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    which: str = "target",
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    trust: bool = False,
    prefer: str = "best",
) -> dict[str, str]:
    """Write ``src``'s target encoder (``which="context"``: the context encoder) to the
    safetensors file ``dst``, parameter names as the reference's, its architecture in the
    metadata. ``src``: a run folder, a fastjepa or reference checkpoint, or a safetensors
    file. The architecture of a reference checkpoint comes from ``config`` / ``overrides``
    or its weight shapes, as for evaluation. A run folder gives its best checkpoint
    (``prefer="latest"``: its latest; :func:`resolve_run_checkpoint`). Returns the metadata."""
    from .eval import ENCODER_KEYS, load_target_encoder

    src, dst = resolve_run_checkpoint(src, prefer), Path(dst)
    if not dst.name.endswith(SAFETENSORS_SUFFIX):
        raise CheckpointError(f"export: {dst} should end in {SAFETENSORS_SUFFIX}")
    encoder, cfg, info = load_target_encoder(src, config, overrides, which, trust=trust)
    meta = encoder_metadata(encoder, cfg, network=ENCODER_KEYS[which], epoch=info.get("epoch"), source=src.name)
    save_safetensors(encoder.state_dict(), meta, dst)
    return meta


# -- converting checkpoints of earlier versions


def _old_numpy_allowlist() -> list[Any]:
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    # the uint32 dtype's class: a dtype's pickle builds one (its state is byte order and flags)
    return [(_reconstruct, name) for name in OLD_NUMPY_GLOBALS[:2]] + [np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, trust: bool = False) -> str:
    """Rewrite ``src`` as ``dst`` that loads weights-only. A checkpoint of an earlier
    fastjepa (its NumPy RNG state pickled as an array) is read weights-only with exactly
    NumPy's array types allowed; anything else that needs more takes ``trust=True``.
    The RNG state is kept bit for bit (resume stays exact). Returns what was done."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"convert: {src} would be overwritten; write the converted file to another path")
    how = "already weights-only; rewritten"
    try:
        ckpt = read_checkpoint(src)
    except UnsafeCheckpointError as exc:
        if set(exc.wanted) <= set(OLD_NUMPY_GLOBALS):
            ckpt, how = _torch_load(src, allow=_old_numpy_allowlist()), "NumPy RNG state rewritten as a tensor"
        elif trust:
            ckpt, how = read_checkpoint(src, trust=True), f"opened with trust ({', '.join(exc.wanted)}); rewritten"
        else:
            raise
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {src} holds a {type(ckpt).__name__}, expected a dict")
    extra = ckpt.get("fastjepa")
    if isinstance(extra, dict):
        extra = dict(extra)
        rng = extra.get("rng")
        if isinstance(rng, dict) and "numpy" in rng:
            extra["rng"] = {**rng, "numpy": numpy_rng_to_plain(rng["numpy"])}
        extra["format_version"] = FORMAT_VERSION
        ckpt = {**ckpt, "fastjepa": extra}
    try:
        ckpt = plain(ckpt, "checkpoint")
    except TypeError as exc:
        raise CheckpointError(f"convert: {src} cannot be rewritten weights-only: {exc}") from None
    atomic_save(ckpt, dst)
    try:
        read_checkpoint(dst)  # what was written opens weights-only
    except CheckpointError:
        dst.unlink()
        raise
    return how


# -- command line


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
    ex.add_argument(
        "source", metavar="RUN_OR_FILE", help="a run folder (its <tag>-best.pth.tar, else <tag>-latest.pth.tar) or a checkpoint file"
    )
    ex.add_argument("--latest", action="store_true", help="from a run folder: its latest checkpoint, not the best")
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


def _why(picked: Path) -> str:
    if picked.name.endswith("-best.pth.tar"):
        return " (the epoch with the highest target RankMe; --latest for the latest)"
    return ""


def main(argv=None) -> int:
    args = _parse_args(argv)
    from .config import ConfigError
    from .eval import EvalError

    try:
        if args.command == "export":
            prefer = "latest" if args.latest else "best"
            if Path(args.source).is_dir():
                picked = resolve_run_checkpoint(args.source, prefer)
                print(f"fastjepa.checkpoint: {args.source} is a run folder: exporting {picked.name}{_why(picked)}", file=sys.stderr)
            meta = export_encoder(
                args.source, args.output, which=args.encoder, config=args.config, overrides=args.overrides, trust=args.trust_checkpoint,
                prefer=prefer,
            )  # fmt: skip
            arch = ", ".join(f"{k} {meta[k]}" for k in ARCH_FIELDS)
            print(f"fastjepa.checkpoint: wrote {args.output}: {meta['network']}, {meta['model_name']} ({arch})")
        else:
            how = convert_checkpoint(args.old, args.new, trust=args.trust_checkpoint)
            print(f"fastjepa.checkpoint: wrote {args.new} ({how})")
    except (CheckpointError, ConfigError, EvalError, FileNotFoundError) as exc:
        print(f"fastjepa.checkpoint: {exc}", file=sys.stderr)
        return 2
    return 0



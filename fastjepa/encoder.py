"""An encoder from anything: a training checkpoint (fastjepa's or the reference's), an
exported ``.safetensors`` file, a Hugging Face or timm file or folder; and the export of one
network to ``.safetensors`` or to a Hugging Face / timm folder (:func:`export_encoder`;
docs/eval.md, docs/interop.md, docs/design.md#6-checkpoints). What the files' architectures
mean and how an encoder is built from them: :mod:`fastjepa.architecture`, :mod:`fastjepa.build`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from .architecture import (
    arch_from_module,
    arch_from_state,
    architecture,
    check_encoder_shapes,
    checkpoint_config,
    config_for_architecture,
    config_names,
    describe_model,
)
from .build import build_encoder, config_encoder
from .checkpoint import (
    ENCODER_FLAG,
    ENCODER_FORMAT,
    ENCODER_KEYS,
    SAFETENSORS_SUFFIX,
    CheckpointError,
    check_architecture,
    check_module_state,
    encoder_metadata,
    read_checkpoint,
    read_safetensors,
    resolve_run_checkpoint,
    run_checkpoint_kind,
    save_safetensors,
    strip_module_prefix,
)
from .checkpoint.formats import FormatError
from .config import ConfigError, load_config


class EvalError(RuntimeError):
    """A problem with the evaluation's inputs, with what to do about it."""


def _inferred_config(state: dict[str, Any], overrides: Sequence[str]) -> dict:
    """The config of the encoder a state dict's shapes describe (the head count: the
    standard one for the width)."""
    try:
        arch = arch_from_state(state)
    except FormatError as exc:
        raise EvalError(f"cannot infer the architecture from the encoder state ({exc}); pass --config FILE") from None
    return config_for_architecture(config_names(arch), overrides)


def _check_before_build(path: Path, key: str, cfg: dict, state: dict, source: str) -> None:
    """The encoder ``cfg`` describes must be the one ``state`` holds (shapes, block count)
    before it is built: an architecture from a file or a flag cannot make evaluation
    allocate a model larger than the weights it is about to load."""
    try:
        check_encoder_shapes(path, key, architecture(cfg), state)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (architecture from {source}; pass the --config it was trained with, or fix the overrides)") from None



def load_run_encoder(
    path: str | os.PathLike,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    which: str = "target",
    *,
    trust: bool = False,
    prefer: str = "best",
) -> tuple[nn.Module, dict, dict[str, Any]]:
    """Build the model and load a run's encoder (strictly): the target encoder, or the context one.

    ``path``: a ``.pth.tar`` (read weights-only; ``trust=True`` also opens one that needs
    more, which may run code), a ``.safetensors`` file from ``python -m fastjepa.checkpoint
    export`` (the architecture comes from its metadata), a run folder (its best checkpoint,
    else its latest: ``info["chosen"]``), or a Hugging Face / timm file or folder as
    :func:`fastjepa.interop.read_encoder` reads it.

    ``which="context"`` loads the context encoder (the network trained by gradients)
    instead: a diagnostic, not the paper's protocol — it shows whether a collapse starts
    in the student before the EMA carries it into the target.

    Returns ``(encoder, cfg, info)``; ``info`` says where the architecture came from, the
    checkpoint's epoch and which encoder was loaded.
    """
    from .interop import read_encoder

    if which not in ENCODER_KEYS:
        raise ValueError(f"which={which!r}: expected one of {', '.join(ENCODER_KEYS)}")
    key = ENCODER_KEYS[which]
    path = Path(path)
    if path.is_dir():
        chosen = resolve_run_checkpoint(path, prefer, strict=False)
        if chosen == path:  # a Hugging Face or timm folder, or an error naming what it holds
            return _load_foreign(path, read_encoder(path, which=which, trust=trust), config, overrides, which)
        encoder, cfg, info = load_run_encoder(chosen, config, overrides, which, trust=trust)
        return encoder, cfg, {**info, "run_folder": str(path), "chosen": run_checkpoint_kind(chosen)}
    if path.name.endswith(SAFETENSORS_SUFFIX):
        return _load_safetensors_encoder(path, config, overrides, key, which, trust)
    ckpt = read_checkpoint(path, trust=trust)
    if key not in ckpt and "encoder" not in ckpt:  # HF / timm weights, or an error naming the layouts read
        return _load_foreign(path, read_encoder(path, which=which, trust=trust), config, overrides, which)
    if key not in ckpt:
        raise CheckpointError(
            f"checkpoint {path} has no {key!r} (keys: {sorted(ckpt)}); expected a fastjepa or I-JEPA training checkpoint"
        )
    state = ckpt[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {key!r} is a {type(state).__name__}, expected a state dict")
    state = strip_module_prefix(state)
    extra = ckpt.get("fastjepa")
    stored = extra.get("config") if isinstance(extra, dict) else None
    try:
        cfg, source = checkpoint_config(stored, config, overrides, where=f"config stored in {path}")
    except ConfigError as exc:
        if config is not None or not isinstance(stored, dict):
            raise
        raise CheckpointError(f"checkpoint {path}: its stored config does not validate ({exc}); pass --config FILE") from None
    if cfg is None:
        cfg, source = _inferred_config(state, overrides), "the checkpoint's weight shapes"
    _check_before_build(path, key, cfg, state, source)
    encoder = config_encoder(cfg)
    state = check_module_state(path, key, state, encoder)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path}: {key!r} does not fit the model built from {source} "
            f"({cfg['meta']['model_name']}, model_kwargs={cfg['meta']['model_kwargs']}, patch {cfg['mask']['patch_size']}, "
            f"crop {cfg['data']['crop_size']}); pass the --config it was trained with or fix the overrides. {exc}"
        ) from None
    info = {
        "path": str(path),
        "architecture_from": source,
        "epoch": ckpt.get("epoch"),
        "format": "fastjepa" if extra else "reference",
        "encoder": which,
    }
    return encoder, cfg, info


def _load_foreign(
    path: Path, found: Any, config: str | os.PathLike | None, overrides: Sequence[str], which: str
) -> tuple[nn.Module, dict, dict[str, Any]]:
    """:func:`load_run_encoder` for a Hugging Face or timm file or folder
    (:func:`fastjepa.interop.read_encoder` read it): the encoder is built from the
    architecture it records (or ``--config``), the config describes it for the data and
    the random-init baseline."""
    if config is not None:
        cfg, source = load_config(config, overrides), f"--config {config}"
        encoder = config_encoder(cfg)
    else:
        try:
            cfg = config_for_architecture(config_names(found.arch), overrides)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: its architecture does not validate as a config ({exc}); pass --config FILE") from None
        source, encoder = found.info.get("architecture_from", "the file"), build_encoder(found.arch)
    try:
        encoder.load_state_dict(found.state, strict=True)
    except RuntimeError as exc:
        lines = " ".join(ln.strip() for ln in str(exc).strip().splitlines())
        raise CheckpointError(f"{path}: its tensors do not fit the encoder built from {source} ({describe_model(cfg)}): {lines}") from None
    info = {
        "path": str(path),
        "architecture_from": source,
        "epoch": found.info.get("epoch"),
        "format": found.info.get("layout"),
        "encoder": which,
    }
    return encoder, cfg, info


def _load_safetensors_encoder(
    path: Path, config: str | os.PathLike | None, overrides: Sequence[str], key: str, which: str = "target", trust: bool = False
) -> tuple[nn.Module, dict, dict[str, Any]]:
    """:func:`load_run_encoder` for an exported ``.safetensors`` encoder: the model is
    built from the metadata's architecture (or ``--config``), checked against it field by
    field, then loaded strictly. A Hugging Face or timm safetensors file goes to
    :func:`_load_foreign`."""
    from .checkpoint.formats import CONFIG_NAME, layout_of
    from .interop import read_encoder

    state, meta = read_safetensors(path)
    if meta.get("format") != ENCODER_FORMAT and (layout_of(state) == "hf" or (path.parent / CONFIG_NAME).is_file()):
        return _load_foreign(path, read_encoder(path, which=which, trust=trust), config, overrides, which)
    stored = meta.get("network")
    if stored and stored != key:
        raise CheckpointError(f"{path} holds the {stored}, not the {key}: evaluate it with --encoder {ENCODER_FLAG.get(stored, 'target')}")
    ours = meta.get("format") == ENCODER_FORMAT
    if config is not None:
        cfg, source = load_config(config, overrides), f"--config {config}"
    elif ours:
        try:
            arch = {
                "model_name": meta["model_name"],
                "model_kwargs": json.loads(meta.get("model_kwargs") or "{}"),
                "patch_size": int(meta["patch_size"]),
                "crop_size": int(meta["img_size"]),
            }
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: its metadata does not describe an encoder ({type(exc).__name__}: {exc}); pass --config FILE") from None
        try:
            cfg = config_for_architecture(arch, overrides)
            if meta.get("seed", "").lstrip("-").isdigit() and not any(o.startswith("meta.seed=") for o in overrides):
                cfg["meta"]["seed"] = int(meta["seed"])  # the random-init baseline of the run it came from
        except ConfigError as exc:
            raise CheckpointError(f"{path}: its metadata's architecture does not validate ({exc}); pass --config FILE") from None
        source = "the file's metadata"
    else:  # a safetensors file of another tool: read the architecture off the shapes
        cfg, source = _inferred_config(state, overrides), "the file's weight shapes"
    _check_before_build(path, key, cfg, state, source)
    encoder = config_encoder(cfg)
    if ours:
        check_architecture(path, meta, encoder)
    check_module_state(path, key, state, encoder)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{path}: its tensors do not fit the encoder built from {source} ({describe_model(cfg)}): "
            + " ".join(ln.strip() for ln in first)
        ) from None
    info = {
        "path": str(path),
        "architecture_from": source,
        "epoch": int(meta["epoch"]) if meta.get("epoch", "").isdigit() else None,
        "format": "safetensors",
        "encoder": ENCODER_FLAG[key],
    }
    return encoder, cfg, info


# -- export

EXPORT_FORMATS = ("safetensors", "hf", "timm")


def export_encoder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    format: str = "safetensors",
    which: str = "target",
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    trust: bool = False,
    prefer: str = "best",
) -> dict[str, Any]:
    """Write ``src``'s target encoder (``which="context"``: the context encoder) to ``dst``
    in ``format`` (what ``python -m fastjepa.checkpoint export`` does):

    * ``"safetensors"``: the file ``dst`` (``….safetensors``), parameter names as the
      reference's, the architecture and the run's model settings in the metadata (what
      :func:`load_run_encoder`, ``python -m fastjepa.eval`` and
      :func:`fastjepa.checkpoint.load_encoder` read back);
    * ``"hf"``: a folder that transformers' ``IJepaModel.from_pretrained(dst)`` loads;
      ``"timm"``: a folder for ``timm.create_model("local-dir:DST", pretrained=True)``; each
      holds config.json, model.safetensors and a model card
      (:func:`fastjepa.interop.write_folder`).

    ``src``: a run folder (its best checkpoint, else its latest; ``prefer="latest"``: the
    latest), a fastjepa or reference checkpoint, or any file or folder
    :func:`fastjepa.load_encoder` reads. The architecture of a reference checkpoint comes
    from ``config`` / ``overrides`` or its weight shapes, as for evaluation.

    Returns ``{"format", "path", "network", "arch", "info", "metadata"}``: the encoder
    architecture written (:data:`fastjepa.architecture.ARCH_KEYS`), what was read
    (``info["path"]``: the checkpoint or file) and the safetensors metadata written."""
    from .interop import read_encoder, write_folder

    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r}: expected one of {', '.join(map(repr, EXPORT_FORMATS))}")
    src, dst = Path(src), Path(dst)
    if format != "safetensors" and dst.exists() and not dst.is_dir():
        raise CheckpointError(f"export: {dst} exists and is not a folder; --format {format} writes a folder")
    chosen = resolve_run_checkpoint(src, prefer, strict=False)  # a run folder: its best, else latest checkpoint
    if format != "safetensors":
        found = read_encoder(chosen, which=which, trust=trust, config=config, overrides=overrides)
        return write_folder(found, dst, format=format, source=src)
    if not dst.name.endswith(SAFETENSORS_SUFFIX):
        raise CheckpointError(f"export: {dst} should end in {SAFETENSORS_SUFFIX} (or pass --format hf / --format timm to write a folder)")
    encoder, cfg, info = load_run_encoder(chosen, config, overrides, which, trust=trust)
    meta = encoder_metadata(encoder, cfg, network=ENCODER_KEYS[which], epoch=info.get("epoch"), source=chosen.name)
    save_safetensors(encoder.state_dict(), meta, dst)
    return {"format": format, "path": str(dst), "network": meta["network"], "arch": arch_from_module(encoder), "info": info, "metadata": meta}

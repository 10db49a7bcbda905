"""Sharing an encoder and upgrading old files, beside the checkpoint format in :mod:`.core`.

* safetensors: one network under the reference's parameter names with its architecture in
  the metadata (``save_safetensors`` / ``encoder_metadata``, written by
  :func:`fastjepa.encoder.export_encoder`; the architecture read off the module by
  :func:`.formats.arch_from_module`); ``read_safetensors`` / ``check_architecture``
  read it back for :func:`load_encoder` and ``python -m fastjepa.eval``.
* :func:`load_encoder`: one network from a checkpoint or a ``.safetensors`` file.
* ``convert_checkpoint``: rewrites a checkpoint of an earlier fastjepa (NumPy's RNG state
  pickled as an array) as a weights-only file, once.

Everything here reads through :mod:`.core`'s one weights-only loader.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..rng import numpy_rng_to_plain
from .checks import _load_module
from .formats import FormatError, arch_from_module
from .core import (
    ENCODER_FLAG,
    ENCODER_FORMAT,
    ENCODER_FORMAT_VERSION,
    FORMAT_VERSION,
    OLD_NUMPY_GLOBALS,
    SAFETENSORS_SUFFIX,
    CheckpointError,
    UnsafeCheckpointError,
    UnverifiedCheckpointWarning,
    _damaged,
    _torch_load,
    atomic_save,
    atomic_write,
    plain,
    read_checkpoint,
    strip_module_prefix,
    tensors_digest,
)

# -- safetensors: one encoder with its architecture, for sharing

ARCH_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size", "in_chans")


def int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "", "None") else None
    except ValueError:
        return None


def _arch_of(encoder: nn.Module) -> dict[str, Any]:
    try:
        return arch_from_module(encoder)
    except FormatError as exc:
        raise CheckpointError(str(exc)) from None


def encoder_metadata(encoder: nn.Module, cfg: Mapping[str, Any], *, network: str = "target_encoder", epoch: Any = None, source: str = "") -> dict[str, str]:
    """The safetensors metadata of an exported encoder (all values strings)."""
    from ..version import __version__

    arch = _arch_of(encoder)
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
    meta.update({k: repr(arch[k]) if isinstance(arch[k], float) else str(arch[k]) for k in ARCH_FIELDS})
    return meta


def check_architecture(path: Path, meta: Mapping[str, str], encoder: nn.Module) -> None:
    """Fail, naming every field that differs, when ``encoder`` is not the architecture
    a safetensors file's metadata records (shapes alone miss a different head count)."""
    have = _arch_of(encoder)
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


_UNVERIFIED_WARNED: set[str] = set()


def verify_safetensors(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """A fastjepa export's tensors against the content hash in its metadata (``sha256``,
    :func:`tensors_digest`). Format 2 and later must carry one; a format-1 export (written
    before the hash existed) loads with an :class:`UnverifiedCheckpointWarning`, once per
    file; a safetensors file of another tool has no hash to check."""
    recorded = meta.get("sha256")
    if recorded is None:
        if meta.get("format") != ENCODER_FORMAT:
            return
        version = int_or_none(meta.get("format_version")) or 1
        if version >= 2:
            raise CheckpointError(
                f"{path}: its metadata says format {version}, which records a content hash, but it has none "
                "(the metadata was edited or damaged): export the encoder again"
            )
        key = str(path.resolve())
        if key not in _UNVERIFIED_WARNED:
            _UNVERIFIED_WARNED.add(key)
            warnings.warn(
                f"fastjepa: {path} is a format-1 export without a content hash: damage to its tensors cannot be "
                "detected; export it again (python -m fastjepa.checkpoint export) to add one",
                UnverifiedCheckpointWarning,
                stacklevel=3,
            )
        return
    actual = tensors_digest(state)
    if actual != recorded:
        raise CheckpointError(
            f"{path} is damaged: its tensors' sha256 is {actual[:16]}…, the export recorded {str(recorded)[:16]}… "
            "(the file changed after it was written: a disk or copy error, or an edit); export it again"
        )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, metadata)`` of a safetensors file (no code can run: it holds raw
    tensors and a JSON header); a fastjepa export's content hash is verified
    (:func:`verify_safetensors`)."""
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
    verify_safetensors(path, state, meta)
    return strip_module_prefix(state), meta


def save_safetensors(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | os.PathLike) -> None:
    """Write ``state`` (names as given, e.g. the reference's) and ``metadata`` atomically;
    a fastjepa export's metadata gets the tensors' content hash (``sha256``)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = dict(metadata)
    if metadata.get("format") == ENCODER_FORMAT:
        metadata["sha256"] = tensors_digest(tensors)
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f, tmp: f.write(data))


# -- loading one network


def load_encoder(
    path: str | os.PathLike, encoder: nn.Module | None = None, *, which: str = "target_encoder", strict: bool = True, trust: bool = False
) -> dict[str, Any]:
    """Load one network (default the target encoder, as used for evaluation) into
    ``encoder`` from a fastjepa or reference checkpoint, or from a ``.safetensors`` file
    written by ``python -m fastjepa.checkpoint export`` (its architecture is checked
    against ``encoder`` first). Returns the checkpoint dict; for safetensors
    ``{which: state, "metadata": {...}}``. A ready encoder built from what the file
    records is :func:`fastjepa.load_encoder` (this layer builds no models)."""
    if encoder is None:
        raise TypeError(
            f"fastjepa.checkpoint.load_encoder({str(path)!r}) loads into an encoder you pass; "
            "for one built from the file's own architecture call fastjepa.load_encoder(path)"
        )
    path = Path(path)
    if path.name.endswith(SAFETENSORS_SUFFIX):
        state, meta = read_safetensors(path)
        stored = meta.get("network")
        if stored and stored != which:
            raise CheckpointError(f"{path} holds the {stored}, not the {which} (export it with --encoder {ENCODER_FLAG.get(which, which)})")
        if meta.get("format") == ENCODER_FORMAT:
            check_architecture(path, meta, encoder)
        _load_module(encoder, state, which, path, strict)
        return {which: state, "metadata": meta, "epoch": int_or_none(meta.get("epoch"))}
    ckpt = read_checkpoint(path, trust=trust)
    if which not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no '{which}' (keys: {sorted(ckpt)})")
    _load_module(encoder, ckpt[which], which, path, strict)
    return ckpt


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

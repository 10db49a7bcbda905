"""Checkpoints in the reference format (docs/design.md §6), written atomically, read strictly.

A checkpoint is a ``torch.save`` dict with keys ``encoder, predictor, target_encoder,
opt, scaler, epoch, loss, batch_size, world_size, lr``. fastjepa's additions (global
step, RNG states, resolved config, format version) live under ``"fastjepa"``.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

REFERENCE_KEYS = ("encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss", "batch_size", "world_size", "lr")
MODEL_KEYS = ("encoder", "predictor", "target_encoder")
FORMAT_VERSION = 1
_SAVE_HOOK = None  # tests set this to act inside a write (see tests/test_checkpoint.py)
_SAVES = 0


def _env_pause_hook(tmp: str) -> None:
    """Test hook for fault tests in a subprocess: ``FASTJEPA_TEST_SAVE_PAUSE="N:SECONDS"``
    sleeps inside the N-th checkpoint write of the process, after the temporary file
    holds its data and before the rename — where a kill -9 would tear a naive write."""
    spec = os.environ.get("FASTJEPA_TEST_SAVE_PAUSE")
    if not spec:
        return
    n, seconds = spec.split(":")
    if _SAVES == int(n):
        import time

        time.sleep(float(seconds))


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the model."""


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a leading ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) from every key."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file in ``path``'s folder, then rename it over ``path``:
    a reader (or a run killed half-way) sees the old file or the new one, never half of one.
    For small reports (eval.json, benchmark tables); checkpoints use :func:`atomic_save`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            global _SAVES
            _SAVES += 1
            _env_pause_hook(tmp)
            if _SAVE_HOOK is not None:
                _SAVE_HOOK(tmp)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames in ``folder`` durable (POSIX: fsync the directory)."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def keep_as(src: Path, dst: Path) -> None:
    """Make ``dst`` the file ``src`` is, atomically, while ``src`` stays in place (a hard
    link renamed over ``dst``): at no moment is there neither. Where hard links are not
    supported, ``src`` is renamed to ``dst`` instead (a crash right after leaves only
    ``dst``; resume then falls back to it)."""
    link = dst.with_name(f".{dst.name}.link")
    try:
        if link.exists():
            link.unlink()
        os.link(src, link)
        os.replace(link, dst)
    except OSError:
        os.replace(src, dst)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without ``module.`` / ``_orig_mod.`` prefixes, tensors on the CPU."""
    return {k: v.detach().cpu() for k, v in strip_module_prefix(_unwrap(module).state_dict()).items()}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    *,
    epoch: int,
    loss: float,
    batch_size: int,
    world_size: int = 1,
    lr: float,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` (an :class:`~fastjepa.IJEPA`, or anything with ``encoder``,
    ``predictor``, ``target_encoder``) and the training state to ``path`` atomically."""
    model = _unwrap(model)
    states = {name: model_state(getattr(model, name)) for name in MODEL_KEYS}
    states["opt"] = optimizer.state_dict() if optimizer is not None else None
    save_states(path, states, scaler, epoch=epoch, loss=loss, batch_size=batch_size, world_size=world_size, lr=lr, extra=extra)


def save_states(
    path: str | os.PathLike,
    states: Mapping[str, Any],
    scaler: Any = None,
    *,
    epoch: int,
    loss: float,
    batch_size: int,
    world_size: int = 1,
    lr: float,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """:func:`save_checkpoint` from ready state dicts (``encoder``, ``predictor``,
    ``target_encoder``, ``opt``) — e.g. full state dicts gathered from FSDP2 shards."""
    ckpt = {
        "encoder": strip_module_prefix(states["encoder"]),
        "predictor": strip_module_prefix(states["predictor"]),
        "target_encoder": strip_module_prefix(states["target_encoder"]),
        "opt": states.get("opt"),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "loss": float(loss),
        "batch_size": int(batch_size),
        "world_size": int(world_size),
        "lr": float(lr),
        "fastjepa": {"format_version": FORMAT_VERSION, **(dict(extra) if extra else {})},
    }
    atomic_save(ckpt, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict onto the CPU, failing loudly on a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): damaged or an interrupted write")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated and cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def _load_module(module: nn.Module, state: Any, name: str, path: Path, strict: bool) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path}: '{name}' is a {type(state).__name__}, expected a state dict")
    try:
        _unwrap(module).load_state_dict(strip_module_prefix(state), strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: '{name}' does not fit the model: {exc}") from exc


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Restore ``model`` (IJEPA-like) and, if given, ``optimizer`` / ``scaler`` from ``path``.

    Reads fastjepa checkpoints and the reference's (keys with or without ``module.``).
    Returns the whole checkpoint dict (``epoch``, ``loss``, ``fastjepa`` extras, …).
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    missing = [k for k in MODEL_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)} (keys: {sorted(ckpt)})")
    model = _unwrap(model)
    for name in MODEL_KEYS:
        _load_module(getattr(model, name), ckpt[name], name, path, strict)
    if optimizer is not None:
        if ckpt.get("opt") is None:
            raise CheckpointError(f"checkpoint {path} has no optimizer state ('opt')")
        try:
            optimizer.load_state_dict(ckpt["opt"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {exc}") from exc
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt


def load_encoder(path: str | os.PathLike, encoder: nn.Module, *, which: str = "target_encoder", strict: bool = True) -> dict[str, Any]:
    """Load one network (default the target encoder, as used for evaluation) from a
    fastjepa or reference checkpoint into ``encoder``."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if which not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no '{which}' (keys: {sorted(ckpt)})")
    _load_module(encoder, ckpt[which], which, path, strict)
    return ckpt

"""Checks of what a checkpoint holds against what it will be loaded into, run before any
of it is used: a state dict against its module (names, shapes, dtype class, finiteness),
an optimizer state against the optimizer's parameters (group count and sizes, moment
shapes and dtypes, step counts, hyperparameter types and ranges), a gradient scaler's
state, the RNG states (each applied to a throwaway generator first) and the counters of
a resume (epoch, position in the epoch, step).

torch's loaders trust their input: a moment tensor of the wrong size goes straight into
the fused AdamW kernel, which writes past it. Every mismatch here is one
:class:`~fastjepa.checkpoint.CheckpointError` line naming the file, the key, what was
expected and what was found.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..rng import numpy_rng_from_plain
from .core import FORMAT_VERSION, MODEL_KEYS, CheckpointError, _first_line, _unwrap, read_checkpoint, strip_module_prefix


def _fail(path: str | os.PathLike, msg: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {msg}")


def _kind(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{text[:60] + '…' if len(text) > 60 else text} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dtype_class(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_floating_point():
        return "floating-point"
    if t.is_complex():
        return "complex"
    return "integer"


def check_module_state(path: str | os.PathLike, name: str, state: Any, module: nn.Module, *, strict: bool = True) -> dict[str, Any]:
    """``state`` (prefixes stripped) checked against ``module``'s own state dict: every
    key present (``strict``) and no unknown one, each value a tensor of the module's
    shape and dtype class (floating-point weights: no integers, bools or complex), every
    floating-point value finite. Returns the stripped state."""
    if not isinstance(state, Mapping):
        raise _fail(path, f"'{name}' is {_kind(state)}, expected a state dict")
    state = strip_module_prefix(state)
    expected = _unwrap(module).state_dict()
    if strict:
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} key(s) the model has ({', '.join(missing[:4])}{', …' if len(missing) > 4 else ''})")
            if unexpected:
                parts.append(
                    f"holds {len(unexpected)} key(s) the model does not ({', '.join(unexpected[:4])}{', …' if len(unexpected) > 4 else ''})"
                )
            raise _fail(path, f"'{name}' does not fit the model: it " + " and ".join(parts))
    for key, want in expected.items():
        if key not in state:
            continue
        got = state[key]
        where = f"'{name}.{key}'"
        if not torch.is_tensor(got):
            raise _fail(path, f"{where} is {_kind(got)}, expected a tensor of shape {tuple(want.shape)}")
        if tuple(got.shape) != tuple(want.shape):
            raise _fail(path, f"{where} has shape {tuple(got.shape)}, the model's is {tuple(want.shape)}")
        if _dtype_class(got) != _dtype_class(want):
            raise _fail(path, f"{where} is {got.dtype}, expected a {_dtype_class(want)} tensor (the model's is {want.dtype})")
        if got.is_floating_point() and got.numel() and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise _fail(path, f"{where} holds {bad} NaN or infinite value(s) of {got.numel()}: the weights are damaged")
    return state


def _check_hyper(path, where: str, got: Any, current: Any) -> None:
    """One optimizer hyperparameter against the type of the optimizer's own value."""
    if isinstance(current, bool) or current is None:
        # flags: torch writes None or a bool for foreach / fused / capturable alike, and a
        # checkpoint of the reference step (fused None) may resume a fused run
        if got is not None and not isinstance(got, bool):
            raise _fail(path, f"{where} is {_kind(got)}, expected true, false or None")
    elif _is_number(current) or torch.is_tensor(current):
        value = got
        if torch.is_tensor(got):
            if got.numel() != 1 or got.dtype == torch.bool or got.is_complex():
                raise _fail(path, f"{where} is {_kind(got)}, expected a number")
            value = got.item()
        if not _is_number(value) or not math.isfinite(value):
            raise _fail(path, f"{where} is {_kind(got)}, expected a finite number")
        if where.rstrip("'").endswith((".lr", ".eps")) and value < 0:
            raise _fail(path, f"{where} is {value!r}, expected a number >= 0")
        if "betas" in where and not 0 <= value < 1:
            raise _fail(path, f"{where} is {value!r}, expected a number in [0, 1)")
    elif isinstance(current, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(current):
            raise _fail(path, f"{where} is {_kind(got)}, expected {len(current)} values like {current!r}")
        for i, (g, c) in enumerate(zip(got, current)):
            _check_hyper(path, f"{where}[{i}]", g, c)
    elif isinstance(current, str) and not isinstance(got, str):
        raise _fail(path, f"{where} is {_kind(got)}, expected a string")


def check_optimizer_state(path: str | os.PathLike, saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer state dict checked against ``optimizer``: as many parameter groups,
    each listing as many parameters; every per-parameter tensor (AdamW's ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``) of its parameter's shape, floating-point and
    finite; ``step`` a finite count >= 0; hyperparameters of the optimizer's types, finite."""
    if not isinstance(saved, Mapping):
        raise _fail(path, f"'opt' is {_kind(saved)}, expected an optimizer state dict")
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, (list, tuple)):
        raise _fail(path, f"'opt.param_groups' is {_kind(groups)}, expected a list of parameter groups")
    if not isinstance(state, Mapping):
        raise _fail(path, f"'opt.state' is {_kind(state)}, expected a mapping of parameter id to state")
    ours = optimizer.param_groups
    if len(groups) != len(ours):
        raise _fail(path, f"'opt' has {len(groups)} parameter group(s), this optimizer has {len(ours)}")
    params: dict[Any, torch.Tensor] = {}
    for gi, (group, mine) in enumerate(zip(groups, ours)):
        where = f"'opt.param_groups[{gi}]'"
        if not isinstance(group, Mapping):
            raise _fail(path, f"{where} is {_kind(group)}, expected a mapping")
        ids = group.get("params")
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) or isinstance(i, str) for i in ids):
            raise _fail(path, f"{where}.params is {_kind(ids)}, expected a list of parameter ids")
        if len(ids) != len(mine["params"]):
            raise _fail(path, f"{where} lists {len(ids)} parameter(s), this optimizer's group {gi} has {len(mine['params'])}")
        for pid, p in zip(ids, mine["params"]):
            if pid in params:
                raise _fail(path, f"{where} lists parameter id {pid!r} a second time")
            params[pid] = p
        for key, current in mine.items():
            if key not in ("params", "param_names") and key in group:
                _check_hyper(path, f"'opt.param_groups[{gi}].{key}'", group[key], current)
    for pid, entry in state.items():
        where = f"'opt.state[{pid!r}]'"
        if pid not in params:
            raise _fail(path, f"{where}: no parameter group lists parameter id {pid!r}")
        if not isinstance(entry, Mapping):
            raise _fail(path, f"{where} is {_kind(entry)}, expected a mapping")
        p = params[pid]
        for key, value in entry.items():
            at = f"'opt.state[{pid!r}].{key}'"
            if key == "step":
                step = value
                if torch.is_tensor(value):
                    if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
                        raise _fail(path, f"{at} is {_kind(value)}, expected a step count (one number)")
                    step = value.item()
                if not _is_number(step) or not math.isfinite(step) or step < 0:
                    raise _fail(path, f"{at} is {_kind(value)}, expected a step count >= 0")
            elif torch.is_tensor(value):
                if tuple(value.shape) != tuple(p.shape):
                    raise _fail(path, f"{at} has shape {tuple(value.shape)}, its parameter's is {tuple(p.shape)}")
                if not value.is_floating_point():
                    raise _fail(path, f"{at} is {value.dtype}, expected a floating-point tensor like its parameter ({p.dtype})")
                if value.numel() and not bool(torch.isfinite(value).all()):
                    raise _fail(path, f"{at} holds NaN or infinite values")
            elif not _is_number(value) or not math.isfinite(value):
                raise _fail(path, f"{at} is {_kind(value)}, expected a tensor of shape {tuple(p.shape)} or a finite number")


def check_scaler_state(path: str | os.PathLike, saved: Any) -> None:
    """A ``GradScaler`` state dict: positive finite scale and factors, integer counters."""
    if not isinstance(saved, Mapping):
        raise _fail(path, f"'scaler' is {_kind(saved)}, expected a GradScaler state dict or None")
    for key in ("scale", "growth_factor", "backoff_factor"):
        if key in saved and not (_is_number(saved[key]) and math.isfinite(saved[key]) and saved[key] > 0):
            raise _fail(path, f"'scaler.{key}' is {_kind(saved[key])}, expected a finite number > 0")
    for key, lo in (("growth_interval", 1), ("_growth_tracker", 0)):
        if key in saved and not (_is_int(saved[key]) and saved[key] >= lo):
            raise _fail(path, f"'scaler.{key}' is {_kind(saved[key])}, expected an integer >= {lo}")


def check_rng_state(path: str | os.PathLike, rng: Any) -> None:
    """The saved RNG states, each set on a throwaway generator of its kind (Python's
    ``random.Random``, NumPy's ``RandomState``, a ``torch.Generator``): what they accept
    the global generators accept, and nothing global changes here."""
    if not isinstance(rng, Mapping):
        raise _fail(path, f"'fastjepa.rng' is {_kind(rng)}, expected a mapping of RNG states")
    for key in ("python", "numpy", "torch"):
        if key not in rng:
            raise _fail(path, f"'fastjepa.rng' has no {key!r} state (keys: {sorted(map(str, rng))})")
    state = rng["python"]
    try:
        if not isinstance(state, (tuple, list)) or len(state) != 3 or not isinstance(state[1], (tuple, list)):
            raise TypeError("expected (version, 625 integers, gauss)")
        random.Random().setstate((state[0], tuple(state[1]), state[2]))
    except (TypeError, ValueError, OverflowError) as exc:
        raise _fail(path, f"'fastjepa.rng.python' is {_kind(state)}, not a Python random state ({exc})") from None
    try:
        import numpy as np

        np.random.RandomState().set_state(numpy_rng_from_plain(rng["numpy"]))
    except Exception as exc:  # NumPy's checks raise several types; any of them means unusable
        raise _fail(path, f"'fastjepa.rng.numpy' is not a NumPy random state ({type(exc).__name__}: {exc})") from None
    _check_byte_state(path, "'fastjepa.rng.torch'", rng["torch"], torch.get_rng_state().numel())
    try:
        torch.Generator().set_state(rng["torch"])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise _fail(path, f"'fastjepa.rng.torch' is not a torch CPU generator state ({exc})") from None
    if "cuda" in rng:
        cuda = rng["cuda"]
        if not isinstance(cuda, (list, tuple)):
            raise _fail(path, f"'fastjepa.rng.cuda' is {_kind(cuda)}, expected a list of per-device states")
        size = torch.cuda.get_rng_state(0).numel() if torch.cuda.is_available() else None
        for i, s in enumerate(cuda):
            _check_byte_state(path, f"'fastjepa.rng.cuda[{i}]'", s, size)


def _check_byte_state(path, where: str, state: Any, size: int | None) -> None:
    if not torch.is_tensor(state) or state.dtype != torch.uint8 or state.dim() != 1:
        raise _fail(path, f"{where} is {_kind(state)}, expected a 1-D uint8 tensor")
    if size is not None and state.numel() != size:
        raise _fail(path, f"{where} holds {state.numel()} bytes, a generator state here has {size}")


def check_resume_state(path: str | os.PathLike, ckpt: Mapping[str, Any], *, epochs: int, ipe: int) -> dict[str, Any]:
    """The counters and extras a resume reads, before any is used: ``epoch`` an integer in
    [0, epochs) (a run that has done its epochs has nothing left to resume), ``fastjepa`` a mapping with ``next_itr`` in [0, ipe], ``step`` / ``images_seen`` >= 0, a
    known ``format_version``, and RNG states that fit. Returns the ``fastjepa`` mapping."""
    if "epoch" not in ckpt:
        raise _fail(path, f"has no 'epoch' (keys: {sorted(map(str, ckpt))}): it is damaged or not a training checkpoint")
    epoch = ckpt["epoch"]
    if not _is_int(epoch) or epoch < 0:
        raise _fail(path, f"'epoch' is {_kind(epoch)}, expected an integer >= 0")
    extra = ckpt.get("fastjepa", {})
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping):
        raise _fail(path, f"'fastjepa' is {_kind(extra)}, expected a mapping (step, next_itr, rng, config, ...)")
    version = extra.get("format_version", FORMAT_VERSION)
    if not _is_int(version) or version < 1:
        raise _fail(path, f"'fastjepa.format_version' is {_kind(version)}, expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise _fail(path, f"it was written by a newer fastjepa (format {version}); this one reads format {FORMAT_VERSION} and earlier")
    for key in ("next_itr", "step", "images_seen"):
        if key in extra and (not _is_int(extra[key]) or extra[key] < 0):
            raise _fail(path, f"'fastjepa.{key}' is {_kind(extra[key])}, expected an integer >= 0")
    next_itr = extra.get("next_itr", 0)
    if next_itr > ipe:
        raise _fail(
            path,
            f"'fastjepa.next_itr' is {next_itr}, but an epoch of this run has {ipe} iterations "
            "(expected 0 to that; data.batch_size or the data set may differ from the run's)",
        )
    done = epoch + (1 if ipe and next_itr >= ipe else 0)  # a stop after an epoch's last step: that epoch is done
    if done >= epochs:
        raise _fail(
            path,
            f"the run has done {done} epoch(s) and optimization.epochs is {epochs}: nothing is left to train; "
            f"set optimization.epochs above {done} to continue it",
        )
    for key in ("config",):
        if key in extra and not isinstance(extra[key], Mapping):
            raise _fail(path, f"'fastjepa.{key}' is {_kind(extra[key])}, expected a mapping")
    if "rng" in extra:
        check_rng_state(path, extra["rng"])
    return dict(extra)


def check_fastjepa_extra(path: str | os.PathLike, ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    """``ckpt["fastjepa"]`` as a mapping ({} when absent, as in reference checkpoints)."""
    extra = ckpt.get("fastjepa")
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise _fail(path, f"'fastjepa' is {_kind(extra)}, expected a mapping (step, next_itr, rng, config, ...)")
    return extra


# -- loading, after the checks


def _load_module(module: nn.Module, state: Any, name: str, path: Path, strict: bool) -> None:
    state = check_module_state(path, name, state, module, strict=strict)
    try:
        _unwrap(module).load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: '{name}' does not fit the model: {_first_line(exc)}") from None


def check_checkpoint(
    path: str | os.PathLike, ckpt: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scaler: Any = None, *, strict: bool = True
) -> None:
    """Everything :func:`restore_checkpoint` would load, checked against what it would be
    loaded into (the checks of this module) — nothing is changed."""
    path = Path(path)
    missing = [k for k in MODEL_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)} (keys: {sorted(map(str, ckpt))})")
    check_fastjepa_extra(path, ckpt)
    model = _unwrap(model)
    for name in MODEL_KEYS:
        check_module_state(path, name, ckpt[name], getattr(model, name), strict=strict)
    if optimizer is not None:
        if ckpt.get("opt") is None:
            raise CheckpointError(f"checkpoint {path} has no optimizer state ('opt')")
        check_optimizer_state(path, ckpt["opt"], optimizer)
    if scaler is not None and ckpt.get("scaler") is not None:
        check_scaler_state(path, ckpt["scaler"])


def restore_checkpoint(
    path: str | os.PathLike, ckpt: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scaler: Any = None, *, strict: bool = True
) -> None:
    """Load a checkpoint dict read by :func:`read_checkpoint` into ``model`` (and
    ``optimizer`` / ``scaler``), after :func:`check_checkpoint` has passed on all of it."""
    path = Path(path)
    check_checkpoint(path, ckpt, model, optimizer, scaler, strict=strict)
    model = _unwrap(model)
    for name in MODEL_KEYS:
        try:
            _unwrap(getattr(model, name)).load_state_dict(strip_module_prefix(ckpt[name]), strict=strict)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path}: '{name}' does not fit the model: {_first_line(exc)}") from None
    if optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt["opt"])
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {_first_line(exc)}") from None
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    *,
    strict: bool = True,
    trust: bool = False,
) -> dict[str, Any]:
    """Restore ``model`` (IJEPA-like) and, if given, ``optimizer`` / ``scaler`` from ``path``.

    Reads fastjepa checkpoints and the reference's (keys with or without ``module.``),
    weights-only; ``trust=True`` also opens a file that needs more (it may run code).
    Every tensor and optimizer entry is checked against what it is loaded into before
    anything is loaded (:func:`check_checkpoint`).
    Returns the whole checkpoint dict (``epoch``, ``loss``, ``fastjepa`` extras, …).
    """
    path = Path(path)
    ckpt = read_checkpoint(path, trust=trust)
    restore_checkpoint(path, ckpt, model, optimizer, scaler, strict=strict)
    return ckpt

"""Checkpoints in the reference format (docs/design.md §6), written atomically, read
strictly and safely.

A checkpoint is a ``torch.save`` dict with keys ``encoder, predictor, target_encoder,
opt, scaler, epoch, loss, batch_size, world_size, lr``. fastjepa's additions (global
step, RNG states, resolved config, format version) live under ``"fastjepa"``, stored
only as tensors, numbers, strings and plain containers.

Every read of a checkpoint goes through :func:`_torch_load`, which loads with
``weights_only=True``: opening a file never runs code from it. A file that needs more
(a pickle naming other Python globals) is refused with :class:`UnsafeCheckpointError`,
unless the caller opts in with ``trust=True`` (``--trust-checkpoint`` on the command
lines), which warns once per file.

Sharing an encoder: ``python -m fastjepa.checkpoint export RUN_OR_FILE OUT.safetensors``
writes one network (the target encoder by default) with its architecture in the
safetensors metadata; :func:`load_encoder` and ``python -m fastjepa.eval`` read it.
``--format hf`` / ``--format timm`` write a transformers ``IJepaModel`` or timm folder
instead (both through :func:`fastjepa.encoder.export_encoder`; :mod:`fastjepa.interop`
reads every such layout).
``python -m fastjepa.checkpoint convert OLD NEW`` rewrites a checkpoint of an earlier
fastjepa (NumPy RNG state pickled as an array) as a weights-only one.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

REFERENCE_KEYS = ("encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss", "batch_size", "world_size", "lr")
MODEL_KEYS = ("encoder", "predictor", "target_encoder")
ENCODER_KEYS = {"target": "target_encoder", "context": "encoder"}  # which encoder (--encoder, which=) -> its checkpoint key
ENCODER_FLAG = {key: flag for flag, key in ENCODER_KEYS.items()}  # and back
FORMAT_VERSION = 2  # 2: everything under "fastjepa" loads weights-only (1 pickled NumPy's RNG state as an array)
ENCODER_FORMAT = "fastjepa.encoder"  # the safetensors metadata's "format"
ENCODER_FORMAT_VERSION = 2  # 2: the metadata's "sha256" is the tensors' content hash (tensors_digest)
SAFETENSORS_SUFFIX = ".safetensors"
# What fastjepa <= format 1 pickled beyond weights-only types: NumPy's RNG state array
# (module path under NumPy 2, and under NumPy 1). Allowed by the converter alone.
OLD_NUMPY_GLOBALS = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names Python globals beyond weights-only types: loading
    it could run code, so it was not opened. ``wanted`` lists those globals."""

    def __init__(self, message: str, path: Path, wanted: Sequence[str]):
        super().__init__(message)
        self.path, self.wanted = path, list(wanted)


class UnverifiedCheckpointWarning(UserWarning):
    """A fastjepa safetensors export of format 1 was read: it records no content hash, so
    damage to its tensors cannot be detected (export it again to add one)."""


class TrustedCheckpointWarning(UserWarning):
    """A checkpoint was opened with ``trust=True`` although it needs more than weights-only."""


_WARNED: set[str] = set()  # files already warned about (trust=True warns once per file)


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a leading ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) from every key."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[Any, str], None], *, binary: bool = True, durable: bool = True) -> None:
    """Write a file through a temporary one in ``path``'s folder, renamed over ``path``: a
    reader (or a run killed half-way) sees the old file or the new one, never half of one.
    ``write(f, tmp_name)`` fills the open temporary file; ``durable`` fsyncs it before the
    rename and the folder after (checkpoints, exports; not needed for small reports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f, tmp)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = exc.__context__
        if isinstance(exc, RuntimeError) and isinstance(cause, OSError):
            # torch.save reports a failed write (a full disk) as an "enforce fail" RuntimeError
            # raised while handling the OSError: the OSError says what happened
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` to ``path`` atomically (see :func:`atomic_write`). For small reports
    (eval.json, benchmark tables); checkpoints use :func:`atomic_save`."""
    atomic_write(path, lambda f, tmp: f.write(text), binary=False, durable=False)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """

    atomic_write(path, lambda f, tmp: torch.save(obj, f))


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


def keep_as_copy(src: Path, dst: Path, write: Callable[[Path], None]) -> None:
    """Make ``dst`` hold what ``src`` holds, atomically, ``src`` staying as it is: a hard
    link renamed over ``dst`` (no second write: checkpoint files are only ever replaced,
    never changed in place); where hard links are not supported, ``write(dst)`` writes it
    again (itself atomic, as :func:`atomic_save`)."""
    link = dst.with_name(f".{dst.name}.link")
    try:
        if link.exists():
            link.unlink()
        os.link(src, link)
        os.replace(link, dst)
    except OSError:
        if link.exists():
            link.unlink()
        write(dst)
    fsync_dir(dst.parent)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without ``module.`` / ``_orig_mod.`` prefixes, tensors on the CPU."""
    return {k: v.detach().cpu() for k, v in strip_module_prefix(_unwrap(module).state_dict()).items()}


_PRIMITIVES = (bool, int, float, str, bytes, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def plain(obj: Any, where: str = "value") -> Any:
    """``obj`` as types a weights-only load accepts: tensors, numbers, strings, None and
    dicts / lists / tuples of them. NumPy arrays become tensors and NumPy scalars Python
    numbers; anything else is a ``TypeError`` naming where it sits (``where``)."""
    if isinstance(obj, _PRIMITIVES):
        return obj
    if isinstance(obj, Mapping):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; a weights-only checkpoint holds str or number keys")
            out[key] = plain(value, f"{where}.{key}")
        if hasattr(obj, "_metadata"):  # a module state dict's version record
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biufc":
                raise TypeError(f"{where}: a NumPy array of dtype {obj.dtype}; a weights-only checkpoint holds numeric arrays only")
            return torch.from_numpy(obj.copy())
        if isinstance(obj, np.generic):
            return obj.item()
    raise TypeError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored weights-only "
        "(expected tensors, numbers, strings, None, or dicts / lists / tuples of them)"
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | Mapping[str, Any],
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
    """Write the three networks and the training state to ``path`` atomically.

    ``model``: an :class:`~fastjepa.IJEPA` (or anything with ``encoder``, ``predictor``,
    ``target_encoder``) and its ``optimizer``; or their ready state dicts
    ``{"encoder", "predictor", "target_encoder", "opt"}`` (e.g. full state dicts gathered
    from FSDP2 shards), the optimizer's under ``"opt"``."""
    if isinstance(model, Mapping):
        if optimizer is not None:
            raise TypeError("save_checkpoint: with ready state dicts, pass the optimizer's state as states['opt'], not optimizer=")
        states = {name: strip_module_prefix(model[name]) for name in MODEL_KEYS}
        opt = model.get("opt")
    else:
        module = _unwrap(model)
        states = {name: model_state(getattr(module, name)) for name in MODEL_KEYS}
        opt = optimizer.state_dict() if optimizer is not None else None
    ckpt = {
        **states,
        "opt": opt,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "loss": float(loss),
        "batch_size": int(batch_size),
        "world_size": int(world_size),
        "lr": float(lr),
        "fastjepa": plain({"format_version": FORMAT_VERSION, **(dict(extra) if extra else {})}, "fastjepa"),
    }
    atomic_save(ckpt, path)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _damaged(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is damaged or truncated and cannot be read: {type(exc).__name__}: {_first_line(exc)}")


def _unsafe_globals(path: Path, exc: BaseException) -> list[str]:
    """The globals a file's pickle names beyond weights-only types, read off its opcodes
    (nothing is executed); from the error message when the file is not a zip archive."""
    found: list[str] = []
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is not None:
        try:
            found = list(scan(path))
        except Exception:  # legacy (non-zip) format, or a damaged archive
            found = []
    if not found and not zipfile.is_zipfile(path):  # a raw pickle or torch's legacy format
        found = _pickle_globals(path)
    if not found:
        found = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(exc))
    return sorted(dict.fromkeys(found))


def _refusal(path: Path, wanted: Sequence[str]) -> str:
    head = (
        f"checkpoint {path} was not opened: loading it would call {', '.join(wanted)}, which a weights-only load refuses "
        "(a checkpoint needs only tensors, numbers, strings and containers; anything else can run code)"
    )
    if set(wanted) <= set(OLD_NUMPY_GLOBALS):
        return (
            f"{head}. It looks like a checkpoint of an earlier fastjepa: rewrite it once with "
            f"`python -m fastjepa.checkpoint convert {path} NEW.pth.tar`, or, if you trust its source, "
            "pass --trust-checkpoint (Python: trust=True)"
        )
    return (
        f"{head}. If you trust its source: pass --trust-checkpoint (Python: trust=True), or rewrite it once as a "
        f"weights-only file with `python -m fastjepa.checkpoint convert --trust-checkpoint {path} NEW.pth.tar`"
    )


def verify_zip_checksums(path: Path) -> None:
    """Check every entry of a ``torch.save`` zip archive against the CRC-32 the writer
    recorded for it (``torch.load`` never does): a flipped byte anywhere in the file's
    tensors or pickle is an error naming the file and the entry. Entries written without
    a checksum (``compute_crc32=False`` records 0) are not checked; a file that is not a
    zip archive (torch's legacy format) has none to check."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0 or info.file_size == 0 or info.is_dir():
                    continue
                with zf.open(info) as f:
                    while f.read(1 << 24):
                        pass
    except zipfile.BadZipFile as exc:
        if "CRC" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} is damaged: {exc.args[0] if exc.args else exc} (the file changed after it was "
                "written: a disk or copy error, or an edit); use another copy or an earlier checkpoint"
            ) from None
        raise _damaged(path, exc) from None
    except (OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise _damaged(path, exc) from None


def _pickle_globals(path: Path, *, max_pickles: int = 5) -> list[str]:
    """The globals named by the pickles at the start of a file that is not a zip archive
    (a raw pickle, or torch's legacy format: magic number, protocol, system info, the
    object, its storage keys — five pickles, then raw tensor bytes), read off their opcodes
    with :mod:`pickletools` — nothing is executed. Stops at the first byte that does not
    start a pickle."""
    import pickletools

    found: list[str] = []
    try:
        with open(path, "rb") as f:
            for _ in range(max_pickles):
                strings: list[str] = []
                memo: dict[int, Any] = {}
                for op, arg, _pos in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", ".").replace("__builtin__.", "builtins."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str) and "UNICODE" in op.name or op.name in ("SHORT_BINSTRING", "BINSTRING", "STRING"):
                        strings.append(str(arg))
                    elif op.name == "MEMOIZE" and strings:
                        memo[len(memo)] = strings[-1]
                    elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                        memo[int(arg)] = strings[-1]
                    elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
                        strings.append(memo[int(arg)])
    except Exception:  # the end of the pickles, or bytes that are not one: what was found so far
        pass
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # torch moved it: name every global (the list is a message, not a decision)
        allowed = set()
    return [g for g in dict.fromkeys(found) if g not in allowed]


def _load_trusted(path: Path) -> Any:
    """The only place fastjepa unpickles arbitrary objects: reached with ``trust=True`` alone."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _torch_load(path: Path, *, trust: bool = False, allow: Sequence[Any] = ()) -> Any:
    """Every read of a ``torch.save`` file in fastjepa: ``weights_only=True``, so the file
    cannot run code. ``allow``: exact extra globals for :func:`torch.serialization.safe_globals`
    (the converter's NumPy array types only). A file that needs more raises
    :class:`UnsafeCheckpointError` naming the globals; with ``trust=True`` it is loaded
    in full instead, with a :class:`TrustedCheckpointWarning` (once per file). The archive's
    checksums are verified first (:func:`verify_zip_checksums`)."""
    verify_zip_checksums(path)
    try:
        if allow:
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise _damaged(path, exc) from exc
        wanted = _unsafe_globals(path, exc)
        if not trust:
            if not wanted:  # refused, but for no global: a damaged or foreign pickle
                raise _damaged(path, exc) from None
            raise UnsafeCheckpointError(_refusal(path, wanted), path, wanted) from None
        key = str(path.resolve())
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"fastjepa: opening {path} with trust=True (--trust-checkpoint): it needs "
                f"{', '.join(wanted) or 'more than weights-only'}, and any code it carries runs now",
                TrustedCheckpointWarning,
                stacklevel=3,
            )
        try:
            return _load_trusted(path)
        except Exception as exc2:  # a damaged pickle fails in any of the unpickler's ways
            raise _damaged(path, exc2) from None
    except MemoryError:
        raise
    except Exception as exc:  # a damaged pickle fails in any of the unpickler's ways (IndexError, KeyError, ...)
        raise _damaged(path, exc) from None


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict onto the CPU, weights-only, failing loudly on a missing,
    damaged or unsafe file (``trust=True`` opens the last kind anyway, with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): damaged or an interrupted write")
    if path.name.endswith(SAFETENSORS_SUFFIX):
        raise CheckpointError(
            f"checkpoint {path} is a safetensors file (one encoder, no training state): load it with "
            "load_encoder or python -m fastjepa.eval --checkpoint; resuming needs a .pth.tar"
        )
    ckpt = _torch_load(path, trust=trust)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's tensors in name order: each name, dtype, shape and raw
    bytes (the content hash a safetensors export records, independent of file layout)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


RUN_PREFERENCES = ("best", "latest")
RUN_KINDS = ("best", "latest", "prev")  # a run folder's checkpoints: <tag>-<kind>.pth.tar


def resolve_run_checkpoint(path: str | os.PathLike, prefer: str = "best", *, strict: bool = True) -> Path:
    """The checkpoint a path means: a file is itself; a run folder gives its
    ``<tag>-best.pth.tar`` (the epoch checkpoint with the highest target-encoder RankMe,
    kept by training; docs/eval.md) when ``prefer="best"`` and it has one, else its
    ``<tag>-latest.pth.tar`` (else ``<tag>-prev.pth.tar``, left alone by a crash between the
    two renames of a write). Callers say which they picked (``path.name``,
    :func:`run_checkpoint_kind`). Raises :class:`CheckpointError` for a folder with several
    run tags, and for one with none unless ``strict=False``, which returns such a folder
    (another tool's: a Hugging Face or timm folder) as it is."""
    if prefer not in RUN_PREFERENCES:
        raise ValueError(f"resolve_run_checkpoint: prefer={prefer!r}, expected one of {', '.join(RUN_PREFERENCES)}")
    path = Path(path)
    if not path.is_dir():
        return path
    if not strict and not any(any(path.glob(f"*-{kind}.pth.tar")) for kind in RUN_KINDS):
        return path
    order = RUN_KINDS if prefer == "best" else RUN_KINDS[1:]
    for kind in order:
        found = sorted(path.glob(f"*-{kind}.pth.tar"))
        if len(found) > 1:
            raise CheckpointError(f"{path} holds several {kind} checkpoints ({', '.join(p.name for p in found)}): pass one of them")
        if found:
            return found[0]
    raise CheckpointError(f"{path} is a folder without a <tag>-latest.pth.tar: pass a run folder or a checkpoint file")


def run_checkpoint_kind(path: str | os.PathLike) -> str:
    """``"best"`` | ``"latest"`` | ``"prev"`` for a run folder's ``<tag>-<kind>.pth.tar``."""
    return Path(path).name[: -len(".pth.tar")].rsplit("-", 1)[-1]

"""What every launcher needs besides tiles: the device guard and the JIT decorator.

* :func:`on_device`: Triton launches on the *current* CUDA device (its stream, its
  context), not on the device of the tensors it is given. Tensors on ``cuda:1`` while
  ``cuda:0`` is current would be read through the wrong context. Every launcher enters
  ``on_device(<its output's device>)`` around its kernel launches; the guard costs one
  C call when the device is already current and nothing for CPU tensors (the CPU
  interpreter).
* :func:`jit`: ``triton.jit`` with ``do_not_specialize`` for the arguments that change from
  batch to batch (mask lengths, row counts). Triton specialises an integer argument on
  ``== 1`` and on divisibility by 16 and compiles one kernel per combination, so a mask
  length that moves across a multiple of 16 would compile the kernel again in the middle
  of training. Strides and widths (multiples of the model width) keep their
  specialisation: it is what lets the compiler prove 16-byte alignment and vectorise.
  So does a length that bounds the vectorised axis of a masked access (the loss's
  element count ``n``): without its divisibility the loads would go one element at a
  time; it is a multiple of the width, so it does not move with the masks.
"""

from __future__ import annotations

import contextlib

import torch
import triton

_NO_GUARD = contextlib.nullcontext()  # reusable: entering and leaving it does nothing


def on_device(device: torch.device):
    """Context manager that makes ``device`` the current CUDA device for a launch (a no-op
    for non-CUDA devices and when it is current already)."""
    if device.type != "cuda":
        return _NO_GUARD
    index = device.index
    if index is None or index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(index)


def jit(*, dynamic: tuple[str, ...]):
    """``triton.jit`` that does not specialise the integer arguments named in ``dynamic``."""
    return triton.jit(do_not_specialize=list(dynamic))


def dynamic_args(kernel) -> tuple[str, ...]:
    """The argument names a kernel made by :func:`jit` leaves unspecialised (compiled or
    interpreted)."""
    names = getattr(kernel, "arg_names", [])
    dns = getattr(kernel, "do_not_specialize", None)
    if dns is None:  # the interpreter keeps the decorator's keyword arguments
        dns = getattr(kernel, "kwargs", {}).get("do_not_specialize") or []
    return tuple(names[a] if isinstance(a, int) else a for a in dns)


_ARANGE: dict[tuple, torch.Tensor] = {}
_ARANGE_MAX = 16  # (rows, n, device, dtype) combinations kept; training uses one or two


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def arange_rows(rows: int, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous (rows, n) tensor whose every row is ``arange(n)``, read-only, cached.

    Built fresh (not cached) while a CUDA graph is being captured: a tensor allocated
    during capture lives in the graph's private memory and is filled only on replay."""
    key = (rows, n, device, dtype)
    t = _ARANGE.get(key)
    if t is None:
        t = torch.arange(n, device=device, dtype=dtype).expand(rows, n).contiguous()
        if not capturing(device):
            if len(_ARANGE) >= _ARANGE_MAX:
                _ARANGE.clear()
            _ARANGE[key] = t
    return t

"""Scaled dot-product attention with selectable backends.

``attention(q, k, v)`` takes (B, H, N, hd) tensors and returns (B, H, N, hd).

Backends:

* ``flash``    — ``flash_attn.flash_attn_func`` (optional extra ``fastjepa[flash]``;
  CUDA, fp16/bf16, head dim <= 256 and a multiple of 8).
* ``xformers`` — ``xformers.ops.memory_efficient_attention`` (optional extra
  ``fastjepa[xformers]``; when installed and loadable).
* ``sdpa``     — ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks
  its flash / memory-efficient / math kernel).
* ``math``     — the reference: an explicit softmax of the (B, H, N, N) scores.

``auto`` (default) picks flash-attn when it can run the inputs, else SDPA.
:func:`why_not` says why a backend cannot run given inputs (None when it can).
``FASTJEPA_ATTN`` (environment, read once: :func:`fastjepa.ops.reread_environment`) or
:func:`use_attention` forces one; a forced backend that cannot run says why. The setting
sits beside the fused ops' in :mod:`fastjepa.ops._dispatch` (one registry).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ._dispatch import ATTENTION_BACKEND, ATTN_BACKENDS, Availability, assume_constant_result

CPU_HALF_MATH_MAX_N = 256  # auto: CPU bf16/fp16 attention over at most this many tokens uses math (faster there: docs/performance.md)


@assume_constant_result
def current_attention() -> str:
    """The setting in force: the innermost :func:`use_attention`, else ``FASTJEPA_ATTN``.

    Under ``torch.compile`` it is read once, when a graph is traced (Dynamo cannot trace a
    ContextVar, and a graph break per block would cost more than the attention): a compiled
    block keeps the backend it was compiled with until ``torch._dynamo.reset()``.
    """
    return ATTENTION_BACKEND.current()


def use_attention(name: str):
    """Force an attention backend inside a ``with`` block (overrides ``FASTJEPA_ATTN``)."""
    return ATTENTION_BACKEND.use(name, "use_attention")


_IMPORTS: dict[str, tuple] = {}


def _import(module: str):
    """(module, None) or (None, why); tried once per process (a plain dict, so that
    ``torch.compile`` traces the lookup without a graph break)."""
    if module not in _IMPORTS:
        try:
            _IMPORTS[module] = (importlib.import_module(module), None)
        except Exception as exc:  # noqa: BLE001 — a broken optional install can raise anything at import
            _IMPORTS[module] = (None, f"{module} does not import ({type(exc).__name__}: {exc})")
    return _IMPORTS[module]


def attention_available() -> dict[str, Availability]:
    """Whether each backend is installed and loadable here (not yet whether it suits given inputs)."""
    flash, why_flash = _import("flash_attn")
    xf, why_xf = _import("xformers.ops")
    return {
        "flash": Availability(True, f"flash-attn {flash.__version__}") if flash else Availability(False, why_flash),
        "xformers": Availability(True, "xformers") if xf else Availability(False, why_xf),
        "sdpa": Availability(True, f"torch {torch.__version__}"),
        "math": Availability(True, "explicit softmax"),
    }


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype on CUDA under autocast, else q's."""
    if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return q.dtype


def why_not(backend: str, q: torch.Tensor) -> str | None:
    """Why ``backend`` cannot run attention on inputs like ``q`` (B, H, N, hd); None if it can."""
    if backend not in ATTN_BACKENDS[1:]:
        raise ValueError(f"why_not: {backend!r} is not an attention backend; expected one of {', '.join(ATTN_BACKENDS[1:])}")
    if backend in ("sdpa", "math"):
        return None
    if q.device.type != "cuda":  # checked first: CPU calls (compiled ones too) never try the import
        return f"{backend} needs CUDA tensors, got {q.device.type}"
    module, why = _import("flash_attn" if backend == "flash" else "xformers.ops")
    if module is None:
        return why
    dtype, hd = _compute_dtype(q), q.size(-1)
    if backend == "flash":
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs float16 or bfloat16 (or CUDA autocast to one), got {dtype}"
        if hd > 256 or hd % 8 != 0:
            return f"flash-attn needs a head dim <= 256 and a multiple of 8, got {hd}"
        major, _ = torch.cuda.get_device_capability(q.device)
        if major < 8:
            return f"flash-attn 2 needs compute capability >= 8.0, got {major}.x"
    if backend == "xformers" and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers needs float16, bfloat16 or float32, got {dtype}"
    return None


def select_attention(q: torch.Tensor) -> str:
    """The backend that runs for ``q`` under the current setting.

    ``auto``: flash-attn when it can run the inputs (CUDA, half precision), else SDPA,
    which itself picks its flash / memory-efficient / math kernel (and on the CPU, a
    fused flash-style kernel for fp32 and bf16). xformers is never picked by ``auto``:
    on the head dims of I-JEPA SDPA's kernels cover the same ground; force it to compare.
    """
    want = current_attention()
    if want == "auto":
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.size(-2) <= CPU_HALF_MATH_MAX_N:
            return "math"
        return "flash" if why_not("flash", q) is None else "sdpa"
    why = why_not(want, q)
    if why is not None:
        raise RuntimeError(f"attention backend {want!r} was forced but cannot run these inputs: {why}")
    return want


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Explicit softmax attention, as the reference Attention module computes it."""
    scale = q.size(-1) ** -0.5 if scale is None else scale
    attn = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, N)
    attn = attn.softmax(dim=-1)
    return attn @ v  # (B, H, N, hd)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, backend: str | None = None
) -> torch.Tensor:
    """Softmax attention of (B, H, N, hd) q, k, v; ``scale`` defaults to ``hd**-0.5``. No mask, no dropout."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"attention: expected q, k, v of one shape (B, H, N, hd), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if backend is None:
        name = select_attention(q)
    else:
        name = ATTENTION_BACKEND.check(backend, "attention(backend=...)")
        name = select_attention(q) if name == "auto" else name
        why = why_not(name, q)
        if why is not None:
            raise RuntimeError(f"attention backend {name!r} cannot run these inputs: {why}")
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if name == "math":
        return attention_reference(q, k, v, scale)
    if name == "flash":
        flash_attn, _ = _import("flash_attn")
        dtype = _compute_dtype(q)
        q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # (B, N, H, hd)
        return flash_attn.flash_attn_func(q, k, v, softmax_scale=scale).transpose(1, 2)  # (B, H, N, hd)
    if name == "xformers":
        xops, _ = _import("xformers.ops")
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, H, hd)
        return xops.memory_efficient_attention(q, k, v, scale=scale).transpose(1, 2)  # (B, H, N, hd)
    raise AssertionError(f"attention: unhandled backend {name!r}")

"""Backend selection for the fused ops (and the registry of every backend setting).

Which implementation runs is decided per call from the inputs and one setting:

* ``FASTJEPA_BACKEND`` (environment) or :func:`use_backend` (context manager, wins
  over the environment): ``auto`` (default), ``reference``, ``triton`` or ``cpp``.
  The environment is read once, at the first call that needs it;
  :func:`reread_environment` reads it again (after a change of ``os.environ``).
* ``auto``: CUDA tensors -> Triton, CPU tensors -> the C++ extension when it is
  built, anything else (float64, a missing backend) -> the pure-PyTorch reference.
* A forced backend that cannot run the given inputs raises ``RuntimeError`` saying
  why, instead of quietly falling back.

Availability is data, never an import error: :func:`available` returns, for each
backend, whether it runs here and, if not, why.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "reference", "triton", "cpp")
CPP_CUDA_OPS = frozenset({"gather_tokens"})  # ops with a CUDA kernel in csrc/cuda/
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)



@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str  # version/build info when ok, the reason when not

    def __bool__(self) -> bool:
        return self.ok


class BackendSetting:
    """One backend choice (the fused ops', attention's): the innermost :meth:`use` block,
    else the environment variable ``env`` (read once, at first use; :meth:`reread`), else
    ``auto``. Every setting is listed in :data:`SETTINGS`."""

    def __init__(self, env: str, choices: tuple[str, ...], what: str):
        self.env, self.choices, self.what = env, choices, what
        self._override: contextvars.ContextVar[str | None] = contextvars.ContextVar(env.lower(), default=None)
        self._from_env: str | None = None  # the variable's value, once read

    def check(self, name: str, source: str) -> str:
        """``name`` if it is one of the choices, else a ``ValueError`` naming ``source``."""
        if name not in self.choices:
            raise ValueError(f"{source}={name!r} is not {self.what}; expected one of {', '.join(self.choices)}")
        return name

    def current(self) -> str:
        name = self._override.get()
        if name is not None:
            return name
        if self._from_env is None:
            self._from_env = os.environ.get(self.env, "auto").strip().lower() or "auto"
        return self.check(self._from_env, self.env)  # a bad value raises at every call, not once

    def reread(self) -> None:
        """Forget the environment's value: the next :meth:`current` reads it again."""
        self._from_env = None

    @contextlib.contextmanager
    def use(self, name: str, source: str):
        token = self._override.set(self.check(name, source))
        try:
            yield
        finally:
            self._override.reset(token)


ATTN_BACKENDS = ("auto", "flash", "xformers", "sdpa", "math")
OPS_BACKEND = BackendSetting("FASTJEPA_BACKEND", BACKENDS, "a fastjepa backend")
ATTENTION_BACKEND = BackendSetting("FASTJEPA_ATTN", ATTN_BACKENDS, "an attention backend")  # fastjepa.ops.attention
SETTINGS = (OPS_BACKEND, ATTENTION_BACKEND)


def reread_environment() -> None:
    """Read ``FASTJEPA_BACKEND`` and ``FASTJEPA_ATTN`` again at their next use (each is read
    once per process otherwise). Code traced by ``torch.compile`` keeps the backend it was
    traced with until ``torch._dynamo.reset()``."""
    for setting in SETTINGS:
        setting.reread()


def assume_constant_result(fn):
    """``torch._dynamo.assume_constant_result`` without importing Dynamo (over a second of
    import time): it only marks the function, and Dynamo reads the mark when tracing."""
    fn._dynamo_marked_constant = True
    return fn


@assume_constant_result
def current_backend() -> str:
    """The backend setting in force: the innermost :func:`use_backend`, else the env.

    Under ``torch.compile`` it is read once, when a graph is traced (Dynamo cannot trace a
    ContextVar): compiled code keeps the backend it was traced with until
    ``torch._dynamo.reset()``.
    """
    return OPS_BACKEND.current()


def use_backend(name: str):
    """Force a backend inside a ``with`` block (overrides ``FASTJEPA_BACKEND``)."""
    return OPS_BACKEND.use(name, "use_backend")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX) for oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels():
    """The ``fastjepa.kernels`` package (Triton kernels + launchers), imported on first use
    so that ``import fastjepa`` does not import Triton."""
    return importlib.import_module("fastjepa.kernels")


def _interpreter_broken(triton_version: str) -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels here, or None.

    Triton < 3.7's interpreter turns a loop bound that is a kernel argument into a
    one-element array and calls ``int()`` on it, which NumPy >= 2.4 refuses (TypeError:
    only 0-dimensional arrays can be converted); every kernel with such a loop fails.
    Compiled kernels (a GPU) are unaffected.
    """
    if not triton_interpret():
        return None
    try:
        major, minor = (int(x) for x in triton_version.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) >= (3, 7):
        return None
    import warnings

    import numpy as np

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # NumPy 1.25-2.3 warn, 2.4 raises
            int(np.zeros(1, dtype=np.int64))
    except TypeError:
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run on NumPy {np.__version__}: "
            "on a CPU-only machine install triton>=3.7 (the `interpret` extra); with a CUDA torch keep the Triton it "
            "pins and install numpy<2.4, or run the compiled kernels on the GPU (TRITON_INTERPRET=0)"
        )
    return None


@functools.cache
def _triton_available() -> Availability:
    try:
        triton = importlib.import_module("triton")
    except ImportError as exc:
        return Availability(False, f"triton is not installed ({exc})")
    why = _interpreter_broken(getattr(triton, "__version__", ""))
    if why is not None:
        return Availability(False, why)
    try:
        kernels()
    except ImportError as exc:
        return Availability(False, f"fastjepa.kernels does not import ({exc})")
    return Availability(True, f"triton {getattr(triton, '__version__', '?')}")


class ExtensionVersionWarning(UserWarning):
    """fastjepa._C was compiled against another torch version than the one running."""


def cpp_torch_mismatch(module: object) -> str | None:
    """The problem, when the loaded extension ``module`` was compiled against another torch
    (its ``build_info()["torch"]``, torch's TORCH_VERSION at build time) than the running
    one; None when they agree or the extension does not say."""
    try:
        built = str(module.build_info().get("torch", "")).strip()
    except Exception:  # an extension without build_info
        return None
    running = torch.__version__.split("+")[0]
    if not built or built.split("+")[0] == running:
        return None
    return (
        f"fastjepa._C was built for torch {built} but torch {running} is running: its ops may fail or misbehave; "
        "rebuild it (pip install -e . --no-build-isolation, or python setup.py build_ext --inplace)"
    )


@functools.cache
def _cpp_available() -> Availability:
    if os.environ.get("FASTJEPA_NO_EXT", "0") == "1":
        return Availability(False, "disabled by FASTJEPA_NO_EXT=1")
    try:
        module = importlib.import_module("fastjepa._C")
    except ImportError as exc:
        return Availability(False, f"the fastjepa._C extension is not built ({exc})")
    except OSError as exc:  # built against another torch, missing shared library
        return Availability(False, f"the fastjepa._C extension does not load ({exc})")
    problem = cpp_torch_mismatch(module)
    if problem:
        import warnings

        warnings.warn(problem, ExtensionVersionWarning, stacklevel=2)
        return Availability(True, f"fastjepa._C loaded; {problem}")
    return Availability(True, "fastjepa._C loaded")


def available() -> dict[str, Availability]:
    """What runs here: ``{"reference": ..., "triton": ..., "cpp": ...}``."""
    return {"reference": Availability(True, "pure PyTorch"), "triton": _triton_available(), "cpp": _cpp_available()}


def _why_not(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``backend`` can run inputs on ``device`` with ``dtype``, else the reason."""
    if backend == "reference":
        return None
    if dtype not in FUSED_DTYPES:
        return f"dtype {dtype} is not one of the fused dtypes (float32, bfloat16, float16)"
    avail = available()[backend]
    if not avail:
        return avail.reason
    if backend == "triton":
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"tensors on {device} need CUDA (or TRITON_INTERPRET=1 for CPU tensors)"
    if backend == "cpp":
        if device.type == "cpu":
            return None
        if device.type == "cuda" and cpp_has_cuda():
            return None
        return f"the extension has no kernels for {device}"
    raise AssertionError(backend)


def cpp_has_cuda() -> bool:
    if not _cpp_available():
        return False
    return bool(getattr(importlib.import_module("fastjepa._C"), "WITH_CUDA", False))


@assume_constant_result
def select(op: str, device: torch.device, dtype: torch.dtype, *, cpp_op: bool = True) -> str:
    """Pick ``"reference"``, ``"triton"`` or ``"cpp"`` for one call of ``op``.

    Under ``torch.compile`` it runs once, when a graph is traced (its inputs are constants
    there, and availability checks import modules, which Dynamo cannot trace).

    ``cpp_op=False`` for ops the extension does not implement (then ``cpp`` on such an
    op runs the reference in ``auto`` mode and raises when forced).
    """
    want = current_backend()
    if want == "auto":
        if device.type == "cuda" and _why_not("triton", device, dtype) is None:
            return "triton"
        if cpp_op and device.type == "cpu" and _why_not("cpp", device, dtype) is None:
            return "cpp"
        return "reference"
    if want == "cpp" and not cpp_op:
        raise RuntimeError(f"fastjepa.ops.{op}: FASTJEPA_BACKEND=cpp, but the C++ extension has no {op} kernel")
    if want == "cpp" and device.type == "cuda" and op not in CPP_CUDA_OPS:
        raise RuntimeError(
            f"fastjepa.ops.{op}: FASTJEPA_BACKEND=cpp was forced on {device}, but the extension's CUDA kernels cover "
            f"only {', '.join(sorted(CPP_CUDA_OPS))}; use FASTJEPA_BACKEND=triton or auto on CUDA"
        )
    why = _why_not(want, device, dtype)
    if why is not None:
        raise RuntimeError(f"fastjepa.ops.{op}: backend {want!r} was forced but cannot run here: {why}")
    return want


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def direct(*tensors: torch.Tensor | None) -> bool:
    """Whether a fused op may call its kernels through a plain ``torch.autograd.Function``
    instead of its ``torch.library`` custom op.

    The custom op is what ``torch.compile``, fake tensors, functorch transforms and tensor
    subclasses need; in plain eager mode its layers (the dispatcher, the generated
    autograd wrapper, a redispatch per call and per backward) cost more host time than a
    small kernel runs on a GPU. The direct path runs the same launchers with the same
    saved state. It is taken only for plain tensors (or parameters), outside
    ``torch.compile``, with no dispatch mode (``FakeTensorMode``, ``FlopCounterMode``, ...)
    and no functorch transform active.
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TENSORS:
            return False
    return True

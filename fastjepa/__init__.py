"""fastjepa: fast, faithful I-JEPA pretraining on PyTorch.

Public entry points: :mod:`fastjepa.models`, :mod:`fastjepa.masks`, :mod:`fastjepa.ops`,
:class:`fastjepa.IJEPA`, :mod:`fastjepa.checkpoint`, ``python -m fastjepa.train``.
"""

__version__ = "0.1.0"

__all__ = ["IJEPA", "__version__"]


def __getattr__(name: str):
    # IJEPA on first use: importing the package does not load torch, so the command lines
    # can set OpenMP's environment (fastjepa.training.cpu) before torch loads OpenMP
    if name == "IJEPA":
        from .ijepa import IJEPA

        return IJEPA
    raise AttributeError(f"module 'fastjepa' has no attribute {name!r}")

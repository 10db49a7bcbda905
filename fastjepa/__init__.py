"""fastjepa: fast, faithful I-JEPA pretraining on PyTorch.

Public entry points: :mod:`fastjepa.models`, :mod:`fastjepa.masks`, :mod:`fastjepa.ops`,
:class:`fastjepa.IJEPA`, :func:`fastjepa.load_encoder`, :mod:`fastjepa.checkpoint`,
``python -m fastjepa.train``.
"""

from .version import __version__

__all__ = ["IJEPA", "__version__", "load_encoder"]


def __getattr__(name: str):
    # IJEPA on first use: importing the package does not load torch, so the command lines
    # can set OpenMP's environment (fastjepa.training.cpu) before torch loads OpenMP
    if name == "IJEPA":
        from .models.ijepa import IJEPA

        return IJEPA
    raise AttributeError(f"module 'fastjepa' has no attribute {name!r}")


def load_encoder(path, *, which: str = "target", trust: bool = False, device=None):
    """A ready encoder (a :class:`fastjepa.models.VisionTransformer`, eval mode) from a
    fastjepa run folder or checkpoint, a reference I-JEPA checkpoint, a fastjepa, Hugging
    Face or timm export; its architecture is read from the file. See
    :func:`fastjepa.interop.load_encoder` (imported on first call: ``import fastjepa``
    stays light)."""
    from .interop import load_encoder as load

    return load(path, which=which, trust=trust, device=device)

"""fastjepa: fast, faithful I-JEPA pretraining on PyTorch.

Public entry points: :mod:`fastjepa.models`, :mod:`fastjepa.masks`, :mod:`fastjepa.ops`,
:class:`fastjepa.IJEPA`, :func:`fastjepa.load_encoder`, :mod:`fastjepa.checkpoint`,
``python -m fastjepa.train``.
"""

__version__ = "0.1.0"

from .ijepa import IJEPA

__all__ = ["IJEPA", "__version__", "load_encoder"]


def load_encoder(path, *, which: str = "target", trust: bool = False, device=None):
    """A ready encoder (a :class:`fastjepa.models.VisionTransformer`, eval mode) from a
    fastjepa run folder or checkpoint, a reference I-JEPA checkpoint, a fastjepa, Hugging
    Face or timm export; its architecture is read from the file. See
    :func:`fastjepa.encoders.load_encoder` (imported on first call: ``import fastjepa``
    stays light)."""
    from .encoders import load_encoder as load

    return load(path, which=which, trust=trust, device=device)

"""fastjepa: fast, faithful I-JEPA pretraining on PyTorch.

Public entry points: :mod:`fastjepa.models`, :mod:`fastjepa.masks`, :mod:`fastjepa.ops`,
:class:`fastjepa.IJEPA`, :mod:`fastjepa.checkpoint`, ``python -m fastjepa.train``.
"""

__version__ = "0.1.0"

from .ijepa import IJEPA

__all__ = ["IJEPA", "__version__"]

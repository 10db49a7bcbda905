"""fastjepa: fast, faithful I-JEPA pretraining on PyTorch.

Public entry points: :mod:`fastjepa.models`, :mod:`fastjepa.masks`, :mod:`fastjepa.ops`,
:class:`fastjepa.IJEPA`, :mod:`fastjepa.checkpoint`, ``python -m fastjepa.train``.
"""

from .models.ijepa import IJEPA
from .version import __version__

__all__ = ["IJEPA", "__version__"]

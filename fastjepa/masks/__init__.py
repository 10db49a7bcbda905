"""Multi-block masks (docs/design.md §4) and the masking helpers (docs/design.md §3)."""

from ..ops.masks_reference import apply_masks, repeat_interleave_batch
from .multiblock import MaskCollator, block_size
from .multiblock3d import MaskCollator3D

__all__ = ["MaskCollator", "MaskCollator3D", "apply_masks", "block_size", "repeat_interleave_batch"]

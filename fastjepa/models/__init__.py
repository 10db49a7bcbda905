"""I-JEPA models: the ViT encoder, the predictor, their factories and the I-JEPA model."""

from .ijepa import IJEPA
from .vision_transformer import (
    VIT_SIZES,
    Block,
    VisionTransformer,
    VisionTransformerPredictor,
    set_reference_numerics,
    vit_base,
    vit_giant,
    vit_huge,
    vit_large,
    vit_predictor,
    vit_small,
    vit_tiny,
)

__all__ = [
    "VIT_SIZES",
    "Block",
    "IJEPA",
    "VisionTransformer",
    "VisionTransformerPredictor",
    "set_reference_numerics",
    "vit_base",
    "vit_giant",
    "vit_huge",
    "vit_large",
    "vit_predictor",
    "vit_small",
    "vit_tiny",
]

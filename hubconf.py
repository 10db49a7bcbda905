"""torch.hub entry points (docs/interop.md).

    encoder = torch.hub.load("PATH/TO/fastjepa", "vit_base", source="local", img_size=224)
    encoder = torch.hub.load("PATH/TO/fastjepa", "encoder", "runs/a", source="local")

``vit_tiny`` … ``vit_giant`` build a randomly initialised encoder (keyword arguments as
:mod:`fastjepa.models`' factories); ``vit_predictor`` the predictor; ``encoder(path)``
loads one from any file :func:`fastjepa.load_encoder` reads (run folder, fastjepa or
reference checkpoint, fastjepa / Hugging Face / timm export).
"""

dependencies = ["torch", "numpy", "yaml", "safetensors"]

from fastjepa.models import vit_base, vit_giant, vit_huge, vit_large, vit_predictor, vit_small, vit_tiny  # noqa: E402, F401


def encoder(path, which="target", trust=False, device=None):
    """An encoder from ``path`` (see :func:`fastjepa.load_encoder`): its architecture is
    read from the file; ``which="context"`` for a checkpoint's context encoder."""
    from fastjepa import load_encoder

    return load_encoder(path, which=which, trust=trust, device=device)

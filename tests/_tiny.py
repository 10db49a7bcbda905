"""A tiny training configuration and a tiny model + batch, for fast tests."""

import torch

from fastjepa import IJEPA
from fastjepa.masks import MaskCollator
from fastjepa.models import vit_predictor, vit_tiny

TINY = [
    "data.dataset=synthetic",
    "data.synthetic_samples=48",
    "data.crop_size=16",
    "data.batch_size=8",
    "mask.patch_size=4",
    "mask.min_keep=0",
    "meta.model_name=vit_tiny",
    "meta.model_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "meta.pred_depth=1",
    "meta.pred_emb_dim=16",
    "optimization.epochs=2",
    "optimization.warmup=1",
    "logging.log_freq=2",
    "logging.probe=false",
    "logging.plots=false",
    "logging.tensorboard=false",
    "optimization.time_budget_s=null",  # the default config's budget would re-size the epochs by machine speed
    "meta.use_bfloat16=false",  # fp32: the tests compare paths at fp32 tolerance
]


def tiny_ijepa_batch(*, depth=2, pred_dim=32, batch=4, dtype=torch.float32):
    """A 16-px I-JEPA (encoder head dim 24, predictor head dim ``pred_dim/2``) whose target
    encoder differs from the encoder (as after EMA steps), and one masked batch of random
    images: ``(model, (imgs, masks_enc, masks_pred))``."""
    enc = vit_tiny(patch_size=4, img_size=16, depth=depth, embed_dim=48, num_heads=2)
    pred = vit_predictor(num_patches=16, embed_dim=48, predictor_embed_dim=pred_dim, depth=depth, num_heads=2)
    model = IJEPA(enc, pred).to(dtype)
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    collate = MaskCollator(
        input_size=16,
        patch_size=4,
        enc_mask_scale=(0.6, 0.9),
        pred_mask_scale=(0.15, 0.3),
        aspect_ratio=(0.75, 1.5),
        nenc=1,
        npred=4,
        min_keep=0,
        generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))),
    )
    return model, collate([torch.randn(3, 16, 16, dtype=dtype) for _ in range(batch)])

"""Stand-in for V-JEPA 2's app/vjepa/train.py loss: a copy of apply_masks outside ``src``,
called in its concat=False form over the mask generators (of different lengths)."""

import torch
import torch.nn.functional as F
from src.masks.utils import apply_masks


def loss_of(encoder, target_encoder, predictor, clips, masks_enc, masks_pred):
    """masks_enc / masks_pred: one (B, K) mask per generator; one predictor call per pair."""
    with torch.no_grad():
        h = target_encoder(clips)
        h = F.layer_norm(h, (h.size(-1),))
    h = apply_masks(h, masks_pred, concat=False)
    loss = 0
    for i, (me, mp) in enumerate(zip(masks_enc, masks_pred)):
        z = predictor(encoder(clips, me), me, mp, mask_index=i)
        loss = loss + torch.mean(torch.abs(z - h[i]))
    return loss / len(masks_enc)

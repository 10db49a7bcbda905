"""Stand-in for I-JEPA's training step (src/train.py's forward_target / forward_context / loss)."""

import torch.nn.functional as F

from src.masks.utils import apply_masks
from src.utils.tensors import repeat_interleave_batch


def loss_of(encoder, target_encoder, predictor, imgs, masks_enc, masks_pred):
    B = len(imgs)
    h = F.layer_norm(target_encoder(imgs), (target_encoder.norm.normalized_shape[0],))
    h = repeat_interleave_batch(apply_masks(h, masks_pred), B, repeat=len(masks_enc))
    z = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)
    return F.smooth_l1_loss(z, h)

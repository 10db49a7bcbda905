"""Stand-in for V-JEPA 2's src/models/predictor.py: context + mask tokens, sorted by position."""

import torch
import torch.nn as nn

from src.masks.utils import apply_masks
from src.models.utils.modules import Block
from src.utils.tensors import repeat_interleave_batch


class VisionTransformerPredictor(nn.Module):
    def __init__(self, num_patches, embed_dim=24, predictor_embed_dim=16, depth=2, num_heads=2, use_rope=False,
                 num_mask_tokens=2, **kwargs):
        super().__init__()
        self.num_patches, self.use_rope, self.num_mask_tokens = num_patches, use_rope, num_mask_tokens
        self.chop_last_n_tokens, self.return_all_tokens, self.use_activation_checkpointing = 0, False, False  # V-JEPA 2's defaults
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.randn(1, 1, predictor_embed_dim)) for _ in range(num_mask_tokens))
        self.predictor_pos_embed = None if use_rope else nn.Parameter(torch.randn(1, num_patches, predictor_embed_dim), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(Block(predictor_embed_dim, num_heads, use_rope) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)

    def forward(self, x, masks_x, masks_y, mask_index=1, has_cls=False):
        if has_cls:
            raise NotImplementedError("the stand-in has no class token")
        masks_x = masks_x if isinstance(masks_x, list) else [masks_x]
        masks_y = masks_y if isinstance(masks_y, list) else [masks_y]
        B = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        n_ctx = x.size(1)
        if not self.use_rope:
            x = x + apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), masks_x)
        tokens = self.mask_tokens[mask_index % self.num_mask_tokens].repeat(B, self.num_patches, 1)
        tokens = apply_masks(tokens, masks_y)
        if not self.use_rope:
            pos = apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), masks_y)
            tokens = tokens + repeat_interleave_batch(pos, B, repeat=len(masks_x))
        x = torch.cat([x.repeat(len(masks_x), 1, 1), tokens], dim=1)
        ids = torch.cat([torch.cat(masks_x, 0), torch.cat(masks_y, 0)], dim=1)  # (rows, Kc+Kt)
        order = torch.argsort(ids, dim=1)
        ids = torch.gather(ids, 1, order)
        x = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        for blk in self.predictor_blocks:
            x = blk(x, mask=ids, attn_mask=None)
        x = self.predictor_norm(x)
        back = torch.argsort(order, dim=1)
        x = torch.gather(x, 1, back.unsqueeze(-1).expand(-1, -1, x.size(-1)))[:, n_ctx:]
        return self.predictor_proj(x)

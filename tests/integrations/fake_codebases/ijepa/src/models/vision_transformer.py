"""Stand-in for I-JEPA's src/models/vision_transformer.py (the patched call forms)."""

import torch
import torch.nn as nn

from src.masks.utils import apply_masks
from src.utils.tensors import repeat_interleave_batch


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        scores = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)  # (B, h, N, N)
        scores = self.attn_drop(scores)
        out = (scores @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)), scores


class Block(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, return_attention=False):
        y, scores = self.attn(self.norm1(x))
        if return_attention:
            return scores
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=(32,), patch_size=8, in_chans=3, embed_dim=24, depth=2, num_heads=2, **kwargs):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size[0], patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.randn(1, n, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, pos_embed):
        return pos_embed  # the stand-in never resizes

    def forward(self, x, masks=None):
        if masks is not None and not isinstance(masks, list):
            masks = [masks]
        x = self.patch_embed(x)
        x = x + self.interpolate_pos_encoding(x, self.pos_embed)
        if masks is not None:
            x = apply_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class VisionTransformerPredictor(nn.Module):
    def __init__(self, num_patches, embed_dim=24, predictor_embed_dim=16, depth=2, num_heads=2, **kwargs):
        super().__init__()
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, predictor_embed_dim))
        self.predictor_pos_embed = nn.Parameter(torch.randn(1, num_patches, predictor_embed_dim), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(Block(predictor_embed_dim, num_heads) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)

    def forward(self, x, masks_x, masks):
        assert masks is not None and masks_x is not None, "Cannot run predictor without mask indices"
        masks_x = masks_x if isinstance(masks_x, list) else [masks_x]
        masks = masks if isinstance(masks, list) else [masks]
        B = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        pos = self.predictor_pos_embed.repeat(B, 1, 1)
        x = x + apply_masks(pos, masks_x)
        n_ctx = x.size(1)
        pos_t = repeat_interleave_batch(apply_masks(pos, masks), B, repeat=len(masks_x))
        tokens = self.mask_token.repeat(pos_t.size(0), pos_t.size(1), 1) + pos_t
        x = torch.cat([x.repeat(len(masks), 1, 1), tokens], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        x = self.predictor_norm(x)[:, n_ctx:]
        return self.predictor_proj(x)

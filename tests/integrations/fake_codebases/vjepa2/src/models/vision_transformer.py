"""Stand-in for V-JEPA 2's src/models/vision_transformer.py (the patched call forms)."""

import torch
import torch.nn as nn

from src.masks.utils import apply_masks
from src.models.utils.modules import Block


class PatchEmbed(nn.Module):
    """Conv2d (images) or Conv3d over tubelets (videos) -> (B, N, D)."""

    def __init__(self, conv):
        super().__init__()
        self.proj = conv

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=(32, 32), patch_size=8, num_frames=4, tubelet_size=2, in_chans=3, embed_dim=24,
                 depth=2, num_heads=2, out_layers=None, use_activation_checkpointing=False, use_rope=False,
                 handle_nonsquare_inputs=True, **kwargs):
        super().__init__()
        self.img_height, self.img_width = img_size
        self.patch_size, self.num_frames, self.tubelet_size = patch_size, num_frames, tubelet_size
        self.out_layers, self.use_rope = out_layers, use_rope
        self.use_activation_checkpointing = use_activation_checkpointing
        self.handle_nonsquare_inputs = handle_nonsquare_inputs
        if num_frames > 1:
            kernel = (tubelet_size, patch_size, patch_size)
            self.patch_embed = PatchEmbed(nn.Conv3d(in_chans, embed_dim, kernel, kernel))
            n = (num_frames // tubelet_size) * (img_size[0] // patch_size) * (img_size[1] // patch_size)
        else:
            self.patch_embed = PatchEmbed(nn.Conv2d(in_chans, embed_dim, patch_size, patch_size))
            n = (img_size[0] // patch_size) * (img_size[1] // patch_size)
        self.num_patches = n
        self.pos_embed = None if use_rope else nn.Parameter(torch.randn(1, n, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, use_rope) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, pos_embed):
        return pos_embed  # the stand-in never resizes

    def forward(self, x, masks=None):
        if masks is not None and not isinstance(masks, list):
            masks = [masks]
        if x.ndim == 4:
            _, _, H, W = x.shape
            T = 1
        elif x.ndim == 5:
            _, _, T, H, W = x.shape
            T = T // self.tubelet_size
        H_patches, W_patches = H // self.patch_size, W // self.patch_size
        if not self.handle_nonsquare_inputs:
            T = H_patches = W_patches = None
        if not self.use_rope:
            pos_embed = self.interpolate_pos_encoding(x, self.pos_embed)
            x = self.patch_embed(x)
            x += pos_embed
        else:
            x = self.patch_embed(x)
        if masks is not None:
            x = apply_masks(x, masks)
            masks = torch.cat(masks, dim=0)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask=masks, attn_mask=None, T=T, H_patches=H_patches, W_patches=W_patches)
            if self.out_layers is not None and i in self.out_layers:
                outs.append(self.norm(x))
        if self.out_layers is not None:
            return outs
        return self.norm(x)

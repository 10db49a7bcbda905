"""Stand-in for V-JEPA 2's blocks: the call form ``blk(x, mask=..., attn_mask=..., T=, H_patches=, W_patches=)``.

With ``use_rope`` the block makes its tokens depend on their positions (``mask``, the
token ids, or 0..N-1), as RoPE does, so a wrong position list changes the numbers.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim, num_heads, use_rope=False):
        super().__init__()
        self.num_heads, self.use_rope = num_heads, use_rope
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask=None, attn_mask=None, T=None, H_patches=None, W_patches=None):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.use_rope:
            ids = mask if mask is not None else torch.arange(N, device=x.device).expand(B, N)
            angle = (0.1 * ids.to(x.dtype))[:, None, :, None]  # (B, 1, N, 1)
            q, k = q * torch.cos(angle) + q.flip(-1) * torch.sin(angle), k * torch.cos(angle) - k.flip(-1) * torch.sin(angle)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))

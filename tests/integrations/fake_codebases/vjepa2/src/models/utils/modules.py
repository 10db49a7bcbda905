"""Stand-in for V-JEPA 2's src/models/utils/modules.py: RoPE attention (its semantics
restated: the head dim split in three even parts rotated by frame, row and column, the
duplicated-frequency table), plain attention, and the block with its call form
``blk(x, mask=..., attn_mask=..., T=, H_patches=, W_patches=)``."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotate_queries_or_keys(x, pos):
    """Rotate all of x's last dim by pos: a (.., D/2) table repeated whole, pairs swapped by stack."""
    D = x.size(-1)
    omega = 1.0 / 10000 ** (torch.arange(D // 2, dtype=x.dtype, device=x.device) / (D / 2.0))
    freq = pos[..., None] * omega
    sin, cos = freq.sin(), freq.cos()
    sin, cos = torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + swapped * sin


class RoPEAttention(nn.Module):
    """What V-JEPA 2's RoPEAttention computes, restated (its attribute names, its forward's rules)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0, use_sdpa=True,
                 grid_size=14, is_causal=False):  # fmt: skip
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop_prob = proj_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.use_sdpa = use_sdpa
        self.d_dim = self.h_dim = self.w_dim = 2 * ((self.head_dim // 3) // 2)
        self.grid_size = grid_size
        self.is_causal = is_causal

    def separate_positions(self, ids, H_patches=None, W_patches=None):
        if H_patches is None or W_patches is None:
            per_frame, per_row = self.grid_size**2, self.grid_size
        else:
            per_frame, per_row = H_patches * W_patches, W_patches
        return ids // per_frame, (ids % per_frame) // per_row, ids % per_row

    def forward(self, x, mask=None, attn_mask=None, T=None, H_patches=None, W_patches=None):
        B, N, C = x.shape
        depth = N // self.grid_size**2
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if mask is not None:
            pos = self.separate_positions(mask[:, None, :].expand(-1, self.num_heads, -1), H_patches, W_patches)
        else:
            count = depth * self.grid_size**2 if None in (T, H_patches, W_patches) else T * H_patches * W_patches
            pos = self.separate_positions(torch.arange(count), H_patches, W_patches)
        d = self.d_dim
        q = torch.cat([rotate_queries_or_keys(q[..., i * d : (i + 1) * d], p) for i, p in enumerate(pos)] + [q[..., 3 * d :]], -1)
        k = torch.cat([rotate_queries_or_keys(k[..., i * d : (i + 1) * d], p) for i, p in enumerate(pos)] + [k[..., 3 * d :]], -1)
        if attn_mask is not None or self.use_sdpa:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.proj_drop_prob, is_causal=self.is_causal,
                                               attn_mask=attn_mask)  # fmt: skip
        else:
            x = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads, use_rope=False, grid_size=4):
        super().__init__()
        self.use_rope = use_rope
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RoPEAttention(dim, num_heads, qkv_bias=True, grid_size=grid_size) if use_rope else Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask=None, attn_mask=None, T=None, H_patches=None, W_patches=None):
        if self.use_rope:
            x = x + self.attn(self.norm1(x), mask=mask, attn_mask=attn_mask, T=T, H_patches=H_patches, W_patches=W_patches)
        else:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

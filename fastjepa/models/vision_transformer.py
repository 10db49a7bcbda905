"""I-JEPA's ViT encoder and predictor (docs/design.md §1–2).

Parameter names equal the public reference implementation's, so its checkpoints load
with ``load_state_dict(strict=True)`` (after stripping a leading ``module.``).
The token-shuffling steps call :mod:`fastjepa.ops`, which picks the fused or the
reference path; ``FASTJEPA_BACKEND=reference`` gives the reference computation exactly
(including its dtype promotion by the fp32 pos-embed under autocast).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .. import ops
from ..ops import current_backend
from .pos_embed import get_2d_sincos_pos_embed

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)  # the norm every reference model is built with


def _image_size(img_size: int | Sequence[int]) -> int:
    if isinstance(img_size, (list, tuple)):
        if len(img_size) != 1:
            raise ValueError(f"img_size={list(img_size)}: expected an int or a one-element list (square images)")
        img_size = img_size[0]
    return int(img_size)


def _fixed_pos_embed(num_patches: int, dim: int) -> nn.Parameter:
    grid = int(math.isqrt(num_patches))
    if grid * grid != num_patches:
        raise ValueError(f"num_patches={num_patches}: expected a square grid")
    table = torch.from_numpy(get_2d_sincos_pos_embed(dim, grid)).float().unsqueeze(0)  # (1, N, dim)
    return nn.Parameter(table, requires_grad=False)


def _pos_for(pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fixed table in the compute dtype of ``x`` (bf16 stream under autocast).

    The reference path keeps it fp32, which promotes the residual stream to fp32 under
    autocast, as the public reference code does.
    """
    if current_backend() == "reference":
        return pos
    return pos.to(x.dtype)


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample (residual branch dropped for a whole sample)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.act) is nn.GELU and self.act.approximate == "none":
            h = ops.linear_gelu(x, self.fc1.weight, self.fc1.bias)  # fused on the CPU without autograd
        else:
            h = self.act(self.fc1(x))
        return self.drop(self.fc2(self.drop(h)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd)
        if self.attn_drop.p > 0 and self.training:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, N, N)
            x = self.attn_drop(attn) @ v
        else:
            x = ops.attention(q, k, v, scale=self.scale)  # (B, H, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=False,
        qk_scale=None,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Image to patch tokens: (B, C, H, W) -> (B, N, D), raster order."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"images: expected (B, C, {self.img_size}, {self.img_size}), got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


def _init_weights(module: nn.Module, std: float) -> None:
    # Net effect of the reference: its model class initialises Linear/Conv trunc-normal
    # and rescales the residual projections by depth, but its training helper then
    # re-initialises every Linear trunc-normal(0.02), undoing the rescale. We do the
    # net effect directly: trunc-normal for Linear and the patch conv, zero biases,
    # LayerNorm 1/0, no depth rescaling.
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=std, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


class VisionTransformer(nn.Module):
    """The I-JEPA context/target encoder (no class token, fixed sin-cos pos-embed)."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        predictor_embed_dim: int = 384,  # accepted (and ignored) as the reference does
        depth: int = 12,
        predictor_depth: int = 12,  # accepted (and ignored) as the reference does
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        init_std: float = 0.02,
        **kwargs,
    ):
        super().__init__()
        img_size = _image_size(img_size)
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos_embed = _fixed_pos_embed(self.patch_embed.num_patches, embed_dim)  # (1, N, D)
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i], norm_layer=norm_layer)
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.init_std = init_std
        self.apply(partial(_init_weights, std=init_std))

    def forward(self, x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, C, H, W) images, optional list of (B, K) masks -> (len(masks)·B, K, D) or (B, N, D)."""
        x = self.patch_embed(x)  # (B, N, D)
        pos = _pos_for(self.pos_embed, x)  # (1, N, D)
        if masks is None:
            x = x + pos  # (B, N, D)
        else:
            x = ops.gather_tokens(x, masks, pos)  # (M·B, K, D)
        x = _run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)


class VisionTransformerPredictor(nn.Module):
    """The I-JEPA predictor: narrow ViT over [context ; mask tokens] (docs/design.md §2)."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        num_patches: int | None = None,
        embed_dim: int = 768,
        predictor_embed_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        init_std: float = 0.02,
        **kwargs,
    ):
        super().__init__()
        if num_patches is None:
            num_patches = (_image_size(img_size) // patch_size) ** 2
        self.embed_dim, self.predictor_embed_dim, self.num_heads = embed_dim, predictor_embed_dim, num_heads
        self.grad_checkpointing = False
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))  # (1, 1, P)
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        self.predictor_pos_embed = _fixed_pos_embed(num_patches, predictor_embed_dim)  # (1, N, P)
        self.predictor_blocks = nn.ModuleList(
            [
                Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i], norm_layer=norm_layer)
                for i in range(depth)
            ]
        )
        self.predictor_norm = norm_layer(predictor_embed_dim)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim, bias=True)
        self.init_std = init_std
        nn.init.trunc_normal_(self.mask_token, std=init_std, a=-2.0, b=2.0)
        self.apply(partial(_init_weights, std=init_std))

    def forward(
        self,
        x: torch.Tensor,
        masks_x: torch.Tensor | Sequence[torch.Tensor],
        masks: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Context (nenc·B, Kc, D) -> predictions (npred·nenc·B, Kt, D), rows (j, i, b)."""
        if masks_x is None or masks is None:
            raise ValueError("VisionTransformerPredictor: masks_x and masks are required")
        masks_x = [masks_x] if isinstance(masks_x, torch.Tensor) else masks_x
        masks = [masks] if isinstance(masks, torch.Tensor) else masks
        x = self.predictor_embed(x)  # (nenc·B, Kc, P)
        Kc = x.size(1)
        pos = _pos_for(self.predictor_pos_embed, x)  # (1, N, P)
        mask_token = self.mask_token if current_backend() == "reference" else self.mask_token.to(x.dtype)
        x = ops.predictor_tokens(x, masks_x, masks, pos, mask_token)  # (npred·nenc·B, Kc+Kt, P)
        x = _run_blocks(self.predictor_blocks, x, self.grad_checkpointing)
        x = self.predictor_norm(x)
        x = x[:, Kc:]  # (npred·nenc·B, Kt, P)
        return self.predictor_proj(x)  # (npred·nenc·B, Kt, D)


VIT_SIZES = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4),
    "vit_giant": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
}


def _factory(name: str):
    def build(patch_size: int = 16, **kwargs) -> VisionTransformer:
        cfg = dict(VIT_SIZES[name], qkv_bias=True, norm_layer=LayerNorm6)
        cfg.update(kwargs)
        return VisionTransformer(patch_size=patch_size, **cfg)

    build.__name__ = build.__qualname__ = name
    sizes = VIT_SIZES[name]
    build.__doc__ = (
        f"{name}: width {sizes['embed_dim']}, depth {sizes['depth']}, {sizes['num_heads']} heads; "
        "takes ``patch_size``, ``img_size`` and keyword overrides of any constructor argument."
    )
    return build


vit_tiny = _factory("vit_tiny")
vit_small = _factory("vit_small")
vit_base = _factory("vit_base")
vit_large = _factory("vit_large")
vit_huge = _factory("vit_huge")
vit_giant = _factory("vit_giant")


def vit_predictor(**kwargs) -> VisionTransformerPredictor:
    """The predictor with the reference's fixed choices (mlp ratio 4, qkv bias, LN eps 1e-6)."""
    cfg = dict(mlp_ratio=4, qkv_bias=True, norm_layer=LayerNorm6)
    cfg.update(kwargs)
    return VisionTransformerPredictor(**cfg)

"""I-JEPA's ViT encoder and predictor (docs/design.md §1–2).

Parameter names equal the public reference implementation's, so its checkpoints load
with ``load_state_dict(strict=True)`` (after stripping a leading ``module.``).
The token-shuffling steps call :mod:`fastjepa.ops`, which picks the fused or the
reference implementation (``FASTJEPA_BACKEND`` / ``use_backend``). The numerics are a
property of the model, not of that choice: ``reference_numerics`` (off unless set with
:func:`set_reference_numerics`; the training step sets it for ``meta.reference_step``)
keeps the pos-embed and the mask token fp32 under autocast, which promotes the residual
stream to fp32 as the public reference code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .. import ops
from .pos_embed import sincos_2d

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
    table = sincos_2d(dim, grid).unsqueeze(0)  # (1, N, dim), on the default device (meta included)
    return nn.Parameter(table, requires_grad=False)


def _drop_path_rates(rate: float, depth: int) -> list[float]:
    # the reference's torch.linspace values (float32), computed on the CPU so that a
    # model built under `with torch.device("meta")` does not call .item() on a meta tensor
    return [float(r) for r in torch.linspace(0, rate, depth, device="cpu")]


def _pos_for(pos: torch.Tensor, x: torch.Tensor, reference_numerics: bool) -> torch.Tensor:
    """The fixed table in the compute dtype of ``x`` (bf16 stream under autocast).

    With ``reference_numerics`` it stays fp32, which promotes the residual stream to fp32
    under autocast, as the public reference code does.
    """
    if reference_numerics:
        return pos
    return pos.to(x.dtype)


def set_reference_numerics(module: nn.Module, on: bool = True) -> nn.Module:
    """Set the numerics of every encoder and predictor in ``module`` (an encoder, a
    predictor, an :class:`~fastjepa.models.IJEPA`, wrapped or not); returns ``module``.

    ``on``: the pos-embed tables and the mask token stay fp32 under autocast, so the
    residual stream is promoted to fp32, as in the public reference code (what
    ``meta.reference_step=true`` trains with). Off (the default of a built model): they
    are cast to the compute dtype, so the stream stays bf16. Which implementation of the
    ops runs is a separate choice (``FASTJEPA_BACKEND`` / :func:`fastjepa.ops.use_backend`).
    """
    for m in module.modules():
        if isinstance(m, (VisionTransformer, VisionTransformerPredictor)):
            m.reference_numerics = bool(on)
    return module


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
    """Image to patch tokens: (B, C, H, W) -> (B, N, D), raster order. Any H and W that
    are multiples of the patch size are accepted (N = H·W / patch²); ``img_size`` is the
    size the position table was built for."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.dim() != 4 or x.shape[-2] % p or x.shape[-1] % p or x.shape[-2] == 0 or x.shape[-1] == 0:
            raise ValueError(
                f"images: expected (B, C, H, W) with H and W multiples of the patch size {p} "
                f"(built for {self.img_size}), got {tuple(x.shape)}"
            )
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


def _run_block(blk: nn.Module, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
    return blk(x)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    for blk in blocks:
        x = _run_block(blk, x, checkpointing)
    return x


POS_EMBED_RESIZE = ("auto", "sincos", "interpolate")


def interpolate_pos_embed(pos: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A (1, G², D) position table resampled to a ``rows`` × ``cols`` grid: bicubic,
    ``align_corners=False``, as transformers' ``interpolate_pos_encoding`` (and DINO's)."""
    _, N, D = pos.shape
    g = math.isqrt(N)
    grid = pos.reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, G, G)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)  # (1, D, rows, cols)
    return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, D)  # (1, rows·cols, D)


class VisionTransformer(nn.Module):
    """The I-JEPA context/target encoder (no class token, fixed sin-cos pos-embed).

    ``forward(x)`` returns the normed patch tokens (B, N, D); with ``masks`` only the
    kept tokens go through the blocks. The feature API has the names timm and DINOv2
    users know: :meth:`forward_features` (normed tokens), :meth:`forward_head` (their
    average, timm's ``global_pool="avg"``; there is no classifier head, so ``pre_logits``
    changes nothing) and :meth:`get_intermediate_layers`.

    Any input size whose sides are multiples of the patch size runs: for another patch
    grid the position table is recomputed (``pos_embed_resize="sincos"``; exact, the
    table a model built for that size has) or resampled bicubically (``"interpolate"``,
    what transformers' ``interpolate_pos_encoding=True`` and timm's ``dynamic_img_size``
    do). ``"auto"`` (default) recomputes when the stored table is the fixed sin-cos one,
    as in every I-JEPA checkpoint, and interpolates a table that is not (learned or
    edited weights).
    """

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
        pos_embed_resize: str = "auto",
        **kwargs,
    ):
        super().__init__()
        img_size = _image_size(img_size)
        if pos_embed_resize not in POS_EMBED_RESIZE:
            raise ValueError(f"pos_embed_resize={pos_embed_resize!r}: expected one of {', '.join(POS_EMBED_RESIZE)}")
        self.pos_embed_resize = pos_embed_resize
        self._sincos_seen: tuple | None = None  # (table identity, is it the sin-cos table)
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.grad_checkpointing = False
        self.reference_numerics = False  # see set_reference_numerics
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos_embed = _fixed_pos_embed(self.patch_embed.num_patches, embed_dim)  # (1, N, D)
        dpr = _drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i], norm_layer=norm_layer)
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.init_std = init_std
        self.apply(partial(_init_weights, std=init_std))

    def _is_sincos(self) -> bool:
        """Whether the stored table is the fixed sin-cos one (checked once per table value)."""
        pos = self.pos_embed
        key = (pos.data_ptr(), pos._version, pos.device, pos.dtype)
        if self._sincos_seen is None or self._sincos_seen[0] != key:
            g = self.patch_embed.grid_size
            fixed = sincos_2d(pos.shape[-1], g, device=pos.device, dtype=pos.dtype)  # (N, D)
            self._sincos_seen = (key, bool(torch.equal(pos[0], fixed)))
        return self._sincos_seen[1]

    def pos_embed_for(self, rows: int, cols: int) -> torch.Tensor:
        """The (1, rows·cols, D) position table for a ``rows`` × ``cols`` patch grid: the
        stored one for the grid it was built for, else recomputed or interpolated as
        ``pos_embed_resize`` says (see the class docstring)."""
        g = self.patch_embed.grid_size
        if (rows, cols) == (g, g):
            return self.pos_embed
        mode = self.pos_embed_resize
        if mode == "auto":
            mode = "sincos" if self._is_sincos() else "interpolate"
        if mode == "sincos":
            return sincos_2d(self.embed_dim, rows, cols, device=self.pos_embed.device, dtype=self.pos_embed.dtype).unsqueeze(0)
        return interpolate_pos_embed(self.pos_embed, rows, cols)

    def _embed(self, x: torch.Tensor, masks) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_embed.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p) if x.dim() == 4 else (0, 0)
        x = self.patch_embed(x)  # (B, N, D)
        pos = _pos_for(self.pos_embed_for(*grid), x, self.reference_numerics)  # (1, N, D)
        if masks is None:
            return x + pos, grid  # (B, N, D)
        return ops.gather_tokens(x, masks, pos), grid  # (M·B, K, D)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, C, H, W) images, optional list of (B, K) masks -> (len(masks)·B, K, D) or (B, N, D)."""
        x, _ = self._embed(x, masks)
        x = _run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The normed tokens (B, N, D) (timm's name; the same as ``forward``)."""
        return self.forward(x, masks)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from :meth:`forward_features` (B, N, D) -> their average (B, D): the pooled
        feature of I-JEPA's linear evaluation (timm: ``global_pool="avg"``, no ``fc_norm``).
        There is no classifier head, so ``pre_logits`` returns the same."""
        return x.mean(dim=1)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[torch.Tensor, ...]:
        """The outputs of the last ``n`` blocks (``n`` an int), or of the blocks indexed by
        ``n`` (a sequence), in block order, as DINOv2's method: each (B, N, D), through the
        final LayerNorm when ``norm``; ``reshape=True`` gives (B, D, rows, cols) maps."""
        if return_class_token:
            raise ValueError("return_class_token=True: an I-JEPA encoder has no class token")
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n={n}: expected 1 to the depth ({depth})")
            wanted = list(range(depth - n, depth))
        else:
            wanted = sorted({i % depth if -depth <= i < depth else i for i in n})
            bad = [i for i in wanted if not 0 <= i < depth]
            if bad or not wanted:
                raise ValueError(f"n={list(n)}: block indices must lie in [-{depth}, {depth - 1}]")
        x, (rows, cols) = self._embed(x, None)
        outs = []
        for i, blk in enumerate(self.blocks[: wanted[-1] + 1]):
            x = _run_block(blk, x, self.grad_checkpointing)
            if i in wanted:
                outs.append(self.norm(x) if norm else x)
        if reshape:
            outs = [o.reshape(o.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous() for o in outs]  # (B, D, rows, cols)
        return tuple(outs)


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
        self.reference_numerics = False  # see set_reference_numerics
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))  # (1, 1, P)
        dpr = _drop_path_rates(drop_path_rate, depth)
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
        pos = _pos_for(self.predictor_pos_embed, x, self.reference_numerics)  # (1, N, P)
        mask_token = self.mask_token if self.reference_numerics else self.mask_token.to(x.dtype)
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

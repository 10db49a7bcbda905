"""V-JEPA 2's RoPE attention through fastjepa's fused rope (a piece of ``integrations.vjepa2``).

:func:`rope_patches` lists what to swap in V-JEPA 2's modules (``src.models.utils.modules``
and any module that imported from it):

* ``RoPEAttention.forward`` -> :func:`rope_attention_forward`: the same computation —
  qkv projection, the 3-D rotation of q and k (:func:`fastjepa.ops.rope_qk`, one call for
  both, V-JEPA 2's frequency layout, angles in q's dtype as the original computes them),
  attention, output projection — with V-JEPA 2's behaviour kept exactly: positions from
  ``mask`` (B, N) when given, else ``arange`` over ``T·H_patches·W_patches`` tokens (or
  ``grid_depth·grid_size²`` when T, H_patches or W_patches is None); the grid
  ``grid_size × grid_size`` unless both H_patches and W_patches are given; SDPA (all its
  backends enabled, as ``torch.backends.cuda.sdp_kernel()`` does) when ``use_sdpa`` or an
  ``attn_mask`` is given, with ``dropout_p=proj_drop`` *in train and eval mode alike* and
  SDPA's default scale; else the explicit softmax path with ``self.scale`` and
  ``attn_drop``; then ``proj`` and ``proj_drop``.
* ``rotate_queries_or_keys`` -> :func:`rotate_queries_or_keys`: the same numbers (any
  position dtype, the same dtype promotion), from a cached omega table and one
  expression instead of rebuilding tables and splitting/stacking; it stays a PyTorch
  computation (its remaining caller, ``ACRoPEAttention``, rotates by fractional positions).

Numerics: in float32 the patched forward equals the original to rounding; in bf16 it
applies the rotation the original applies (same bf16 omega and angles) with sin, cos and
the rotation in fp32, rounded once.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from ..ops.rope import frequency_index, omega_table, rope_qk, rotated_width

_SDPA_BACKENDS = None


def _all_sdpa_backends():
    """Every SDPA backend, in the order ``torch.backends.cuda.sdp_kernel()`` enables them."""
    global _SDPA_BACKENDS
    if _SDPA_BACKENDS is None:
        from torch.nn.attention import SDPBackend

        _SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                          SDPBackend.CUDNN_ATTENTION]  # fmt: skip
    return _SDPA_BACKENDS


def rope_attention_forward(self, x, mask=None, attn_mask=None, T=None, H_patches=None, W_patches=None):
    """``RoPEAttention.forward`` with q and k rotated by one fused call (see the module docstring)."""
    from torch.nn.attention import sdpa_kernel

    B, N, C = x.size()
    gs = self.grid_size
    grid_depth = int(N // (gs * gs))
    qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, head_dim)
    hw = (gs, gs) if H_patches is None or W_patches is None else (int(H_patches), int(W_patches))
    if mask is None:
        if T is None or H_patches is None or W_patches is None:
            count = int(grid_depth * gs * gs)
        else:
            count = int(T * H_patches * W_patches)
        if count != N:
            raise ValueError(
                f"RoPEAttention: without a mask the positions are arange({count}) (from T={T}, H_patches={H_patches}, "
                f"W_patches={W_patches}, grid_size={gs}), expected one per token ({N})"
            )
    if rotated_width(q.size(-1), 3) > 0:  # V-JEPA 2 rotates nothing when head_dim < 6
        q, k = rope_qk(q, k, mask, (None, *hw))  # (B, heads, N, head_dim) each
    if attn_mask is not None or self.use_sdpa:
        with sdpa_kernel(_all_sdpa_backends()):
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.proj_drop_prob, is_causal=self.is_causal,
                                               attn_mask=attn_mask)  # fmt: skip
    else:
        attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, N, N)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v  # (B, heads, N, head_dim)
    x = x.transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)
    return self.proj_drop(x)


def rotate_queries_or_keys(x, pos):
    """V-JEPA 2's ``rotate_queries_or_keys(x, pos)``: x (B, heads, N, D) rotated over all of D
    by ``pos`` ((N,) or (B, heads, N), int or float), its frequency layout, the same dtypes."""
    D = x.size(-1)
    assert D % 2 == 0, "Embedding dimension must be a multiple of 2 for block matrix rotation"
    omega = omega_table(D // 2, x.dtype, x.device).to(x.dtype)  # (D/2,) exact: the table holds x.dtype values
    f = frequency_index(D, "vjepa2").to(x.device)  # (D,)
    c = torch.arange(D, device=x.device)
    sign = torch.where(c % 2 == 0, -1.0, 1.0).to(device=x.device, dtype=x.dtype)  # (D,)
    angle = pos[..., None] * omega[f]  # (..., N, D), promoted as V-JEPA 2's einsum promotes
    return x * angle.cos() + sign * x[..., c ^ 1] * angle.sin()


def rope_patches(modules: dict[str, types.ModuleType]) -> list[tuple[object, str, object]]:
    """``(owner, attr_name, new_object)`` for each RoPE piece found in ``modules``.

    ``RoPEAttention`` (once per class object, wherever it was imported) gets its
    ``forward``; every module holding ``rotate_queries_or_keys`` gets its own entry.
    A ``RoPEAttention`` that is not V-JEPA 2's (no ``separate_positions``) is refused.
    """
    patches, seen = [], set()
    for name, module in modules.items():
        cls = getattr(module, "RoPEAttention", None)
        if isinstance(cls, type) and id(cls) not in seen:
            if not callable(getattr(cls, "separate_positions", None)):
                raise TypeError(
                    f"{name}.RoPEAttention ({cls.__module__}.{cls.__qualname__}) has no separate_positions: "
                    f"expected V-JEPA 2's RoPEAttention (src.models.utils.modules)"
                )
            seen.add(id(cls))
            patches.append((cls, "forward", rope_attention_forward))
        if callable(getattr(module, "rotate_queries_or_keys", None)):
            patches.append((module, "rotate_queries_or_keys", rotate_queries_or_keys))
    return patches

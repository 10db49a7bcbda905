"""Fixed 2-D sin-cos positional embeddings (docs/design.md §1)."""

from __future__ import annotations

import numpy as np


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): embed_dim/2 sines then embed_dim/2 cosines, float64."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim={embed_dim}: a 1-D sin-cos embedding needs an even width")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size², embed_dim) table in raster order (row-major over the grid).

    The first embed_dim/2 channels encode the column index, the last embed_dim/2 the
    row index; each half is D/4 ``sin(pos·ω_k)`` then D/4 ``cos(pos·ω_k)`` with
    ``ω_k = 1 / 10000^(k/(D/4))``. Computed in float64.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim={embed_dim}: a 2-D sin-cos embedding needs a width divisible by 4")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")  # (G, G) each
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols)  # (G², D/2)
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows)  # (G², D/2)
    return np.concatenate([emb_col, emb_row], axis=1)  # (G², D)

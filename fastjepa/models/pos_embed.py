"""Fixed 2-D sin-cos positional embeddings (docs/design.md §1).

The NumPy functions are the reference's; :func:`sincos_2d` computes the same table with
torch (float64, then the asked dtype) on any device, for any (rows, columns) grid: the
encoder builds its table with it (so it builds on the meta device too) and recomputes it
for an input whose patch grid differs from the one it was built for.
"""

from __future__ import annotations

import numpy as np
import torch


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


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1, 1).to(torch.float64) * omega  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)  # (M, dim)


def sincos_2d(
    embed_dim: int, rows: int, cols: int | None = None, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(rows·cols, embed_dim) table in raster order, as :func:`get_2d_sincos_pos_embed`
    (column index in the first half of the channels, row index in the second); a square
    grid gives that function's table exactly. Computed in float64, returned in ``dtype``."""
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim={embed_dim}: a 2-D sin-cos embedding needs a width divisible by 4")
    cols = rows if cols is None else cols
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64, device=device), torch.arange(cols, dtype=torch.float64, device=device), indexing="ij"
    )  # (rows, cols) each
    table = torch.cat([_sincos_1d(embed_dim // 2, c), _sincos_1d(embed_dim // 2, r)], dim=1)  # (rows·cols, D)
    return table.to(dtype)

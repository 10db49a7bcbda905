"""Tile-size helpers shared by the launchers (plain Python, no kernels)."""

from __future__ import annotations

import triton

# elements per program tile: large enough to stream HBM well on a GPU, small enough to
# keep registers in check; the interpreter runs each program in Python, so fewer is faster
TILE_ELEMS = 4096


def cols_block(n_cols: int, cap: int = 1024) -> int:
    """Power-of-two block over the feature dim (at least 16, at most ``cap``)."""
    return max(16, min(triton.next_power_of_2(n_cols), cap))


def rows_block(block_cols: int, n_rows: int, tile: int = TILE_ELEMS) -> int:
    """Rows per program so that a tile holds about ``tile`` elements."""
    return max(1, min(tile // block_cols, triton.next_power_of_2(max(n_rows, 1))))

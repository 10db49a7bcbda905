"""Tile-size helpers shared by the launchers (plain Python, no kernels)."""

from __future__ import annotations

import triton

# elements per program tile: large enough to stream HBM well on a GPU, small enough to
# keep registers in check; the interpreter runs each program in Python, so fewer is faster
TILE_ELEMS = 4096


def cols_block(n_cols: int, cap: int = 1024) -> int:
    """Power-of-two block over the feature dim, at least 16, at most ``cap``.

    Below ``cap`` one block covers the row; above it, the largest of cap, cap/2, cap/4,
    cap/8 that leaves the fewest masked lanes (768 and 1280 -> 256, 384 -> 128).
    """
    if n_cols <= cap:
        return max(16, triton.next_power_of_2(n_cols))
    candidates = [max(16, cap >> s) for s in range(4)]
    return min(candidates, key=lambda blk: (triton.cdiv(n_cols, blk) * blk - n_cols, -blk))


def rows_block(block_cols: int, n_rows: int, tile: int = TILE_ELEMS) -> int:
    """Rows per program so that a tile holds about ``tile`` elements."""
    return max(1, min(tile // block_cols, triton.next_power_of_2(max(n_rows, 1))))

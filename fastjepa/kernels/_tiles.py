"""Tile-size helpers shared by the launchers (plain Python, no kernels).

Two regimes, chosen per launch by :func:`interpreting`:

* Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs every program in Python, so the
  fewer and larger the programs, the faster the tests: whole rows up to 1024 wide and
  tiles of :data:`TILE_ELEMS` elements.
* A GPU streams memory: a row is cut into column tiles of at most 256 (for bf16, one warp
  of 32 threads × 16-byte vectors per row, with the fewest masked lanes for the
  ViT widths 384, 768, 1024, 1280), :data:`GPU_TILE_ELEMS` elements per program (several
  independent 16-byte loads in flight per thread) and ``num_warps`` set explicitly.

``tests/test_kernels_compile.py`` compiles the GPU choices for sm_80 and sm_90 ahead of
time and reads their resource use (no register spills, 64/128-bit global accesses on
the bf16 row copies); the interpreter tests run them too (``tests/test_gpu_tiles.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import triton

# elements per program tile under the interpreter: fewer, larger programs run faster
TILE_ELEMS = 4096
# elements per program tile on a GPU: 4096 over 4 warps = 32 per thread, i.e. four 16-byte
# bf16 vectors (or eight fp32) in flight per thread, and ~16-32 fp32 accumulator registers
GPU_TILE_ELEMS = 4096
GPU_COLS_CAP = 256  # widest column tile of a row copy on a GPU
GPU_NUM_WARPS = 4


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class RowTiles:
    """Tile of a (rows, cols) launch: ``block_r`` rows × ``block_d`` columns per program."""

    block_r: int
    block_d: int
    num_warps: int

    def grid(self, n_rows: int, n_cols: int) -> tuple[int, int]:
        return (triton.cdiv(n_rows, self.block_r), triton.cdiv(n_cols, self.block_d))


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


def row_tiles(n_rows: int, n_cols: int, *, gpu: bool | None = None) -> RowTiles:
    """Tiles of a row-copy launch (gather forward and backward).

    ``gpu=None``: the GPU choice unless :func:`interpreting`. On a GPU the column tile is
    at most :data:`GPU_COLS_CAP` wide (768 -> 3 × 256, 1280 -> 5 × 256, 384 -> 3 × 128, 200
    -> 1 × 256), where the interpreter's 1024-wide tile would leave 25 % of the lanes
    of a 768-wide row masked.
    """
    if gpu is None:
        gpu = not interpreting()
    if not gpu:
        block_d = cols_block(n_cols)
        return RowTiles(rows_block(block_d, n_rows), block_d, GPU_NUM_WARPS)
    block_d = cols_block(n_cols, cap=GPU_COLS_CAP)
    return RowTiles(rows_block(block_d, n_rows, GPU_TILE_ELEMS), block_d, GPU_NUM_WARPS)


def whole_row_tiles(n_rows: int, n_cols: int, *, gpu: bool | None = None) -> RowTiles:
    """Tiles of a launch whose program needs whole rows (layer-norm): ``block_d`` covers
    the row; on a GPU, 8 warps once the row is wider than 1024 (a ViT-H row, 1280 in a
    2048-wide tile: 16 fp32 values per thread instead of 32, no spills)."""
    if gpu is None:
        gpu = not interpreting()
    block_d = max(16, triton.next_power_of_2(n_cols))
    if not gpu:
        return RowTiles(rows_block(block_d, n_rows), block_d, GPU_NUM_WARPS)
    num_warps = 8 if block_d > 1024 else GPU_NUM_WARPS
    return RowTiles(rows_block(block_d, n_rows, GPU_TILE_ELEMS), block_d, num_warps)

"""Tile-size helpers shared by the launchers (plain Python, no kernels).

Two regimes, chosen per launch by :func:`interpreting`:

* Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs every program in Python, so the
  fewer and larger the programs, the faster the tests: whole rows up to 1024 wide and
  tiles of :data:`TILE_ELEMS` elements.
* A GPU streams memory: a row is cut into column tiles of at most 256 (for bf16, one warp
  of 32 threads × 16-byte vectors per row, with the fewest masked lanes for the
  ViT widths 384, 768, 1024, 1280), :data:`GPU_TILE_ELEMS` elements per program (several
  independent 16-byte loads in flight per thread) and ``num_warps`` set explicitly.

``tests/kernels/test_compile.py`` compiles the GPU choices for sm_80 and sm_90 ahead of
time and reads their resource use (no register spills, 64/128-bit global accesses on
the bf16 row copies); the interpreter tests run them too (``tests/kernels/test_tiles.py``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

# elements per program tile under the interpreter: fewer, larger programs run faster
TILE_ELEMS = 4096
# elements per program tile on a GPU: 4096 over 4 warps = 32 per thread, i.e. four 16-byte
# bf16 vectors (or eight fp32) in flight per thread, and ~16-32 fp32 accumulator registers
GPU_TILE_ELEMS = 4096
GPU_COLS_CAP = 256  # widest column tile of a row copy on a GPU
GPU_NUM_WARPS = 4


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` is a constexpr function: slower to call from the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


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
        return (cdiv(n_rows, self.block_r), cdiv(n_cols, self.block_d))


@functools.lru_cache(maxsize=1024)
def cols_block(n_cols: int, cap: int = 1024) -> int:
    """Power-of-two block over the feature dim, at least 16, at most ``cap``.

    Below ``cap`` one block covers the row; above it, the largest of cap, cap/2, cap/4,
    cap/8 that leaves the fewest masked lanes (768 and 1280 -> 256, 384 -> 128).
    """
    if n_cols <= cap:
        return max(16, next_power_of_2(n_cols))
    candidates = [max(16, cap >> s) for s in range(4)]
    return min(candidates, key=lambda blk: (cdiv(n_cols, blk) * blk - n_cols, -blk))


@functools.lru_cache(maxsize=1024)
def rows_block(block_cols: int, n_rows: int, tile: int = TILE_ELEMS) -> int:
    """Rows per program so that a tile holds about ``tile`` elements."""
    return max(1, min(tile // block_cols, next_power_of_2(max(n_rows, 1))))


def row_tiles(n_rows: int, n_cols: int, *, gpu: bool | None = None) -> RowTiles:
    """Tiles of a row-copy launch (gather forward and backward).

    ``gpu=None``: the GPU choice unless :func:`interpreting`. On a GPU the column tile is
    at most :data:`GPU_COLS_CAP` wide (768 -> 3 × 256, 1280 -> 5 × 256, 384 -> 3 × 128, 200
    -> 1 × 256), where the interpreter's 1024-wide tile would leave 25 % of the lanes
    of a 768-wide row masked.
    """
    return _row_tiles(n_rows, n_cols, not interpreting() if gpu is None else gpu)


@functools.lru_cache(maxsize=1024)
def _row_tiles(n_rows: int, n_cols: int, gpu: bool) -> RowTiles:
    if not gpu:
        block_d = cols_block(n_cols)
        return RowTiles(rows_block(block_d, n_rows), block_d, GPU_NUM_WARPS)
    block_d = cols_block(n_cols, cap=GPU_COLS_CAP)
    return RowTiles(rows_block(block_d, n_rows, GPU_TILE_ELEMS), block_d, GPU_NUM_WARPS)


def whole_row_tiles(n_rows: int, n_cols: int, *, gpu: bool | None = None) -> RowTiles:
    """Tiles of a launch whose program needs whole rows (layer-norm): ``block_d`` covers
    the row; on a GPU, 8 warps once the row is wider than 1024 (a ViT-H row, 1280 in a
    2048-wide tile: 16 fp32 values per thread instead of 32, no spills)."""
    return _whole_row_tiles(n_rows, n_cols, not interpreting() if gpu is None else gpu)


@functools.lru_cache(maxsize=1024)
def _whole_row_tiles(n_rows: int, n_cols: int, gpu: bool) -> RowTiles:
    block_d = max(16, next_power_of_2(n_cols))
    if not gpu:
        return RowTiles(rows_block(block_d, n_rows), block_d, GPU_NUM_WARPS)
    num_warps = 8 if block_d > 1024 else GPU_NUM_WARPS
    return RowTiles(rows_block(block_d, n_rows, GPU_TILE_ELEMS), block_d, num_warps)


GPU_SLOT_MAJOR_ROWS = 64  # slots per tile when x is N-contiguous: two warps' worth of neighbouring tokens per channel


def slot_major_tiles(n_rows: int, n_cols: int, *, gpu: bool | None = None) -> RowTiles:
    """Tiles of the gather forward for an N-contiguous x (strides (N·D, 1, N)), read with
    the slots fastest: on a GPU 64 slots × 64 channels (a warp covers 32 neighbouring slots
    of one channel), the interpreter's row tiles otherwise (it has no memory system to
    favour)."""
    return _slot_major_tiles(n_rows, n_cols, not interpreting() if gpu is None else gpu)


@functools.lru_cache(maxsize=1024)
def _slot_major_tiles(n_rows: int, n_cols: int, gpu: bool) -> RowTiles:
    if not gpu:
        return _row_tiles(n_rows, n_cols, False)
    block_r = min(GPU_SLOT_MAJOR_ROWS, max(16, next_power_of_2(n_rows)))
    block_d = min(GPU_TILE_ELEMS // GPU_SLOT_MAJOR_ROWS, max(16, next_power_of_2(n_cols)))
    return RowTiles(block_r, block_d, GPU_NUM_WARPS)

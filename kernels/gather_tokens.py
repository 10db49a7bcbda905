"""Context gather with the positional-embedding add: kernels and launchers.

Forward: ``out[m·B + b, k, :] = x[b, idx[m, b, k], :] + pos[0, idx[m, b, k], :]``.
Backward: ``grad_x[b, idx[m, b, k], :] += grad_out[m·B + b, k, :]`` with fp32 atomics
(repeated indices, within one mask or across masks, accumulate).

No autograd here; :mod:`fastjepa.ops.gather_tokens` wraps these launchers. Indices are
expected in range (the op checks them on the host); an out-of-range index is never
dereferenced: its output row is NaN and its gradient is dropped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import cols_block, rows_block


@triton.jit
def _gather_tokens_fwd_kernel(
    X,  # (B, N, D), strides (sxb, sxn, sxd)
    POS,  # (1, Npos, D), strides (-, spn, spd); unused unless HAS_POS
    IDX,  # (M, B, K) contiguous, int32 or int64
    OUT,  # (M·B, K, D) contiguous
    B,
    N,
    K,
    D,
    ROWS,  # M·B·K
    sxb,
    sxn,
    sxd,
    spn,
    spd,
    HAS_POS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # (BLOCK_R,) flat (m, b, k)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
    row_ok = rows < ROWS
    col_ok = cols < D
    b = (rows // K) % B  # (BLOCK_R,)
    n = tl.load(IDX + rows, mask=row_ok, other=0).to(tl.int64)  # (BLOCK_R,)
    n_ok = row_ok & (n >= 0) & (n < N)
    load_ok = n_ok[:, None] & col_ok[None, :]  # (BLOCK_R, BLOCK_D)
    v = tl.load(X + b[:, None] * sxb + n[:, None] * sxn + cols[None, :] * sxd, mask=load_ok, other=0.0).to(tl.float32)
    if HAS_POS:
        v += tl.load(POS + n[:, None] * spn + cols[None, :] * spd, mask=load_ok, other=0.0).to(tl.float32)
    v = tl.where(n_ok[:, None], v, float("nan"))
    tl.store(OUT + rows[:, None] * D + cols[None, :], v.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gather_tokens_bwd_kernel(
    GRAD,  # (M·B, K, D) contiguous
    IDX,  # (M, B, K) contiguous, int32 or int64
    GX,  # (B, N, D) contiguous fp32, zero-initialised accumulator
    B,
    N,
    K,
    D,
    ROWS,  # M·B·K
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # (BLOCK_R,)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
    row_ok = rows < ROWS
    col_ok = cols < D
    b = (rows // K) % B
    n = tl.load(IDX + rows, mask=row_ok, other=0).to(tl.int64)
    n_ok = row_ok & (n >= 0) & (n < N)
    ok = n_ok[:, None] & col_ok[None, :]  # (BLOCK_R, BLOCK_D)
    g = tl.load(GRAD + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.atomic_add(GX + (b[:, None] * N + n[:, None]) * D + cols[None, :], g, mask=ok)


def _grid(rows: int, D: int):
    block_d = cols_block(D)
    block_r = rows_block(block_d, rows)
    return (triton.cdiv(rows, block_r), triton.cdiv(D, block_d)), block_r, block_d


def gather_tokens_fwd(
    x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, N, D), (M, B, K), (1, Npos ≥ N, D) or None -> (M·B, K, D) in ``promote(x, pos)``.

    ``x`` and ``pos`` may be strided; ``idx`` is made contiguous. ``out`` (contiguous,
    the right shape) is written in full when given.
    """
    B, N, D = x.shape
    M, _, K = idx.shape
    idx = idx.contiguous()
    dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    if out is None:
        out = torch.empty((M * B, K, D), device=x.device, dtype=dtype)
    rows = M * B * K
    if rows == 0 or D == 0:
        return out
    grid, block_r, block_d = _grid(rows, D)
    has_pos = pos is not None
    p = pos if has_pos else x
    spn, spd = (pos.stride(1), pos.stride(2)) if has_pos else (0, 0)
    _gather_tokens_fwd_kernel[grid](
        x, p, idx, out, B, N, K, D, rows, *x.stride(), spn, spd, HAS_POS=has_pos, BLOCK_R=block_r, BLOCK_D=block_d
    )
    return out


def gather_tokens_bwd(grad: torch.Tensor, idx: torch.Tensor, N: int) -> torch.Tensor:
    """(M·B, K, D) upstream grad, (M, B, K) -> fp32 (B, N, D) accumulated gradient of ``x``."""
    M, B, K = idx.shape
    D = grad.size(-1)
    grad = grad.contiguous()
    idx = idx.contiguous()
    gx = torch.zeros((B, N, D), device=grad.device, dtype=torch.float32)
    rows = M * B * K
    if rows == 0 or D == 0:
        return gx
    grid, block_r, block_d = _grid(rows, D)
    _gather_tokens_bwd_kernel[grid](grad, idx, gx, B, N, K, D, rows, BLOCK_R=block_r, BLOCK_D=block_d)
    return gx

"""Context gather with the positional-embedding add: kernels and launchers.

Forward: ``out[m·B + b, k, :] = x[b, idx[m, b, k], :] + pos[0, idx[m, b, k], :]``.
Backward: ``grad_x[b, n, :] = Σ_{(m, k): idx[m, b, k] = n} grad_out[m·B + b, k, :]`` — a
segmented sum over the slots sorted by index (repeated indices, within one mask or across
masks, accumulate; deterministic, fp32 accumulation, each row of grad_x written once).

No autograd here; :mod:`fastjepa.ops.gather_tokens` wraps these launchers. Indices are
expected in range (the op checks them on the host); an out-of-range index is never
dereferenced: its output row is NaN and its gradient is dropped.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ._launch import arange_rows, jit, on_device
from ._tiles import row_tiles, slot_major_tiles


@jit(dynamic=("K", "ROWS"))
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
    SLOT_MAJOR: tl.constexpr,  # x is N-contiguous (sxn == 1): read x slot-fastest, see the launcher
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
    if SLOT_MAJOR:
        # a (BLOCK_D, BLOCK_R) tile whose last (fastest) axis is the slots: neighbouring
        # threads read neighbouring indices n of one channel, i.e. neighbouring addresses
        # when x[b, :, d] is contiguous; transposed in registers / shared memory for the
        # row-major store
        xt = X + b[None, :] * sxb + n[None, :] * sxn + cols[:, None] * sxd  # (BLOCK_D, BLOCK_R)
        v = tl.trans(tl.load(xt, mask=n_ok[None, :] & col_ok[:, None], other=0.0)).to(tl.float32)
    else:
        v = tl.load(X + b[:, None] * sxb + n[:, None] * sxn + cols[None, :] * sxd, mask=load_ok, other=0.0).to(tl.float32)
    if HAS_POS:
        v += tl.load(POS + n[:, None] * spn + cols[None, :] * spd, mask=load_ok, other=0.0).to(tl.float32)
    v = tl.where(n_ok[:, None], v, float("nan"))
    tl.store(OUT + rows[:, None] * D + cols[None, :], v.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@jit(dynamic=("K", "MK"))
def _gather_tokens_bwd_kernel(
    GRAD,  # (M·B, K, D) contiguous upstream gradient
    PERM,  # (B, M·K) int64: per image, the (m·K + k) slots ordered by their index n
    BOUNDS,  # (B, N + 1) int64: slots of index n are PERM[b, BOUNDS[b, n] : BOUNDS[b, n + 1]]
    GX,  # (B, N, D) contiguous, gradient of x in x's dtype (every element written)
    GPOS,  # (N, D) contiguous fp32 accumulator for the pos gradient; unused unless POS_GRAD
    B,
    N,
    K,
    D,
    MK,  # M·K
    ROWS,  # B·N
    POS_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # (BLOCK_R,) flat (b, n)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
    row_ok = rows < ROWS
    col_ok = cols < D
    b = rows // N
    n = rows % N
    start = tl.load(BOUNDS + b * (N + 1) + n, mask=row_ok, other=0)  # (BLOCK_R,)
    count = tl.load(BOUNDS + b * (N + 1) + n + 1, mask=row_ok, other=0) - start  # (BLOCK_R,)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for c in range(0, tl.max(count, axis=0).to(tl.int32)):  # the longest segment in this tile
        has = row_ok & (c < count)  # (BLOCK_R,)
        slot = tl.load(PERM + b * MK + start + c, mask=has, other=0)  # (BLOCK_R,) m·K + k
        src = ((slot // K) * B + b) * K + slot % K  # (BLOCK_R,) row (m·B + b)·K + k of GRAD
        acc += tl.load(GRAD + src[:, None] * D + cols[None, :], mask=has[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(GX + rows[:, None] * D + cols[None, :], acc.to(GX.dtype.element_ty), mask=ok)
    if POS_GRAD:
        tl.atomic_add(GPOS + n[:, None] * D + cols[None, :], acc, mask=ok)


def gather_tokens_fwd(
    x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, N, D), (M, B, K), (1, Npos ≥ N, D) or None -> (M·B, K, D) in ``promote(x, pos)``.

    ``x`` and ``pos`` may be strided; ``idx`` is made contiguous. ``out`` (contiguous,
    the right shape) is written in full when given.

    Layout: a ViT's patch embedding hands over ``conv(x).flatten(2).transpose(1, 2)``, a
    view with strides (N·D, 1, N): a token's D channels lie N elements apart. Read
    row-major (channels fastest, the layout for contiguous x), every thread of a warp
    would touch its own 32-byte sector. For such an x (``sxn == 1``) the kernel reads a
    slot-major tile instead: the threads of a warp take neighbouring slots of one channel,
    and since the masks' indices are sorted and dense, neighbouring slots are neighbouring
    (or nearby) tokens: a few sectors per warp. The tile is transposed on chip for the
    contiguous store. This costs no copy: ``x.contiguous()`` would read and write all of
    x (B·N·D) to gather K·D of it per mask, and a channels-last patch embedding would
    change the convolution every path runs, the reference's included.
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
    slot_major = x.stride(1) == 1 and D > 1 and N > 1  # the patch embedding's transposed view
    tiles = slot_major_tiles(rows, D) if slot_major else row_tiles(rows, D)
    has_pos = pos is not None
    p = pos if has_pos else x
    spn, spd = (pos.stride(1), pos.stride(2)) if has_pos else (0, 0)
    with on_device(out.device):
        _gather_tokens_fwd_kernel[tiles.grid(rows, D)](
            x, p, idx, out, B, N, K, D, rows, *x.stride(), spn, spd,
            HAS_POS=has_pos, SLOT_MAJOR=slot_major, BLOCK_R=tiles.block_r, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
        )
    return out


def gather_tokens_bwd(
    grad: torch.Tensor, idx: torch.Tensor, N: int, x_dtype: torch.dtype, pos_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M·B, K, D) upstream grad, (M, B, K) -> (grad_x (B, N, D) in ``x_dtype``, fp32 (N, D) pos grad or None).

    Deterministic: the slots of each image are sorted by index once (a small (B, M·K)
    sort), then every row of grad_x sums its own slots in a fixed order, in fp32, and is
    written once — no atomics (only the optional pos gradient uses them), no fp32 staging
    copy of grad_x. Indices outside [0, N) are never read and contribute nothing.
    """
    M, B, K = idx.shape
    D = grad.size(-1)
    grad = grad.contiguous()
    gx = torch.empty((B, N, D), device=grad.device, dtype=x_dtype)
    gpos = torch.zeros((N, D), device=grad.device, dtype=torch.float32) if pos_grad else None
    if B * N == 0 or D == 0:
        return gx, gpos
    # (B, M·K) index n of slot m·K + k; contiguous, so that the sort's outputs are: with
    # K = 1 and M > 1 the reshape is a strided view, and the kernel reads perm as (B, M·K)
    # row-major
    keys = idx.permute(1, 0, 2).reshape(B, M * K).contiguous()
    sorted_keys, perm = torch.sort(keys, dim=1, stable=True)  # (B, M·K)
    sorted_keys, perm = sorted_keys.contiguous(), perm.contiguous()  # no-ops unless sort returned strided
    targets = arange_rows(B, N + 1, grad.device, sorted_keys.dtype)  # (B, N + 1): 0..N per image
    bounds = torch.searchsorted(sorted_keys, targets)  # (B, N + 1) int64 segment starts
    tiles = row_tiles(B * N, D)
    with on_device(gx.device):
        _gather_tokens_bwd_kernel[tiles.grid(B * N, D)](
            grad, perm, bounds, gx, gpos if pos_grad else gx, B, N, K, D, M * K, B * N,
            POS_GRAD=pos_grad, BLOCK_R=tiles.block_r, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
        )
    return gx, gpos

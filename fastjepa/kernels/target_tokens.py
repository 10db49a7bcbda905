"""Target path (docs/design.md §5): layer-norm + gather + ``repeat_interleave_batch``, one pass.

``out[(j·nenc + i)·B + b, k, :] = LN(h[b, idx[j, b, k], :])`` with LN over D, no affine,
eps 1e-5, statistics in fp32 (mean, then the variance of the centred values). Each
gathered row is normalised once and written to its nenc slots. No gradient.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ._launch import jit, on_device
from ._tiles import cdiv, whole_row_tiles


@jit(dynamic=("KT", "ROWS"))
def _target_tokens_kernel(
    H,  # (B, N, D), strides (shb, shn, shd)
    IDX,  # (npred, B, Kt) contiguous, int32 or int64
    OUT,  # (npred·nenc·B, Kt, D) contiguous
    B,
    N,
    KT,
    D,
    NENC,
    ROWS,  # npred·B·Kt gathered rows
    eps,
    shb,
    shn,
    shd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # (BLOCK_R,) flat (j, b, k)
    d = tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,) the whole feature row
    row_ok = rows < ROWS
    d_ok = d < D
    k = rows % KT
    b = (rows // KT) % B
    j = rows // (KT * B)
    n = tl.load(IDX + rows, mask=row_ok, other=0).to(tl.int64)  # (BLOCK_R,)
    n_ok = row_ok & (n >= 0) & (n < N)
    ok = n_ok[:, None] & d_ok[None, :]  # (BLOCK_R, BLOCK_D)
    v = tl.load(H + b[:, None] * shb + n[:, None] * shn + d[None, :] * shd, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(v, axis=1) / D  # (BLOCK_R,)
    xc = tl.where(ok, v - mean[:, None], 0.0)  # (BLOCK_R, BLOCK_D)
    var = tl.sum(xc * xc, axis=1) / D  # (BLOCK_R,) biased, as layer_norm
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    y = tl.where(n_ok[:, None], y, float("nan")).to(OUT.dtype.element_ty)
    store_ok = row_ok[:, None] & d_ok[None, :]
    for i in range(NENC):
        out_row = ((j * NENC + i) * B + b) * KT + k  # (BLOCK_R,)
        tl.store(OUT + out_row[:, None] * D + d[None, :], y, mask=store_ok)


def target_tokens_fwd(
    h: torch.Tensor, idx: torch.Tensor, nenc: int, *, eps: float = 1e-5, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, N, D) (any strides), (npred, B, Kt) -> (npred·nenc·B, Kt, D) in h's dtype."""
    B, N, D = h.shape
    npred, _, KT = idx.shape
    idx = idx.contiguous()
    if out is None:
        out = torch.empty((npred * nenc * B, KT, D), device=h.device, dtype=h.dtype)
    rows = npred * B * KT
    if rows == 0 or D == 0:
        return out
    tiles = whole_row_tiles(rows, D)  # one program sees whole rows
    with on_device(out.device):
        _target_tokens_kernel[(cdiv(rows, tiles.block_r),)](
            h, idx, out, B, N, KT, D, nenc, rows, eps, *h.stride(),
            BLOCK_R=tiles.block_r, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
        )
    return out

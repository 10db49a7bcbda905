"""Batched predictor input (docs/design.md §2 step 2): kernels and launchers.

Forward, one pass: output sequence ``r = (j·nenc + i)·B + b`` (L = Kc + Kt tokens) is
``[ctx[i·B + b] + pos[idx_x[i, b]] ; mask_token + pos[idx[j, b]]]``.

Backward:
* ``grad_ctx[i·B + b] = Σ_j grad[(j·nenc + i)·B + b, :Kc]`` (fp32 sum over the npred copies);
* ``grad_mask_token = Σ_{r, t ≥ Kc} grad[r, t]`` as fp32 partial sums per program,
  finished by the caller with one small ``sum(0)``;
* optionally the pos-table gradient, accumulated with fp32 atomics at every index.

No autograd here; :mod:`fastjepa.ops.predictor_tokens` wraps these launchers.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ._launch import jit, on_device
from ._tiles import GPU_NUM_WARPS, GPU_TILE_ELEMS, TILE_ELEMS, RowTiles, cdiv, cols_block, interpreting, rows_block


@jit(dynamic=("KC", "KT"))
def _predictor_tokens_fwd_kernel(
    CTX,  # (nenc·B, Kc, P), strides (scb, sck, scp)
    IDX_X,  # (nenc, B, Kc) contiguous, int32 or int64
    IDX,  # (npred, B, Kt) contiguous, int32 or int64
    POS,  # (1, Npos, P), strides (-, spn, spp)
    MT,  # (P,) contiguous mask token
    OUT,  # (npred·nenc·B, Kc+Kt, P) contiguous
    B,
    NENC,
    KC,
    KT,
    P,
    NPOS,
    scb,
    sck,
    scp,
    spn,
    spp,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # output sequence (j·nenc + i)·B + b
    pid_t = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2).to(tl.int64)
    b = r % B
    i = (r // B) % NENC
    j = r // (B * NENC)
    L = KC + KT
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # (BLOCK_T,) token position
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # (BLOCK_P,) channel
    p_ok = p < P
    is_ctx = t < KC
    is_tgt = (t >= KC) & (t < L)
    n_ctx = tl.load(IDX_X + (i * B + b) * KC + t, mask=is_ctx, other=0).to(tl.int64)  # (BLOCK_T,)
    n_tgt = tl.load(IDX + (j * B + b) * KT + (t - KC), mask=is_tgt, other=0).to(tl.int64)  # (BLOCK_T,)
    n = tl.where(is_ctx, n_ctx, n_tgt)
    n_ok = (is_ctx | is_tgt) & (n >= 0) & (n < NPOS)
    pos = tl.load(POS + n[:, None] * spn + p[None, :] * spp, mask=n_ok[:, None] & p_ok[None, :], other=0.0)
    c = tl.load(CTX + (i * B + b) * scb + t[:, None] * sck + p[None, :] * scp, mask=is_ctx[:, None] & p_ok[None, :], other=0.0)
    mt = tl.load(MT + p, mask=p_ok, other=0.0)  # (BLOCK_P,)
    v = tl.where(is_ctx[:, None], c.to(tl.float32), mt.to(tl.float32)[None, :]) + pos.to(tl.float32)  # (BLOCK_T, BLOCK_P)
    v = tl.where(n_ok[:, None], v, float("nan"))
    tl.store(OUT + (r * L + t[:, None]) * P + p[None, :], v.to(OUT.dtype.element_ty), mask=(t < L)[:, None] & p_ok[None, :])


@jit(dynamic=("KC", "KT"))
def _predictor_tokens_bwd_ctx_kernel(
    GRAD,  # (npred·nenc·B, Kc+Kt, P) contiguous
    IDX_X,  # (nenc, B, Kc) contiguous
    GCTX,  # (nenc·B, Kc, P) contiguous, dtype of ctx
    GPOS,  # (Npos, P) contiguous fp32 accumulator; unused unless POS_GRAD
    B,
    NENC,
    NPRED,
    KC,
    KT,
    P,
    NPOS,
    POS_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)  # context sequence i·B + b
    pid_t = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2).to(tl.int64)
    L = KC + KT
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # (BLOCK_T,)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # (BLOCK_P,)
    ok = (t < KC)[:, None] & (p < P)[None, :]  # (BLOCK_T, BLOCK_P)
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    for j in range(NPRED):
        r = j * NENC * B + s  # copy j of this context sequence: (j·nenc + i)·B + b
        acc += tl.load(GRAD + (r * L + t[:, None]) * P + p[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(GCTX + (s * KC + t[:, None]) * P + p[None, :], acc.to(GCTX.dtype.element_ty), mask=ok)
    if POS_GRAD:
        n = tl.load(IDX_X + s * KC + t, mask=t < KC, other=0).to(tl.int64)
        pos_ok = ok & ((n >= 0) & (n < NPOS))[:, None]
        tl.atomic_add(GPOS + n[:, None] * P + p[None, :], acc, mask=pos_ok)


@jit(dynamic=("KC", "KT"))
def _predictor_tokens_bwd_mask_kernel(
    GRAD,  # (npred·nenc·B, Kc+Kt, P) contiguous
    IDX,  # (npred, B, Kt) contiguous
    PART,  # (n_programs_0, P) fp32 partial sums of the mask-token gradient
    GPOS,  # (Npos, P) contiguous fp32 accumulator; unused unless POS_GRAD
    B,
    NENC,
    KC,
    KT,
    P,
    NPOS,
    R,  # npred·nenc·B sequences
    SEQ_PER_PROG,
    POS_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1).to(tl.int64)
    L = KC + KT
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # (BLOCK_P,)
    p_ok = p < P
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    for s in range(SEQ_PER_PROG):
        r = pid * SEQ_PER_PROG + s  # sequence (j·nenc + i)·B + b
        b = r % B
        j = r // (B * NENC)
        for t0 in range(0, KT, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)  # (BLOCK_T,) target position
            t_ok = (t < KT) & (t * 0 + r < R)  # (BLOCK_T,); the sequence test broadcast to a vector
            ok = t_ok[:, None] & p_ok[None, :]  # (BLOCK_T, BLOCK_P)
            g = tl.load(GRAD + (r * L + KC + t[:, None]) * P + p[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += g
            if POS_GRAD:
                n = tl.load(IDX + (j * B + b) * KT + t, mask=t_ok, other=0).to(tl.int64)
                pos_ok = ok & ((n >= 0) & (n < NPOS))[:, None]
                tl.atomic_add(GPOS + n[:, None] * P + p[None, :], g, mask=pos_ok)
    tl.store(PART + pid * P + p, tl.sum(acc, axis=0), mask=p_ok)


def token_tiles(P: int, n_tokens: int, *, mask_grad: bool = False, gpu: bool | None = None) -> RowTiles:
    """Tiles over (tokens, channels) of one sequence: channel tiles of at most 256 (the
    fewest masked lanes for P = 384, 512, 1024), about 4096 elements per program (the grid
    already has a program per sequence, so one choice serves the interpreter and a GPU).

    ``mask_grad``: the mask-token backward, whose programs also scatter every element of
    their tile into the pos gradient with fp32 atomics. On a GPU its tile is halved: on
    sm_80, where each atomic is a scalar instruction with its own 64-bit address, the
    4096-element tile needs 255 registers and spills in fp32 (``ptxas -v``); 2048 does not.
    """
    if gpu is None:
        gpu = not interpreting()
    block_p = cols_block(P, cap=256)
    tile = GPU_TILE_ELEMS // 2 if (gpu and mask_grad) else TILE_ELEMS
    return RowTiles(rows_block(block_p, n_tokens, tile), block_p, GPU_NUM_WARPS)


def predictor_tokens_fwd(
    ctx: torch.Tensor,
    idx_x: torch.Tensor,
    idx: torch.Tensor,
    pos: torch.Tensor,
    mask_token: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(nenc·B, Kc, P), (nenc, B, Kc), (npred, B, Kt), (1, Npos, P), P-element mask token
    -> (npred·nenc·B, Kc+Kt, P) in ``promote(ctx, pos, mask_token)``."""
    nenc, B, KC = idx_x.shape
    npred, _, KT = idx.shape
    P = ctx.size(-1)
    L = KC + KT
    idx_x, idx = idx_x.contiguous(), idx.contiguous()
    mt = mask_token.reshape(P).contiguous()
    dtype = torch.promote_types(torch.promote_types(ctx.dtype, pos.dtype), mask_token.dtype)
    R = npred * nenc * B
    if out is None:
        out = torch.empty((R, L, P), device=ctx.device, dtype=dtype)
    if R == 0 or L == 0 or P == 0:
        return out
    tiles = token_tiles(P, L)
    grid = (R, cdiv(L, tiles.block_r), cdiv(P, tiles.block_d))
    with on_device(out.device):
        _predictor_tokens_fwd_kernel[grid](
            ctx, idx_x, idx, pos, mt, out, B, nenc, KC, KT, P, pos.size(1), *ctx.stride(), pos.stride(1), pos.stride(2),
            BLOCK_T=tiles.block_r, BLOCK_P=tiles.block_d, num_warps=tiles.num_warps,
        )
    return out


def predictor_tokens_bwd(
    grad: torch.Tensor,
    idx_x: torch.Tensor,
    idx: torch.Tensor,
    ctx_dtype: torch.dtype,
    npos: int,
    pos_grad: bool,
    *,
    seq_per_prog: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Upstream (npred·nenc·B, Kc+Kt, P) grad -> (grad_ctx (nenc·B, Kc, P) in ``ctx_dtype``,
    fp32 (P,) mask-token grad, fp32 (Npos, P) pos grad or None).

    ``seq_per_prog``: sequences each mask-token program reduces (default: by size).
    """
    nenc, B, KC = idx_x.shape
    npred, _, KT = idx.shape
    P = grad.size(-1)
    grad = grad.contiguous()
    idx_x, idx = idx_x.contiguous(), idx.contiguous()
    R = npred * nenc * B
    gctx = torch.empty((nenc * B, KC, P), device=grad.device, dtype=ctx_dtype)
    gpos = torch.zeros((npos, P), device=grad.device, dtype=torch.float32) if pos_grad else None
    gp = gpos if pos_grad else gctx
    if nenc * B * KC > 0 and P > 0:
        tiles = token_tiles(P, KC)
        grid = (nenc * B, cdiv(KC, tiles.block_r), cdiv(P, tiles.block_d))
        with on_device(gctx.device):
            _predictor_tokens_bwd_ctx_kernel[grid](
                grad, idx_x, gctx, gp, B, nenc, npred, KC, KT, P, npos,
                POS_GRAD=pos_grad, BLOCK_T=tiles.block_r, BLOCK_P=tiles.block_d, num_warps=tiles.num_warps,
            )
    if R * KT == 0 or P == 0:
        return gctx, torch.zeros(P, device=grad.device, dtype=torch.float32), gpos
    tiles = token_tiles(P, KT, mask_grad=True)
    if seq_per_prog is None:
        seq_per_prog = max(1, min(8, R // 2048))  # enough programs to fill a GPU; few partial rows past that
    n_prog = cdiv(R, seq_per_prog)
    part = torch.empty((n_prog, P), device=grad.device, dtype=torch.float32)
    grid = (n_prog, cdiv(P, tiles.block_d))
    with on_device(part.device):
        _predictor_tokens_bwd_mask_kernel[grid](
            grad, idx, part, gp, B, nenc, KC, KT, P, npos, R, seq_per_prog,
            POS_GRAD=pos_grad, BLOCK_T=tiles.block_r, BLOCK_P=tiles.block_d, num_warps=tiles.num_warps,
        )
    return gctx, part.sum(0), gpos

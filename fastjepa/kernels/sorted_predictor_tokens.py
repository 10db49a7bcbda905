"""Sorted predictor input and its inverse (V-JEPA 2's predictor): kernels and launchers.

Notation: R rows (M·B), Kc context and Kt target tokens per row, L = Kc + Kt, ``off`` = 1
with a class token in front (else 0), ``Lk`` = L - chop kept sorted slots. ``order[r, s]``
is the unsorted slot at sorted slot s (< Kc: context token, else target ``order - Kc``),
``inverse`` its inverse permutation, ``positions[r, s]`` the token position at s.

* forward: ``out[r, off + s] = ctx[r, off + order[r, s]] + pos[positions[r, s]]`` (rounded to
  ctx's dtype) for a context slot, ``mask_token + pos[positions[r, s]]`` for a target slot;
  ``out[r, 0] = ctx[r, 0]`` with a class token.
* backward: ``grad_ctx[r, off + c] = grad[r, off + inverse[r, c]]`` (0 when chopped), the
  class row copied; the mask-token gradient as fp32 partial sums over the target slots,
  finished by the caller with one small ``sum(0)``; the pos-table gradient (optional) with
  fp32 atomics at every kept position.
* take: ``out[r, t] = y[r, off + inverse[r, Kc + t]]``; its backward
  ``grad_y[r, off + s] = grad[r, order[r, s] - Kc]`` at target slots, 0 elsewhere.

The three gathers (ctx gradient, take, take backward) are one kernel. No autograd here;
:mod:`fastjepa.ops.sorted_predictor_tokens` wraps these launchers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import jit, on_device
from ._tiles import cdiv, cols_block, rows_block

_ROUND = {torch.bfloat16: 1, torch.float16: 2}  # ROUND_CTX / ROUND_TGT codes (0: no rounding)


@triton.jit
def _round(v, MODE: tl.constexpr):
    """fp32 -> rounded to bf16 (MODE 1) or fp16 (MODE 2), nearest-even, returned as fp32.

    bf16 by bit arithmetic: the CPU interpreter's conversion truncates, a GPU's rounds;
    this is the same on both (NaN kept as is)."""
    if MODE == 1:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    if MODE == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@jit(dynamic=("KC", "L", "LK"))
def _sorted_tokens_fwd_kernel(
    CTX,  # (R, off + Kc, P), strides (scr, sck, scp)
    ORDER,  # (R, L) contiguous int64
    POSITIONS,  # (R, L) contiguous, int32 or int64
    POS,  # (1, Npos, P), strides (-, spn, spp); unused unless HAS_POS
    MT,  # (P,) contiguous mask token
    OUT,  # (R, off + Lk, P) contiguous
    KC,
    L,
    LK,
    P,
    NPOS,
    scr,
    sck,
    scp,
    spn,
    spp,
    OFF: tl.constexpr,
    HAS_POS: tl.constexpr,
    ROUND_CTX: tl.constexpr,  # ctx + pos rounded to ctx's dtype when narrower than the output's: 0 no, 1 bf16, 2 fp16
    ROUND_TGT: tl.constexpr,  # mask_token + pos rounded to their promoted dtype, likewise
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2).to(tl.int64)
    u = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # (BLOCK_T,) output slot
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # (BLOCK_P,) channel
    p_ok = p < P
    s = u - OFF  # sorted slot
    s_ok = (s >= 0) & (s < LK)
    is_head = u < OFF  # the class token
    src = tl.load(ORDER + r * L + s, mask=s_ok, other=0)  # (BLOCK_T,) unsorted slot
    is_ctx = s_ok & (src < KC)
    is_tgt = s_ok & (src >= KC)
    tok = tl.where(is_head, u, OFF + src)  # (BLOCK_T,) ctx token read by this slot
    c = tl.load(
        CTX + r * scr + tok[:, None] * sck + p[None, :] * scp, mask=(is_ctx | is_head)[:, None] & p_ok[None, :], other=0.0
    ).to(tl.float32)  # (BLOCK_T, BLOCK_P)
    mt = tl.load(MT + p, mask=p_ok, other=0.0).to(tl.float32)  # (BLOCK_P,)
    v_ctx = c
    v_tgt = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32) + mt[None, :]
    if HAS_POS:
        n = tl.load(POSITIONS + r * L + s, mask=s_ok, other=0).to(tl.int64)  # (BLOCK_T,)
        n_ok = s_ok & (n >= 0) & (n < NPOS)
        q = tl.load(POS + n[:, None] * spn + p[None, :] * spp, mask=n_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
        v_ctx = c + q
        v_tgt = v_tgt + q
        v_ctx = _round(v_ctx, ROUND_CTX)
        v_tgt = _round(v_tgt, ROUND_TGT)
        bad = s_ok & ~n_ok  # an out-of-range position (unchecked on CUDA unless validate=True)
        v_ctx = tl.where(bad[:, None], float("nan"), v_ctx)
        v_tgt = tl.where(bad[:, None], float("nan"), v_tgt)
    v = tl.where(is_tgt[:, None], v_tgt, v_ctx)
    ok = (is_head | s_ok)[:, None] & p_ok[None, :]
    tl.store(OUT + (r * (OFF + LK) + u[:, None]) * P + p[None, :], v.to(OUT.dtype.element_ty), mask=ok)


@jit(dynamic=("LS", "LM", "LO", "MAP_OFF", "SHIFT", "NVALID"))
def _rows_gather_kernel(
    SRC,  # (R, Ls, P) contiguous
    MAP,  # (R, Lm) contiguous int64
    OUT,  # (R, Lo, P) contiguous
    LS,
    LM,
    LO,
    P,
    MAP_OFF,  # first MAP column read
    SHIFT,  # subtracted from a MAP value
    NVALID,  # a shifted value in [0, NVALID) reads SRC[r, SRC_OFF + value]; others write 0
    SRC_OFF,
    HEAD: tl.constexpr,  # output slots before the mapped ones
    HEAD_COPY: tl.constexpr,  # head slot u copies SRC[r, u] (else 0)
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2).to(tl.int64)
    u = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # (BLOCK_T,) output slot
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # (BLOCK_P,)
    p_ok = p < P
    u_ok = u < LO
    is_head = u < HEAD
    mapped = u_ok & ~is_head
    v = tl.load(MAP + r * LM + MAP_OFF + (u - HEAD), mask=mapped, other=-1) - SHIFT  # (BLOCK_T,)
    take = mapped & (v >= 0) & (v < NVALID)
    row = tl.where(is_head, u, SRC_OFF + v)  # (BLOCK_T,)
    if HEAD_COPY:
        read = take | is_head
    else:
        read = take
    g = tl.load(SRC + (r * LS + row[:, None]) * P + p[None, :], mask=read[:, None] & p_ok[None, :], other=0.0)
    tl.store(OUT + (r * LO + u[:, None]) * P + p[None, :], g.to(OUT.dtype.element_ty), mask=u_ok[:, None] & p_ok[None, :])


@jit(dynamic=("KC", "L", "LK"))
def _sorted_tokens_bwd_mask_kernel(
    GRAD,  # (R, off + Lk, P) contiguous
    ORDER,  # (R, L) contiguous int64
    POSITIONS,  # (R, L) contiguous, int32 or int64
    PART,  # (R·n_chunks, P) fp32 partial sums of the mask-token gradient
    GPOS,  # (Npos, P) contiguous fp32 accumulator; unused unless POS_GRAD
    KC,
    L,
    LK,
    P,
    NPOS,
    CHUNK,  # sorted slots per program
    OFF: tl.constexpr,
    POS_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # (BLOCK_P,)
    p_ok = p < P
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    for t0 in range(0, CHUNK, BLOCK_T):
        s = chunk * CHUNK + t0 + tl.arange(0, BLOCK_T).to(tl.int64)  # (BLOCK_T,) sorted slot
        s_ok = (s < LK) & (s < chunk * CHUNK + CHUNK)
        ok = s_ok[:, None] & p_ok[None, :]  # (BLOCK_T, BLOCK_P)
        g = tl.load(GRAD + (r * (OFF + LK) + OFF + s[:, None]) * P + p[None, :], mask=ok, other=0.0).to(tl.float32)
        src = tl.load(ORDER + r * L + s, mask=s_ok, other=0)
        acc += tl.where((src >= KC)[:, None], g, 0.0)
        if POS_GRAD:
            n = tl.load(POSITIONS + r * L + s, mask=s_ok, other=0).to(tl.int64)
            pos_ok = ok & ((n >= 0) & (n < NPOS))[:, None]
            tl.atomic_add(GPOS + n[:, None] * P + p[None, :], g, mask=pos_ok)
    tl.store(PART + (r * tl.num_programs(1) + chunk) * P + p, tl.sum(acc, axis=0), mask=p_ok)


def _gather_rows(src, map_, out, *, map_off, shift, nvalid, src_off, head, head_copy):
    R, LO, P = out.shape
    if R == 0 or LO == 0 or P == 0:
        return out
    block_p = cols_block(P, cap=256)
    block_t = rows_block(block_p, LO)
    grid = (R, cdiv(LO, block_t), cdiv(P, block_p))
    with on_device(out.device):
        _rows_gather_kernel[grid](
            src, map_, out, src.size(1), map_.size(1), LO, P, map_off, shift, nvalid, src_off,
            HEAD=head, HEAD_COPY=head_copy, BLOCK_T=block_t, BLOCK_P=block_p,
        )  # fmt: skip
    return out


def sorted_predictor_tokens_fwd(
    ctx: torch.Tensor,
    order: torch.Tensor,
    positions: torch.Tensor,
    pos: torch.Tensor | None,
    mask_token: torch.Tensor,
    has_cls: bool,
    chop: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(R, off + Kc, P), (R, L) int64, (R, L), (1, Npos, P) or None, P-element mask token
    -> (R, off + L - chop, P) in ``promote(ctx, mask_token, pos)``."""
    R, L = order.shape
    off = int(has_cls)
    P = ctx.size(-1)
    KC = ctx.size(1) - off
    LK = L - chop
    order, positions = order.contiguous(), positions.contiguous()
    mt = mask_token.reshape(P).contiguous()
    dtype = torch.promote_types(ctx.dtype, mask_token.dtype)
    tgt_dtype = mask_token.dtype
    if pos is not None:
        dtype = torch.promote_types(dtype, pos.dtype)
        tgt_dtype = torch.promote_types(tgt_dtype, pos.dtype)
    if out is None:
        out = torch.empty((R, off + LK, P), device=ctx.device, dtype=dtype)
    if R == 0 or off + LK == 0 or P == 0:
        return out
    round_ctx = _ROUND.get(ctx.dtype, 0) if pos is not None and ctx.dtype != dtype else 0
    round_tgt = _ROUND.get(tgt_dtype, 0) if tgt_dtype != dtype else 0
    block_p = cols_block(P, cap=256)
    block_t = rows_block(block_p, off + LK)
    grid = (R, cdiv(off + LK, block_t), cdiv(P, block_p))
    pos_arg = pos if pos is not None else mt
    spn, spp = (pos.stride(1), pos.stride(2)) if pos is not None else (0, 0)
    with on_device(out.device):
        _sorted_tokens_fwd_kernel[grid](
            ctx, order, positions, pos_arg, mt, out, KC, L, LK, P, 0 if pos is None else pos.size(1), *ctx.stride(), spn, spp,
            OFF=off, HAS_POS=pos is not None, ROUND_CTX=round_ctx, ROUND_TGT=round_tgt, BLOCK_T=block_t, BLOCK_P=block_p,
        )  # fmt: skip
    return out


def sorted_predictor_tokens_bwd(
    grad: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    positions: torch.Tensor,
    n_ctxt: int,
    has_cls: bool,
    npos: int,
    ctx_dtype: torch.dtype,
    pos_grad: bool,
    *,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Upstream (R, off + Lk, P) grad -> (grad_ctx (R, off + Kc, P) in ``ctx_dtype``, fp32 (P,)
    mask-token grad, fp32 (Npos, P) pos grad or None). ``chunk``: sorted slots per program
    of the mask-token reduction."""
    R, L = order.shape
    off = int(has_cls)
    P = grad.size(-1)
    LK = grad.size(1) - off
    grad = grad.contiguous()
    order, inverse, positions = order.contiguous(), inverse.contiguous(), positions.contiguous()
    gctx = torch.empty((R, off + n_ctxt, P), device=grad.device, dtype=ctx_dtype)
    _gather_rows(grad, inverse, gctx, map_off=0, shift=0, nvalid=LK, src_off=off, head=off, head_copy=True)
    gpos = torch.zeros((npos, P), device=grad.device, dtype=torch.float32) if pos_grad else None
    if R * LK == 0 or P == 0:
        return gctx, torch.zeros(P, device=grad.device, dtype=torch.float32), gpos
    block_p = cols_block(P, cap=256)
    block_t = rows_block(block_p, min(LK, chunk))
    chunk = max(chunk, block_t)
    n_chunks = cdiv(LK, chunk)
    part = torch.empty((R * n_chunks, P), device=grad.device, dtype=torch.float32)
    grid = (R, n_chunks, cdiv(P, block_p))
    with on_device(grad.device):
        _sorted_tokens_bwd_mask_kernel[grid](
            grad, order, positions, part, gpos if pos_grad else part, n_ctxt, L, LK, P, npos, chunk,
            OFF=off, POS_GRAD=pos_grad, BLOCK_T=block_t, BLOCK_P=block_p,
        )  # fmt: skip
    return gctx, part.sum(0), gpos


def sorted_predictor_take_fwd(y: torch.Tensor, inverse: torch.Tensor, n_ctxt: int, has_cls: bool) -> torch.Tensor:
    """(R, off + L, D), (R, L) int64 -> (R, L - n_ctxt, D): the targets in mask order."""
    R, L = inverse.shape
    y, inverse = y.contiguous(), inverse.contiguous()
    out = torch.empty((R, L - n_ctxt, y.size(-1)), device=y.device, dtype=y.dtype)
    return _gather_rows(y, inverse, out, map_off=n_ctxt, shift=0, nvalid=L, src_off=int(has_cls), head=0, head_copy=False)


def sorted_predictor_take_bwd(
    grad: torch.Tensor, order: torch.Tensor, n_ctxt: int, has_cls: bool, y_dtype: torch.dtype
) -> torch.Tensor:
    """(R, Kt, D) grad, (R, L) int64 -> (R, off + L, D) in ``y_dtype``: grad at the target slots, 0 elsewhere."""
    R, L = order.shape
    off = int(has_cls)
    grad, order = grad.contiguous(), order.contiguous()
    out = torch.empty((R, off + L, grad.size(-1)), device=grad.device, dtype=y_dtype)
    return _gather_rows(grad, order, out, map_off=0, shift=n_ctxt, nvalid=L - n_ctxt, src_off=0, head=off, head_copy=False)

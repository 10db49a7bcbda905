"""Rotary position embedding of q and k on a 3-D / 2-D grid: kernel and launcher.

For token n of image b at flat grid index t = ids[b, n] (or n) and channel c < A·d
(A axes of d rotated channels each; channel c belongs to axis c // d, its local index
l = c mod d, its partner is c ^ 1):

    forward:   out[c] = x[c]·cos θ(c)   + s(c)·x[c^1]·sin θ(c)
    backward:  gx[c]  = g[c]·cos θ(c)   - s(c)·g[c^1]·sin θ(c^1)      (the transpose)

with s(c) = -1 for even c, +1 for odd c, θ(c) = pos_axis(t) · omega[f(l)] and
f(l) = l mod (d/2) (layout vjepa2) or l // 2 (interleaved, where θ(c) = θ(c^1) and the
backward is the rotation by -θ). Channels c ≥ A·d are copied.

The position and the angle are rounded to the input dtype (as V-JEPA 2 computes them in
it; ``omega`` arrives already rounded); sin, cos and the rotation are fp32, rounded once.
Each program handles BLOCK_N tokens of one image: it evaluates cos/sin of its
(BLOCK_N, head_dim) tile once and applies them to every head of q and of k.
No autograd here; :mod:`fastjepa.ops.rope` wraps the launcher.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ._launch import jit, on_device
from ._tiles import cdiv, cols_block, rows_block

TILE = 2048  # elements of a (tokens, head_dim) tile: cos, sin, x and its partner live in registers


@jit(dynamic=("N", "sib"))
def _rope_kernel(
    Q,  # (B, NH, N, D), strides (sqb, sqh, sqn, sqd)
    K,  # (B, NH, N, D), strides (skb, skh, skn, skd)
    QO,  # (B, NH, N, D) contiguous
    KO,  # (B, NH, N, D) contiguous
    IDS,  # (B, N) or (N,) int32/int64, strides (sib, sin); unused unless HAS_IDS
    OMEGA,  # (PART // 2,) fp32, omega_j rounded to the input dtype
    NH,
    N,
    D,
    PART,  # rotated channels per axis (even, >= 2)
    TPF,  # tokens per frame (H·W); unused unless N_AXES == 3
    TPR,  # tokens per row (W)
    SOH,  # N·D: the head stride of the outputs
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    sib,
    sin,
    N_AXES: tl.constexpr,  # 3 (frame, row, column) or 2 (row, column)
    HAS_IDS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_blocks = tl.cdiv(N, BLOCK_N)
    b = pid // n_blocks
    n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
    c = tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
    n_ok = n < N
    c_ok = c < D
    if HAS_IDS:
        t = tl.load(IDS + b * sib + n * sin, mask=n_ok, other=0).to(tl.int64)  # (BLOCK_N,)
    else:
        t = n
    if N_AXES == 3:
        p0 = t // TPF  # frame
        rest = t - p0 * TPF
        p1 = rest // TPR  # row
        p2 = rest - p1 * TPR  # column
    else:
        p0 = t // TPR  # row
        p1 = t - p0 * TPR  # column
        p2 = p1
    half = PART // 2
    axis = c // PART  # (BLOCK_D,)
    local = c - axis * PART
    rot = c < N_AXES * PART  # (BLOCK_D,) rotated channels
    if INTERLEAVED:
        f_cos = local // 2
        f_sin = f_cos
    else:
        f_cos = local % half
        if BACKWARD:
            f_sin = (local ^ 1) % half  # the partner's frequency
        else:
            f_sin = f_cos
    om_cos = tl.load(OMEGA + f_cos, mask=rot, other=0.0)  # (BLOCK_D,)
    om_sin = tl.load(OMEGA + f_sin, mask=rot, other=0.0)
    pos = tl.where(axis[None, :] == 0, p0[:, None], tl.where(axis[None, :] == 1, p1[:, None], p2[:, None]))  # (BLOCK_N, BLOCK_D)
    pos_f = pos.to(tl.float32).to(QO.dtype.element_ty).to(tl.float32)  # the position in the input dtype
    a_cos = (pos_f * om_cos[None, :]).to(QO.dtype.element_ty).to(tl.float32)  # the angle, rounded as V-JEPA 2 rounds it
    a_sin = (pos_f * om_sin[None, :]).to(QO.dtype.element_ty).to(tl.float32)
    sign = tl.where((c % 2) == 0, -1.0, 1.0)  # (BLOCK_D,)
    if BACKWARD:
        sign = -sign
    cos = tl.where(rot[None, :], tl.cos(a_cos), 1.0)  # (BLOCK_N, BLOCK_D)
    sin = tl.where(rot[None, :], tl.sin(a_sin) * sign[None, :], 0.0)
    partner = c ^ 1
    ok = n_ok[:, None] & c_ok[None, :]
    ok_p = n_ok[:, None] & (rot & (partner < D))[None, :]
    off_q = b * sqb + n[:, None] * sqn  # (BLOCK_N, 1) int64, head h at off_q + h·sqh
    off_k = b * skb + n[:, None] * skn
    off_o = (b * NH * N + n[:, None]) * D  # (BLOCK_N, 1) row offsets in the contiguous outputs
    for _h in range(0, NH):
        x = tl.load(Q + off_q + c[None, :] * sqd, mask=ok, other=0.0).to(tl.float32)
        xp = tl.load(Q + off_q + partner[None, :] * sqd, mask=ok_p, other=0.0).to(tl.float32)
        tl.store(QO + off_o + c[None, :], (x * cos + xp * sin).to(QO.dtype.element_ty), mask=ok)
        x = tl.load(K + off_k + c[None, :] * skd, mask=ok, other=0.0).to(tl.float32)
        xp = tl.load(K + off_k + partner[None, :] * skd, mask=ok_p, other=0.0).to(tl.float32)
        tl.store(KO + off_o + c[None, :], (x * cos + xp * sin).to(KO.dtype.element_ty), mask=ok)
        off_q += sqh
        off_k += skh
        off_o += SOH

def rope_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    ids: torch.Tensor | None,
    omega: torch.Tensor,
    n_axes: int,
    tpf: int,
    tpr: int,
    interleaved: bool,
    backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, NH, N, D) q, k (any strides), ids (B, N) | (N,) | None, omega (d/2,) fp32
    -> contiguous rotated (q, k). ``backward=True``: the transpose, for gradients."""
    B, NH, N, D = q.shape
    part = 2 * ((D // n_axes) // 2)
    qo = torch.empty((B, NH, N, D), device=q.device, dtype=q.dtype)
    ko = torch.empty((B, NH, N, D), device=k.device, dtype=k.dtype)
    if qo.numel() == 0:
        return qo, ko
    block_d = cols_block(D)
    block_n = rows_block(block_d, N, tile=TILE)
    has_ids = ids is not None
    if has_ids:
        sib, sid = (0, ids.stride(0)) if ids.dim() == 1 else ids.stride()
    else:
        sib, sid = 0, 0
    grid = (B * cdiv(N, block_n),)
    with on_device(qo.device):
        _rope_kernel[grid](
            q, k, qo, ko, ids if has_ids else q, omega, NH, N, D, part, tpf, tpr, N * D,
            *q.stride(), *k.stride(), sib, sid,
            N_AXES=n_axes, HAS_IDS=has_ids, INTERLEAVED=interleaved, BACKWARD=backward, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
    return qo, ko

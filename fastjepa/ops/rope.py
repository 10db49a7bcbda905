"""Rotary position embedding of queries and keys on a video (3-D) or image (2-D) grid.

``rope_qk(q, k, ids, grid)`` rotates q and k (B, heads, N, head_dim) in one call, by the
grid position of each token, as V-JEPA 2's ``RoPEAttention`` does:

* **Positions.** Token ``n`` sits at flat grid index ``t = ids[b, n]`` (``ids`` (B, N) or
  (N,), int32/int64: the sorted mask positions, or None for ``arange(N)``). On a
  ``grid=(T, H, W)`` its frame, row and column are ``t // (H·W)``, ``(t mod H·W) // W`` and
  ``t mod W``; on ``grid=(H, W)`` its row and column are ``t // W`` and ``t mod W``. ``T``
  may be None (frames unbounded: ids are then only checked to be ≥ 0).
* **Channels.** The head dim is split into ``len(grid)`` equal even parts of
  ``d = 2·((head_dim // len(grid)) // 2)`` channels (frame, row, column in that order);
  the ``head_dim - len(grid)·d`` leftover channels pass through unrotated.
* **Frequencies.** ``omega_j = 1 / 10000^(j / (d/2))``, ``j < d/2``, and the angle of
  a channel is ``pos · omega_f``, where its frequency index ``f`` depends on the layout:

  - ``layout="vjepa2"`` (default; what V-JEPA 2's released checkpoints were trained
    with): channel ``c`` of a part uses ``f = c mod (d/2)`` — V-JEPA 2 builds its (.., d/2)
    sin/cos tables and repeats them whole (``repeat(1, 1, 1, 2)``) instead of per pair,
    so the two channels of a pair use *different* frequencies (2i mod d/2 and
    2i+1 mod d/2), and every frequency is used twice across the part;
  - ``layout="interleaved"``: ``f = c // 2`` (both channels of pair i use omega_i, the
    textbook RoPE; what V-JEPA 2's code offers as the commented-out fix).
* **Rotation.** Pairs ``(x[2i], x[2i+1])`` become
  ``(x[2i]·cos θ_{2i} - x[2i+1]·sin θ_{2i},  x[2i+1]·cos θ_{2i+1} + x[2i]·sin θ_{2i+1})``
  with θ_c the angle of channel c. With the interleaved layout this is a rotation and
  its backward is the rotation by -θ; with the vjepa2 layout θ_{2i} ≠ θ_{2i+1}, the map
  is not orthogonal, and the backward is its transpose:
  ``g_x[2i] = g[2i]·cos θ_{2i} + g[2i+1]·sin θ_{2i+1}``,
  ``g_x[2i+1] = g[2i+1]·cos θ_{2i+1} - g[2i]·sin θ_{2i}``. The kernels compute both from
  one code path with a ``backward`` flag.
* **Dtype of the angles.** V-JEPA 2 builds omega with the dtype of q (``arange(..,
  dtype=x.dtype)``), so under bf16 autocast omega, the position and their product are
  rounded to bf16 — an angle error of up to ``pos·2^-9`` radians that the released
  models were trained with. fastjepa reproduces it: omega and the angle are computed in
  the input dtype (exactly the same roundings), then sin, cos and the rotation are
  evaluated in fp32 and rounded once to the output dtype. In float32 this is V-JEPA 2's
  computation to rounding. :func:`rope_reference` takes ``freq_dtype`` to compute a
  higher-precision reference of the low-precision op.

No sin/cos table is built per call: the kernels evaluate sin and cos of each (token,
channel) once per call and reuse them across heads and for both q and k; the only table
is omega (d/2 values per dtype and device, cached).

Backends (``FASTJEPA_BACKEND`` / :func:`fastjepa.ops.use_backend`): ``triton`` (the
custom op ``fastjepa::rope_triton``), ``cpp`` (``fastjepa::rope_fwd`` of the C++
extension, CPU only) and ``reference`` (this file's :func:`rope_qk_reference`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

from . import _validate as checks
from ._dispatch import direct, select

BASE = 10000.0
LAYOUTS = ("vjepa2", "interleaved")

Grid = Sequence  # (T | None, H, W) or (H, W)


# -- grid and positions -----------------------------------------------------------------


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def grid_info(grid: Grid) -> tuple[int, int, int, int | None]:
    """``(n_axes, tokens_per_frame, tokens_per_row, bound)`` of ``grid``; ``bound`` is the
    number of grid positions (ids must be below it), None when T is None."""
    if not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3):
        raise ValueError(f"rope: grid={grid!r}, expected (T, H, W) for video or (H, W) for images")
    *t, h, w = grid
    if not (_is_count(h) and _is_count(w)):
        raise ValueError(f"rope: grid={tuple(grid)!r}, expected positive int H and W")
    if t and t[0] is not None and not _is_count(t[0]):
        raise ValueError(f"rope: grid={tuple(grid)!r}, expected T a positive int or None")
    if len(grid) == 2:
        return 2, h * w, w, h * w
    return 3, h * w, w, None if t[0] is None else t[0] * h * w


def rotated_width(head_dim: int, n_axes: int) -> int:
    """Channels rotated per axis: the largest even number ≤ head_dim / n_axes."""
    return 2 * ((head_dim // n_axes) // 2)


def axis_positions(ids: torch.Tensor | None, N: int, grid: Grid, device: torch.device) -> list[torch.Tensor]:
    """Per axis (frame, row, column — or row, column), the int64 positions of the N tokens,
    shaped (B, N) or (1, N)."""
    n_axes, tpf, tpr, _ = grid_info(grid)
    t = torch.arange(N, device=device) if ids is None else ids.to(device=device, dtype=torch.int64)
    t = t.reshape(-1, N)  # (B | 1, N)
    if n_axes == 2:
        row = t // tpr
        return [row, t - row * tpr]
    frame = t // tpf
    rest = t - frame * tpf
    row = rest // tpr
    return [frame, row, rest - row * tpr]


def frequencies(half: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """omega_j = 1 / 10000^(j / half), j < half, every step computed in ``dtype``: (half,)."""
    omega = torch.arange(half, dtype=dtype, device=device)
    omega /= float(half)
    return 1.0 / BASE**omega


def frequency_index(d: int, layout: str) -> torch.Tensor:
    """(d,) int64: the frequency index of each rotated channel of one part."""
    c = torch.arange(d)
    return c % (d // 2) if layout == "vjepa2" else c // 2


# -- reference ----------------------------------------------------------------------------


def rope_reference(
    x: torch.Tensor, ids: torch.Tensor | None, grid: Grid, *, layout: str = "vjepa2", freq_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Reference: (B, heads, N, head_dim) -> the same, rotated (see the module docstring).

    ``freq_dtype`` (default: x's dtype) is the dtype omega and the angles are computed in;
    sin, cos and the rotation use x's dtype. With x in float64 and ``freq_dtype`` bf16 it
    gives the exact value of what the bf16 op computes.
    """
    B, nh, N, D = x.shape
    n_axes = grid_info(grid)[0]
    d = rotated_width(D, n_axes)
    fd = freq_dtype or x.dtype
    f = frequency_index(d, layout).to(x.device)  # (d,)
    c = torch.arange(d, device=x.device)
    partner = c ^ 1  # (d,) the other channel of each pair
    sign = torch.where(c % 2 == 0, -1.0, 1.0).to(device=x.device, dtype=x.dtype)  # (d,)
    omega = frequencies(d // 2, fd, x.device)[f]  # (d,) in fd
    parts = []
    for a, pos in enumerate(axis_positions(ids, N, grid, x.device)):  # (B | 1, N)
        angle = (pos.to(fd)[:, None, :, None] * omega).to(x.dtype)  # (B | 1, 1, N, d)
        xa = x[..., a * d : (a + 1) * d]  # (B, nh, N, d)
        parts.append(xa * angle.cos() + sign * xa[..., partner] * angle.sin())
    parts.append(x[..., n_axes * d :])  # leftover channels, unrotated
    return torch.cat(parts, dim=-1)


def rope_qk_reference(
    q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor | None, grid: Grid, *, layout: str = "vjepa2",
    freq_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`rope_qk`: q and k rotated by the same positions."""
    return (rope_reference(q, ids, grid, layout=layout, freq_dtype=freq_dtype),
            rope_reference(k, ids, grid, layout=layout, freq_dtype=freq_dtype))


# -- omega cache (for the Triton kernel) ----------------------------------------------------

_OMEGA: dict[tuple, torch.Tensor] = {}


def omega_table(half: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(half,) :func:`frequencies` in ``dtype``, held in fp32 (fp64 for float64: the
    values are exact there), cached per (half, dtype, device).

    Not cached while a CUDA graph is being captured: a tensor allocated during capture
    lives in the graph's private memory and holds its values only once the graph has
    been replayed (eager calls after the capture would read garbage)."""
    key = (half, dtype, device)
    omega = _OMEGA.get(key)
    if omega is None:
        omega = frequencies(half, dtype, device).to(torch.float64 if dtype == torch.float64 else torch.float32)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _OMEGA[key] = omega
    return omega


# -- Triton custom op ----------------------------------------------------------------------


@torch.library.custom_op("fastjepa::rope_triton", mutates_args=())
def _rope_triton(
    q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor | None, n_axes: int, tpf: int, tpr: int, interleaved: bool,
    backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, N, D) q, k, (B, N) | (N,) | None ids -> rotated (q, k), contiguous.
    ``backward=True`` applies the transpose (the gradient map)."""
    return _rope_impl(q, k, ids, n_axes, tpf, tpr, interleaved, backward)


def _rope_impl(q, k, ids, n_axes, tpf, tpr, interleaved, backward):
    d = rotated_width(q.size(-1), n_axes)
    omega = omega_table(d // 2, q.dtype, q.device)
    return importlib.import_module("fastjepa.kernels.rope").rope_fwd(q, k, ids, omega, n_axes, tpf, tpr, interleaved, backward)


@_rope_triton.register_fake
def _(q, k, ids, n_axes, tpf, tpr, interleaved, backward):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, ids, n_axes, tpf, tpr, interleaved, backward = inputs
    ctx.save_for_backward(ids)
    ctx.args = (n_axes, tpf, tpr, interleaved, not backward)


def _backward(ctx, gq, gk):
    (ids,) = ctx.saved_tensors
    gq, gk = _rope_triton(gq, gk, ids, *ctx.args)
    return gq, gk, None, None, None, None, None, None


_rope_triton.register_autograd(_backward, setup_context=_setup_context)


class _RopeDirect(torch.autograd.Function):
    """The custom op's forward and backward without its dispatch layers (eager calls,
    see :func:`fastjepa.ops._dispatch.direct`). The backward is the same function with
    ``backward`` flipped, so double backward works as through the custom op."""

    @staticmethod
    def forward(ctx, q, k, ids, n_axes, tpf, tpr, interleaved, backward):
        _setup_context(ctx, (q, k, ids, n_axes, tpf, tpr, interleaved, backward), None)
        return _rope_impl(q, k, ids, n_axes, tpf, tpr, interleaved, backward)

    @staticmethod
    def backward(ctx, gq, gk):
        (ids,) = ctx.saved_tensors
        gq, gk = _RopeDirect.apply(gq, gk, ids, *ctx.args)
        return gq, gk, None, None, None, None, None, None


# -- public op -------------------------------------------------------------------------


def _check(q, k, ids, grid, layout, validate):
    if layout not in LAYOUTS:
        raise ValueError(f"rope_qk: layout={layout!r}, expected one of {', '.join(map(repr, LAYOUTS))}")
    n_axes, tpf, tpr, bound = grid_info(grid)
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"rope_qk: {name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"rope_qk: {name}: expected shape (B, heads, N, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"rope_qk: {name}: expected a floating-point tensor, got {t.dtype}")
    if k.shape != q.shape or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(
            f"rope_qk: k is {tuple(k.shape)} {k.dtype} on {k.device}, expected q's {tuple(q.shape)} {q.dtype} on {q.device}"
        )
    B, _, N, D = q.shape
    if rotated_width(D, n_axes) == 0:
        raise ValueError(
            f"rope_qk: head_dim={D} is too small for a {n_axes}-D grid: expected head_dim >= {2 * n_axes} "
            f"(two channels per axis)"
        )
    if ids is None:
        if bound is not None and N > bound:
            raise IndexError(f"rope_qk: ids=None numbers the tokens 0..{N - 1}, out of range for grid {tuple(grid)} "
                             f"({bound} positions)")
        return n_axes, tpf, tpr
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"rope_qk: ids: expected a tensor or None, got {type(ids).__name__}")
    if ids.dtype not in checks.INDEX_DTYPES:
        raise ValueError(f"rope_qk: ids: expected int32 or int64 token ids, got {ids.dtype}")
    if ids.shape not in ((N,), (B, N)):
        raise ValueError(f"rope_qk: ids has shape {tuple(ids.shape)}, expected ({B}, {N}) or ({N},)")
    if ids.device != q.device:
        raise ValueError(f"rope_qk: ids is on {ids.device}, expected the device of q ({q.device})")
    if (validate or q.device.type == "cpu") and ids.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or (bound is not None and hi >= bound):
            bad = lo if lo < 0 else hi
            want = f"0 <= id < {bound}" if bound is not None else "id >= 0"
            raise IndexError(f"rope_qk: ids holds {bad}, out of range for grid {tuple(grid)} (expected {want})")
    return n_axes, tpf, tpr


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor | None, grid: Grid, *, layout: str = "vjepa2",
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (B, heads, N, head_dim) by the grid positions of their tokens.

    :param ids: (B, N) or (N,) int32/int64 flat grid index of each token (the sorted mask
        positions), or None for ``arange(N)``.
    :param grid: ``(T, H, W)`` (T may be None: frames unbounded) or ``(H, W)``.
    :param layout: ``"vjepa2"`` (V-JEPA 2's frequency layout, its checkpoints' default) or
        ``"interleaved"`` (the corrected one); see the module docstring.
    :param validate: on CUDA, also check that every id is inside the grid (a host sync;
        on the CPU ids are always checked). An unchecked bad id only gives that token
        wrong angles; ids never address memory.
    :returns: ``(q_rot, k_rot)``, contiguous, in q's dtype.

    :Equivalent pytorch code: :func:`rope_qk_reference`; V-JEPA 2's
        ``RoPEAttention.forward`` (``separate_positions`` + three ``rotate_queries_or_keys``
        per tensor + ``cat``) for ``grid=(None, H, W)``, ``layout="vjepa2"``.
    """
    n_axes, tpf, tpr = _check(q, k, ids, grid, layout, validate)
    backend = select("rope", q.device, q.dtype)
    if backend == "reference":
        return rope_qk_reference(q, k, ids, grid, layout=layout)
    interleaved = layout == "interleaved"
    if backend == "triton":
        if direct(q, k):
            return _RopeDirect.apply(q, k, ids, n_axes, tpf, tpr, interleaved, False)
        return _rope_triton(q, k, ids, n_axes, tpf, tpr, interleaved, False)
    from . import cpp

    return cpp.rope_qk(q, k, ids, n_axes, tpf, tpr, interleaved)

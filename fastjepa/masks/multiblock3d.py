"""3-D multi-block masks for video (V-JEPA 2's mask generator): ``MaskCollator3D``.

A clip of ``num_frames`` frames, patched ``tubelet_size`` frames by ``patch_size`` pixels,
is a ``T × H × W`` grid of tokens with raster index ``(f·H + r)·W + c``. For each mask
configuration and each batch:

1. One block size ``(t, h, w)`` for the whole batch, from three uniform draws ``u_t, u_s,
   u_a`` in this order: ``t = max(1, int(T·scale_t))``, ``keep = int(H·W·scale_s)``,
   ``h = min(round(√(keep·ar)), H)``, ``w = min(round(√(keep/ar)), W)``, each scale or
   ratio ``low + u·(high − low)`` and ``round`` half to even.
2. Per clip, ``num_blocks`` blocks at offsets ``top ∈ [0, H − h]``, ``left ∈ [0, W − w]``,
   ``start ∈ [0, T − t]`` (inclusive, drawn in that order per block). Their union, plus
   every frame at or after ``max(1, int(T·max_temporal_keep))``, is the target; the rest
   is the context. A clip whose context comes out empty is drawn again.
3. Every context is cut to the batch's shortest context (and to ``max_keep``), every
   target to the shortest target. ``full_complement``: the target becomes everything
   outside the cut context; else ``pred_full_complement``: the context becomes
   everything outside the cut target. ``inv_block`` swaps the two on the way out.

Two modes:

* ``compat="fastjepa"`` (default): every draw of a batch from one generator seeded
  with ``(seed, stream, batch counter)``; ``backend="cpp"`` (default when the extension
  is built) samples the whole batch in C++ (``torch.ops.fastjepa.sample_masks3d``) from
  the same distribution as the Python loop (``backend="python"``).
* ``compat="reference"``: V-JEPA 2's draws call for call: the block size from a
  ``torch.Generator`` seeded with the batch counter (``torch.rand(1)`` three times),
  offsets from the global torch RNG (``torch.randint``), so with the same global seed the
  masks equal the original's index for index.

Either way the counter is shared across DataLoader workers and advanced by ``step()``
(also once per call), as in V-JEPA 2, so a resumed run that calls ``step()`` once per
batch done continues the sequence. A configuration whose context can never be
non-empty, or whose blocks can be empty, raises ``ValueError`` instead of looping.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Sequence

import torch
from torch.utils.data import default_collate

from ..rng import derive_seed

COMPAT_MODES = ("fastjepa", "reference")
BACKENDS = ("auto", "cpp", "python")
MAX_EMPTY_DRAWS = 1000  # consecutive empty contexts for one clip before giving up
_U_MAX = 1.0 - 2.0**-24  # the largest value torch.rand's float32 draw takes


def _pair(v, name: str, lo_ok, what: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={v!r}: expected two numbers (low, high)") from None
    if not (a <= b and lo_ok(a) and b <= (1.0 if what else math.inf)):
        raise ValueError(f"{name}={v!r}: expected {what or '0 < low <= high'}")
    return a, b


def block_size_3d(u_t: float, u_s: float, u_a: float, temporal_scale, spatial_scale, aspect_ratio,
                  T: int, H: int, W: int) -> tuple[int, int, int]:
    """Block ``(t, h, w)`` for the three uniform draws (step 1 of the module docstring)."""
    st = temporal_scale[0] + u_t * (temporal_scale[1] - temporal_scale[0])
    t = max(1, int(T * st))
    ss = spatial_scale[0] + u_s * (spatial_scale[1] - spatial_scale[0])
    keep = int(H * W * ss)
    ar = aspect_ratio[0] + u_a * (aspect_ratio[1] - aspect_ratio[0])
    h = min(int(round(math.sqrt(keep * ar))), H)
    w = min(int(round(math.sqrt(keep / ar))), W)
    return t, h, w


def _as_pair_int(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    try:
        a, b = (int(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={v!r}: expected a positive int or (height, width)") from None
    if a <= 0 or b <= 0:
        raise ValueError(f"{name}={v!r}: expected positive sizes")
    return a, b


def _complement(idx: torch.Tensor, N: int) -> torch.Tensor:
    keep = torch.ones(N, dtype=torch.bool)
    keep[idx] = False
    return torch.nonzero(keep).flatten()  # sorted, int64


def _pick_backend(backend: str | None, compat: str) -> str:
    from ..ops import available

    backend = "auto" if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "cpp" if compat == "fastjepa" and available()["cpp"] else "python"
    if backend == "cpp":
        if compat != "fastjepa":
            raise ValueError("backend='cpp' samples the fastjepa mode only; compat='reference' needs backend='python'")
        if not available()["cpp"]:
            raise ValueError(f"backend='cpp': {available()['cpp'].reason}")
    return backend


class MaskGenerator3D:
    """One mask configuration on one clip length: ``gen(B) -> (masks_enc, masks_pred)``,
    (B, Kc) and (B, Kt) int64, sorted raster indices (swapped when ``inv_block``)."""

    def __init__(
        self,
        crop_size: int | Sequence[int] = (224, 224),
        num_frames: int = 16,
        spatial_patch_size: int | Sequence[int] = (16, 16),
        temporal_patch_size: int = 2,
        spatial_pred_mask_scale: Sequence[float] = (0.2, 0.8),
        temporal_pred_mask_scale: Sequence[float] = (1.0, 1.0),
        aspect_ratio: Sequence[float] = (0.3, 3.0),
        npred: int = 1,
        max_context_frames_ratio: float = 1.0,
        max_keep: int | None = None,
        inv_block: bool = False,
        full_complement: bool = False,
        pred_full_complement: bool = False,
        *,
        compat: str = "fastjepa",
        seed: int = 0,
        stream: int = 0,
        backend: str | None = None,
    ):
        crop = _as_pair_int(crop_size, "crop_size")
        patch = _as_pair_int(spatial_patch_size, "patch_size")
        if not isinstance(num_frames, int) or num_frames <= 0:
            raise ValueError(f"num_frames={num_frames!r}: expected a positive int")
        if not isinstance(temporal_patch_size, int) or temporal_patch_size <= 0:
            raise ValueError(f"tubelet_size={temporal_patch_size!r}: expected a positive int")
        self.height, self.width = crop[0] // patch[0], crop[1] // patch[1]
        self.duration = num_frames // temporal_patch_size
        if self.height < 1 or self.width < 1 or self.duration < 1:
            raise ValueError(
                f"crop_size={crop_size!r}, patch_size={spatial_patch_size!r}, num_frames={num_frames}, "
                f"tubelet_size={temporal_patch_size} give a {self.duration}x{self.height}x{self.width} token grid; "
                "expected at least one token along each axis"
            )
        self.spatial_pred_mask_scale = _pair(spatial_pred_mask_scale, "spatial_scale", lambda a: a > 0, "0 < low <= high <= 1")
        self.temporal_pred_mask_scale = _pair(temporal_pred_mask_scale, "temporal_scale", lambda a: a >= 0, "0 <= low <= high <= 1")
        self.aspect_ratio = _pair(aspect_ratio, "aspect_ratio", lambda a: a > 0, "")
        if isinstance(npred, bool) or not isinstance(npred, int) or npred < 1:
            raise ValueError(f"num_blocks={npred!r}: expected an int >= 1")
        r = float(max_context_frames_ratio)
        if not 0 < r <= 1:
            raise ValueError(f"max_temporal_keep={max_context_frames_ratio!r}: expected 0 < value <= 1")
        if max_keep is not None and (isinstance(max_keep, bool) or not isinstance(max_keep, int) or max_keep < 1):
            raise ValueError(f"max_keep={max_keep!r}: expected None or an int >= 1")
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat={compat!r}: expected one of {', '.join(COMPAT_MODES)}")
        self.npred, self.max_keep = npred, max_keep
        self.max_context_duration = max(1, int(self.duration * r))
        self.inv_block, self.full_complement, self.pred_full_complement = bool(inv_block), bool(full_complement), bool(pred_full_complement)
        self.compat, self.seed, self.stream = compat, int(seed), int(stream)
        self.backend = _pick_backend(backend, compat)
        self._itr_counter = multiprocessing.Value("i", -1)  # shared with DataLoader workers
        self._check_feasible()

    # -- configuration checks

    def _size(self, u_t: float, u_s: float, u_a: float) -> tuple[int, int, int]:
        return block_size_3d(u_t, u_s, u_a, self.temporal_pred_mask_scale, self.spatial_pred_mask_scale,
                             self.aspect_ratio, self.duration, self.height, self.width)

    def _describe(self) -> str:
        return (f"spatial_scale={self.spatial_pred_mask_scale}, temporal_scale={self.temporal_pred_mask_scale}, "
                f"aspect_ratio={self.aspect_ratio} on a {self.duration}x{self.height}x{self.width} token grid")

    def _check_feasible(self) -> None:
        """Raise if a drawable block is empty or covers the whole grid.

        ``h`` grows with ``u_s`` and ``u_a``, ``w`` with ``u_s`` and shrinks with ``u_a``,
        ``t`` grows with ``u_t``: the smallest blocks sit at the ends of the draws. A block
        of the whole grid (``t, h, w = T, H, W``) leaves every context empty, so the retry
        would never end; its possibility is checked on a dense grid of ``u_a`` at the
        largest ``u_t, u_s`` (and again on every batch's drawn size).
        """
        _, h0, _ = self._size(0.0, 0.0, 0.0)
        _, _, w0 = self._size(0.0, 0.0, _U_MAX)
        if h0 < 1 or w0 < 1:
            raise ValueError(f"mask settings can give empty blocks ({'height' if h0 < 1 else 'width'} 0): "
                             f"{self._describe()}; raise spatial_scale")
        for i in range(4097):
            if self._size(_U_MAX, _U_MAX, min(i / 4096, _U_MAX)) == (self.duration, self.height, self.width):
                raise ValueError(self._full_message())

    def _full_message(self) -> str:
        return (f"mask settings can draw a block covering the whole {self.duration}x{self.height}x{self.width} "
                f"grid, which leaves no context: {self._describe()}; lower spatial_scale or temporal_scale")

    # -- counter (V-JEPA 2's: shared across workers, one step per batch)

    def step(self) -> int:
        with self._itr_counter.get_lock():
            self._itr_counter.value += 1
            return self._itr_counter.value

    def batch_seed(self, counter: int) -> int:
        return derive_seed(self.seed, self.stream, counter)

    # -- sampling

    def __call__(self, batch_size: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
        counter = self.step()
        if self.compat == "reference":
            return self._sample_reference(batch_size, counter)
        seed = self.batch_seed(counter)
        if self.backend == "cpp":
            return self.sample_cpp(batch_size, seed)
        g = torch.Generator()
        g.manual_seed(seed)
        return self.sample(batch_size, g)

    def sample(self, B: int, generator: torch.Generator):
        """fastjepa mode for ``B`` clips, every draw from ``generator``."""
        u_t, u_s, u_a = torch.rand(3, generator=generator).tolist()
        size = self._size(u_t, u_s, u_a)

        def offsets(t, h, w):
            return tuple(torch.randint(0, n, (1,), generator=generator).item()
                         for n in (self.height - h + 1, self.width - w + 1, self.duration - t + 1))

        return self._sample(B, size, offsets)

    def _sample_reference(self, B: int, counter: int):
        g = torch.Generator()
        g.manual_seed(counter)
        u = [torch.rand(1, generator=g).item() for _ in range(3)]  # temporal, spatial, aspect
        size = self._size(*u)

        def offsets(t, h, w):  # global RNG, as V-JEPA 2
            top = torch.randint(0, self.height - h + 1, (1,))
            left = torch.randint(0, self.width - w + 1, (1,))
            start = torch.randint(0, self.duration - t + 1, (1,))
            return int(top), int(left), int(start)

        return self._sample(B, size, offsets)

    def sample_cpp(self, B: int, seed: int, block_size: Sequence[int] | None = None):
        """fastjepa mode in C++ (same distribution as :meth:`sample`); ``block_size``
        ``(t, h, w)`` fixes the batch's block size instead of drawing it."""
        from ..ops import cpp  # noqa: F401 — loads fastjepa._C and registers the op's fake

        enc, pred = torch.ops.fastjepa.sample_masks3d(
            B, self.duration, self.height, self.width, list(self.temporal_pred_mask_scale),
            list(self.spatial_pred_mask_scale), list(self.aspect_ratio), self.npred, self.max_context_duration,
            self.max_keep, self.full_complement, self.pred_full_complement, seed,
            None if block_size is None else [int(v) for v in block_size],
        )  # (B, Kc), (B, Kt)
        return (pred, enc) if self.inv_block else (enc, pred)

    def _sample(self, B: int, size: tuple[int, int, int], offsets):
        T, H, W = self.duration, self.height, self.width
        t, h, w = size
        if size == (T, H, W):
            raise ValueError(self._full_message())
        N = T * H * W
        encs, preds = [], []
        for _ in range(B):
            for _ in range(MAX_EMPTY_DRAWS):
                keep = torch.ones((T, H, W), dtype=torch.bool)  # context
                for _ in range(self.npred):
                    top, left, start = offsets(t, h, w)
                    keep[start : start + t, top : top + h, left : left + w] = False
                keep[self.max_context_duration :] = False  # the context spans the first frames only
                keep = keep.flatten()
                enc = torch.nonzero(keep).flatten()  # sorted raster indices
                if len(enc) > 0:
                    break
            else:
                raise ValueError(
                    f"the context came out empty {MAX_EMPTY_DRAWS} times in a row for one clip with "
                    f"num_blocks={self.npred} blocks of {t}x{h}x{w}: {self._describe()}; "
                    "lower num_blocks, spatial_scale or temporal_scale"
                )
            encs.append(enc)
            preds.append(torch.nonzero(~keep).flatten())
        kc = min(len(e) for e in encs)
        kp = min(len(p) for p in preds)
        if self.max_keep is not None:
            kc = min(kc, self.max_keep)
        encs = [e[:kc] for e in encs]
        preds = [p[:kp] for p in preds]
        if self.full_complement:  # the target is everything outside the (cut) context
            preds = [_complement(e, N) for e in encs]
        elif self.pred_full_complement:
            encs = [_complement(p, N) for p in preds]
        enc, pred = default_collate(encs), default_collate(preds)  # (B, Kc), (B, Kt)
        return (pred, enc) if self.inv_block else (enc, pred)


class MaskCollator3D:
    """V-JEPA 2's collator: ``MaskCollator3D(cfgs_mask, dataset_fpcs, crop_size, patch_size,
    tubelet_size)``, each ``cfgs_mask`` entry a dict with ``spatial_scale``,
    ``temporal_scale``, ``aspect_ratio``, ``num_blocks`` and optional ``max_temporal_keep``
    (1.0), ``max_keep`` (None), ``full_complement``, ``pred_full_complement``, ``inv_block``.

    ``collator(batch)`` takes samples ``(buffer, label, clip_indices)`` whose clip length
    is ``len(clip_indices[-1])``, groups them by clip length (in ``dataset_fpcs`` order)
    and returns, per clip length present, ``(default_collate(samples), masks_enc,
    masks_pred)``: lists with one (B, Kc) / (B, Kt) int64 tensor per mask configuration.
    """

    def __init__(
        self,
        cfgs_mask: Sequence[dict],
        dataset_fpcs: Sequence[int],
        crop_size: int | Sequence[int] = (224, 224),
        patch_size: int | Sequence[int] = (16, 16),
        tubelet_size: int = 2,
        *,
        compat: str = "fastjepa",
        seed: int = 0,
        backend: str | None = None,
    ):
        if not cfgs_mask:
            raise ValueError(f"cfgs_mask={cfgs_mask!r}: expected at least one mask configuration")
        self.mask_generators: dict[int, list[MaskGenerator3D]] = {}
        for fpc in dataset_fpcs:
            self.mask_generators[fpc] = [
                MaskGenerator3D(
                    crop_size=crop_size,
                    num_frames=fpc,
                    spatial_patch_size=patch_size,
                    temporal_patch_size=tubelet_size,
                    spatial_pred_mask_scale=m.get("spatial_scale"),
                    temporal_pred_mask_scale=m.get("temporal_scale"),
                    aspect_ratio=m.get("aspect_ratio"),
                    npred=m.get("num_blocks"),
                    max_context_frames_ratio=m.get("max_temporal_keep", 1.0),
                    max_keep=m.get("max_keep", None),
                    full_complement=m.get("full_complement", False),
                    pred_full_complement=m.get("pred_full_complement", False),
                    inv_block=m.get("inv_block", False),
                    compat=compat,
                    seed=seed,
                    stream=derive_seed(fpc, i),
                    backend=backend,
                )
                for i, m in enumerate(cfgs_mask)
            ]
        if not self.mask_generators:
            raise ValueError(f"dataset_fpcs={dataset_fpcs!r}: expected at least one clip length")

    def step(self) -> None:
        for gens in self.mask_generators.values():
            for gen in gens:
                gen.step()

    def __call__(self, batch):
        groups = {fpc: [] for fpc in self.mask_generators}
        for sample in batch:
            fpc = len(sample[-1][-1])
            if fpc not in groups:
                raise ValueError(f"a sample of {fpc} frames: expected one of dataset_fpcs={list(groups)}")
            groups[fpc].append(sample)
        out = []
        for fpc, samples in groups.items():
            if not samples:
                continue
            masks_enc, masks_pred = [], []
            for gen in self.mask_generators[fpc]:
                enc, pred = gen(len(samples))
                masks_enc.append(enc)
                masks_pred.append(pred)
            out.append((default_collate(samples), masks_enc, masks_pred))
        return out

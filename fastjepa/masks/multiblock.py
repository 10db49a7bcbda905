"""Multi-block masking (docs/design.md §4): ``MaskCollator``.

Two modes:

* ``compat="fastjepa"`` (default): corners drawn from the full range
  ``top ∈ [0, H − h]``, every draw from a seeded generator (per batch, derived from
  ``(seed, epoch, global batch index)``), and a configuration that can never produce a
  valid mask raises ``ValueError`` at construction instead of looping. The masks do not
  depend on the number of loader workers, a resumed run sees the same masks, and under
  ``torchrun`` (``world_size > 1``) every rank samples the masks of the *global* batch
  and keeps its own rows (``rank::world_size``, matching how the sampler deals images
  out), so a run on N processes computes what one process would on the global batch.
* ``compat="reference"``: the public reference sampler call for call — the shared
  counter seeds the block-size generator, corners come from the global torch RNG with
  an exclusive upper bound.

``backend="cpp"`` samples a whole batch in the C++ extension (default when built);
``backend="python"`` is the loop below. Both draw from the same distribution.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Sequence

import torch
from torch.utils.data import default_collate, get_worker_info

from ..rng import MAX_SEED, derive_seed

COMPAT_MODES = ("fastjepa", "reference")


def _pair(v, name: str) -> tuple[float, float]:
    try:
        a, b = (float(t) for t in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={v!r}: expected two numbers (low, high)") from None
    if not a <= b:
        raise ValueError(f"{name}={v!r}: expected low <= high")
    return a, b


def block_size(u: float, scale: tuple[float, float], aspect: tuple[float, float], H: int, W: int) -> tuple[int, int]:
    """Block (h, w) for one uniform draw ``u`` used for both scale and aspect (docs/design.md §4)."""
    s = scale[0] + u * (scale[1] - scale[0])
    max_keep = int(H * W * s)
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(max_keep * ar)))
    w = int(round(math.sqrt(max_keep / ar)))
    while h >= H:
        h -= 1
    while w >= W:
        w -= 1
    return h, w


def sample_reference_cpp(
    B: int,
    H: int,
    W: int,
    pred_size: tuple[int, int],
    enc_size: tuple[int, int],
    nenc: int,
    npred: int,
    min_keep: int,
    allow_overlap: bool,
    seed: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The reference procedure's masks for given block sizes, sampled in the C++ extension.

    Same distribution as ``compat="reference"`` for the same block sizes: corners uniform
    on the reference's exclusive range ``top ∈ [0, H − h)``, ``left ∈ [0, W − w)``; the
    same relaxation of the target constraints and truncation to the batch's shortest
    mask. The corners come from the extension's own generator seeded with ``seed`` (not
    the global torch RNG), so the masks are not the reference's index for index.

    :returns: ``masks_enc`` (nenc × (B, Kc)), ``masks_pred`` (npred × (B, Kt)), int64.
    """
    from ..ops import cpp  # noqa: F401 — loads fastjepa._C and registers the op's fake

    enc, pred = torch.ops.fastjepa.sample_masks_sized(
        B, H, W, [int(v) for v in pred_size], [int(v) for v in enc_size], nenc, npred, min_keep,
        bool(allow_overlap), True, int(seed) & MAX_SEED,
    )  # (nenc, B, Kc), (npred, B, Kt)
    return list(enc.unbind(0)), list(pred.unbind(0))


class MaskCollator:
    """Collate a batch and sample its context (``masks_enc``) and target (``masks_pred``) masks.

    Returns ``(default_collate(batch), masks_enc, masks_pred)``: lists of ``nenc`` (B, Kc)
    and ``npred`` (B, Kt) int64 index tensors, context and targets disjoint unless
    ``allow_overlap``.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = (224, 224),
        patch_size: int = 16,
        enc_mask_scale: Sequence[float] = (0.2, 0.8),
        pred_mask_scale: Sequence[float] = (0.2, 0.8),
        aspect_ratio: Sequence[float] = (0.3, 3.0),
        nenc: int = 1,
        npred: int = 2,
        min_keep: int = 4,
        allow_overlap: bool = False,
        *,
        compat: str = "fastjepa",
        generator: torch.Generator | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        backend: str | None = None,
    ):
        if not isinstance(input_size, (list, tuple)):
            input_size = (input_size, input_size)
        if len(input_size) != 2 or any(int(s) <= 0 for s in input_size):
            raise ValueError(f"input_size={input_size!r}: expected a positive int or (height, width)")
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size={patch_size!r}: expected a positive int")
        self.patch_size = patch_size
        self.height, self.width = int(input_size[0]) // patch_size, int(input_size[1]) // patch_size
        if self.height < 2 or self.width < 2:
            raise ValueError(f"input_size={tuple(input_size)} with patch_size={patch_size} gives a {self.height}x{self.width} grid; expected at least 2x2")
        self.enc_mask_scale = _pair(enc_mask_scale, "enc_mask_scale")
        self.pred_mask_scale = _pair(pred_mask_scale, "pred_mask_scale")
        self.aspect_ratio = _pair(aspect_ratio, "aspect_ratio")
        for name, (lo, hi) in (("enc_mask_scale", self.enc_mask_scale), ("pred_mask_scale", self.pred_mask_scale)):
            if lo <= 0 or hi > 1:
                raise ValueError(f"{name}=({lo}, {hi}): expected 0 < low <= high <= 1")
        if self.aspect_ratio[0] <= 0:
            raise ValueError(f"aspect_ratio={self.aspect_ratio}: expected positive ratios")
        for name, v in (("nenc", nenc), ("npred", npred)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an int >= 1")
        if not isinstance(min_keep, int) or min_keep < 0:
            raise ValueError(f"min_keep={min_keep!r}: expected an int >= 0")
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat={compat!r}: expected one of {', '.join(COMPAT_MODES)}")
        self.nenc, self.npred, self.min_keep, self.allow_overlap = nenc, npred, min_keep, bool(allow_overlap)
        self.compat = compat
        self.generator = generator
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
        self.epoch, self.start_batch = 0, 0
        self._calls = 0  # calls in this process since set_epoch
        self._itr_counter = multiprocessing.Value("i", -1)  # the reference's shared counter
        self.backend = self._pick_backend(backend)
        self._check_feasible()

    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> MaskCollator:
        """The collator a training config describes (``mask.*``, ``data.crop_size``,
        ``meta.seed``); keyword ``overrides`` replace any constructor argument."""
        data, mask = cfg["data"], cfg["mask"]
        kwargs = dict(
            input_size=data["crop_size"],
            patch_size=mask["patch_size"],
            enc_mask_scale=mask["enc_mask_scale"],
            pred_mask_scale=mask["pred_mask_scale"],
            aspect_ratio=mask["aspect_ratio"],
            nenc=mask["num_enc_masks"],
            npred=mask["num_pred_masks"],
            min_keep=mask["min_keep"],
            allow_overlap=mask["allow_overlap"],
            compat=mask["compat"],
            seed=cfg["meta"]["seed"],
            backend=None if mask["backend"] == "auto" else mask["backend"],
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- configuration checks

    def _pick_backend(self, backend: str | None) -> str:
        from ..ops import available

        if backend is None:
            return "cpp" if self.compat == "fastjepa" and self.generator is None and available()["cpp"] else "python"
        if backend not in ("cpp", "python"):
            raise ValueError(f"backend={backend!r}: expected 'cpp' or 'python'")
        if backend == "cpp":
            if self.compat != "fastjepa":
                raise ValueError("backend='cpp' samples the default mode only; compat='reference' needs backend='python'")
            if self.generator is not None:
                raise ValueError("backend='cpp' seeds its own generator; pass seed=..., not generator=...")
            if not available()["cpp"]:
                raise ValueError(f"backend='cpp': {available()['cpp'].reason}")
        return backend

    def _check_feasible(self) -> None:
        """Raise if some block size the sampler can draw never exceeds ``min_keep``.

        Targets are plain rectangles, and a context falls back to a plain rectangle once
        every target constraint is relaxed, so the sampler terminates iff every drawable
        block has more than ``min_keep`` cells. Sizes are piecewise constant in the draw
        ``u``; a dense grid of ``u`` plus both ends finds the smallest.
        """
        H, W = self.height, self.width
        for kind, scale, aspect in (
            ("pred_mask_scale", self.pred_mask_scale, self.aspect_ratio),
            ("enc_mask_scale", self.enc_mask_scale, (1.0, 1.0)),
        ):
            sizes = {block_size(i / 4096, scale, aspect, H, W) for i in range(4097)}
            h, w = min(sizes, key=lambda s: s[0] * s[1])
            if h * w <= self.min_keep or h < 1 or w < 1:
                raise ValueError(
                    f"mask settings can never produce a valid mask: {kind}={scale} on a {H}x{W} patch grid "
                    f"gives blocks as small as {h}x{w} = {max(h, 0) * max(w, 0)} patches, but min_keep={self.min_keep} "
                    f"requires more than {self.min_keep}. Raise {kind}, lower mask.min_keep or use larger images."
                )

    # -- reproducibility

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Masks of batch ``start_batch + k`` of ``epoch`` are a function of (seed, epoch, batch)."""
        self.epoch, self.start_batch, self._calls = int(epoch), int(start_batch), 0

    def set_reference_counter(self, batches_done: int) -> None:
        """``compat="reference"``: continue the reference's batch counter after ``batches_done``
        collated batches (on resume; the reference's own resume restarts it at 0)."""
        with self._itr_counter.get_lock():
            self._itr_counter.value = int(batches_done) - 1

    def _batch_index(self) -> int:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        idx = self.start_batch + wid + self._calls * nw  # DataLoader hands batches to workers round-robin
        self._calls += 1
        return idx

    def batch_seed(self, batch_index: int) -> int:
        return derive_seed(self.seed, self.epoch, batch_index)

    # -- sampling

    def __call__(self, batch):
        collated = default_collate(batch)
        B = len(batch)
        if self.compat == "reference":
            masks_enc, masks_pred = self._sample_reference(B)
        elif self.generator is not None:
            masks_enc, masks_pred = self.sample(B, self.generator)
        else:
            seed = self.batch_seed(self._batch_index())
            G = B * self.world_size  # the global batch
            if self.backend == "cpp":
                masks_enc, masks_pred = self._sample_cpp(G, seed)
            else:
                g = torch.Generator()
                g.manual_seed(seed)
                masks_enc, masks_pred = self.sample(G, g)
            if self.world_size > 1:
                rows = slice(self.rank, None, self.world_size)
                masks_enc = [m[rows].contiguous() for m in masks_enc]
                masks_pred = [m[rows].contiguous() for m in masks_pred]
        return collated, masks_enc, masks_pred

    def _sample_cpp(self, B: int, seed: int):
        from ..ops import cpp  # noqa: F401 — loads fastjepa._C and registers the op's fake

        enc, pred = torch.ops.fastjepa.sample_masks(
            B, self.height, self.width, list(self.enc_mask_scale), list(self.pred_mask_scale),
            list(self.aspect_ratio), self.nenc, self.npred, self.min_keep, self.allow_overlap, seed,
        )  # (nenc, B, Kc), (npred, B, Kt)
        return list(enc.unbind(0)), list(pred.unbind(0))

    def sample(self, B: int, generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Default mode for ``B`` images, every draw from ``generator``."""
        H, W = self.height, self.width
        u = torch.rand(2, generator=generator).tolist()
        p_size = block_size(u[0], self.pred_mask_scale, self.aspect_ratio, H, W)
        e_size = block_size(u[1], self.enc_mask_scale, (1.0, 1.0), H, W)

        def corner(h, w):
            top, left = (torch.randint(0, n, (1,), generator=generator).item() for n in (H - h + 1, W - w + 1))
            return top, left

        return self._sample(B, p_size, e_size, corner)

    def _sample_reference(self, B: int):
        with self._itr_counter.get_lock():
            self._itr_counter.value += 1
            seed = self._itr_counter.value
        g = torch.Generator()
        g.manual_seed(seed)
        H, W = self.height, self.width
        p_size = block_size(torch.rand(1, generator=g).item(), self.pred_mask_scale, self.aspect_ratio, H, W)
        e_size = block_size(torch.rand(1, generator=g).item(), self.enc_mask_scale, (1.0, 1.0), H, W)

        def corner(h, w):
            top = torch.randint(0, H - h, (1,))  # global RNG, exclusive upper bound
            left = torch.randint(0, W - w, (1,))
            return int(top), int(left)

        return self._sample(B, p_size, e_size, corner)

    def _block(self, h: int, w: int, corner, regions: list[torch.Tensor] | None):
        H, W = self.height, self.width
        tries, left_before_relax = 0, 20
        while True:
            top, left = corner(h, w)
            m = torch.zeros((H, W), dtype=torch.int32)
            m[top : top + h, left : left + w] = 1
            if regions:
                for k in range(max(len(regions) - tries, 0)):
                    m *= regions[k]
            idx = torch.nonzero(m.flatten()).squeeze(1)  # sorted raster indices (K,)
            if len(idx) > self.min_keep:
                break
            left_before_relax -= 1
            if left_before_relax == 0:
                tries += 1
                left_before_relax = 20
        complement = torch.ones((H, W), dtype=torch.int32)
        complement[top : top + h, left : left + w] = 0
        return idx, complement

    def _sample(self, B: int, p_size, e_size, corner):
        if p_size[0] * p_size[1] <= self.min_keep or e_size[0] * e_size[1] <= self.min_keep:
            raise ValueError(f"mask block sizes {p_size} / {e_size} cannot exceed min_keep={self.min_keep}")
        all_pred, all_enc = [], []
        kp, ke = self.height * self.width, self.height * self.width
        for _ in range(B):
            preds, comps = [], []
            for _ in range(self.npred):
                idx, comp = self._block(*p_size, corner, None)
                preds.append(idx)
                comps.append(comp)
                kp = min(kp, len(idx))
            regions = None if self.allow_overlap else comps
            encs = []
            for _ in range(self.nenc):
                idx, _ = self._block(*e_size, corner, regions)
                encs.append(idx)
                ke = min(ke, len(idx))
            all_pred.append(preds)
            all_enc.append(encs)
        masks_pred = [torch.stack([all_pred[b][j][:kp] for b in range(B)]).long() for j in range(self.npred)]  # (B, Kt)
        masks_enc = [torch.stack([all_enc[b][i][:ke] for b in range(B)]).long() for i in range(self.nenc)]  # (B, Kc)
        return masks_enc, masks_pred

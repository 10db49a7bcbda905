"""V-JEPA 2's 3-D mask generator through the C++ sampler (``torch.ops.fastjepa.sample_masks3d``).

V-JEPA 2's ``src.masks.multiseq_multiblock3d.MaskCollator`` groups a batch by clip length
and asks one ``_MaskGenerator`` per mask configuration for ``(masks_enc, masks_pred)``.
The patch replaces ``_MaskGenerator.__call__`` in place (so collators built before and
after take it, and the ``from … import MaskCollator`` copies in ``app`` modules are the same
class): the constructor, ``step()``, the collator's grouping and its output structure stay
V-JEPA 2's own. Per batch the replacement

* advances the generator's shared counter and draws the block size with the generator's
  own ``_sample_block_size`` from a ``torch.Generator`` seeded with it — the original's
  sizes, batch for batch;
* draws one seed from the global torch RNG (where the original draws every block offset)
  and samples the whole batch in C++: block offsets, the empty-context retry, the cut to
  the shortest masks and ``max_keep``, ``full_complement`` / ``pred_full_complement``,
  from the same distribution as the original but not the same stream;
* swaps the pair for ``inv_block``.

A configuration the original would loop on forever (a block covering the whole grid)
raises ``ValueError`` instead. Without the C++ extension, or for a generator whose
attributes are not V-JEPA 2's, the original runs.
"""

from __future__ import annotations

import functools
import types

import torch

MODULE = "src.masks.multiseq_multiblock3d"
_ATTRS = ("duration", "height", "width", "npred", "max_context_duration", "max_keep", "full_complement",
          "pred_full_complement", "inv_block", "spatial_pred_mask_scale", "temporal_pred_mask_scale", "aspect_ratio")
_SEED_MAX = 2**62


def check_masks_module(m: types.ModuleType) -> str | None:
    """None when ``m`` looks like V-JEPA 2's mask module, else what was expected and found."""
    gen = getattr(m, "_MaskGenerator", None)
    if not isinstance(gen, type):
        return "expected a class _MaskGenerator (V-JEPA 2's 3-D mask generator), found none"
    missing = [a for a in ("__call__", "step", "_sample_block_size") if not callable(getattr(gen, a, None))]
    if missing:
        return f"expected _MaskGenerator with __call__, step and _sample_block_size, missing {', '.join(missing)}"
    if not isinstance(getattr(m, "MaskCollator", None), type):
        return "expected a class MaskCollator beside _MaskGenerator, found none"
    return None


def _sample(self, batch_size: int):
    seed = self.step()
    g = torch.Generator()
    g.manual_seed(seed)
    t, h, w = self._sample_block_size(
        generator=g,
        temporal_scale=self.temporal_pred_mask_scale,
        spatial_scale=self.spatial_pred_mask_scale,
        aspect_ratio_scale=self.aspect_ratio,
    )
    cpp_seed = int(torch.randint(0, _SEED_MAX, (1,)).item())  # the global RNG, as the original's offsets
    enc, pred = torch.ops.fastjepa.sample_masks3d(
        int(batch_size), self.duration, self.height, self.width, [float(v) for v in self.temporal_pred_mask_scale],
        [float(v) for v in self.spatial_pred_mask_scale], [float(v) for v in self.aspect_ratio], int(self.npred),
        int(self.max_context_duration), None if self.max_keep is None else int(self.max_keep),
        bool(self.full_complement), bool(self.pred_full_complement), cpp_seed, [int(t), int(h), int(w)],
    )  # (B, Kc), (B, Kt) int64
    return (pred, enc) if self.inv_block else (enc, pred)


def _make_call(original):
    @functools.wraps(original)
    def __call__(self, batch_size):
        if not _cpp_ready() or any(not hasattr(self, a) for a in _ATTRS):
            return original(self, batch_size)
        return _sample(self, batch_size)

    __call__.__fastjepa_original__ = original
    return __call__


@functools.cache
def _cpp_ready() -> bool:
    from ..ops import available

    if not available()["cpp"]:
        return False
    from ..ops import cpp  # loads the library and the op's fake

    return cpp.has_op("sample_masks3d")


def masks_patches(modules: dict[str, types.ModuleType]) -> list[tuple[object, str, object]]:
    """``(owner, attr_name, new_object)`` patches for V-JEPA 2's mask generator in ``modules``
    (``{name: module}``): ``_MaskGenerator.__call__`` -> the C++ sampler. Empty when the mask
    module is not imported; ``ValueError`` naming what was found when it is not V-JEPA 2's."""
    m = modules.get(MODULE)
    if m is None:
        return []
    problem = check_masks_module(m)
    if problem:
        raise ValueError(f"{MODULE}: {problem}")
    cls = m._MaskGenerator
    original = cls.__dict__.get("__call__", cls.__call__)
    return [(cls, "__call__", _make_call(original))]

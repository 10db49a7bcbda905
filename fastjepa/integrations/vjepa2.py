"""fastjepa for V-JEPA 2 (facebookresearch/vjepa2, imported as ``src``).

::

    import fastjepa.integrations.vjepa2
    fastjepa.integrations.vjepa2.apply()     # after importing src.models / app.vjepa.train

Each flag swaps one piece (``False`` leaves it as it is):

* ``apply_masks``: ``src.masks.utils.apply_masks`` and every module's ``from … import``
  copy (``src.models.vision_transformer``, ``src.models.predictor``, ``app.vjepa.train``,
  …) -> :func:`fastjepa.ops.apply_masks`, both call forms (``concat=True``: one
  (M·B, K, D) tensor; ``concat=False``: the list of per-mask gathers, lengths may differ).
* ``repeat_interleave_batch``: ``src.utils.tensors.repeat_interleave_batch`` (and its
  copies) -> one ``torch.repeat_interleave`` copy.
* ``encoder``: ``VisionTransformer.forward``: with a sin-cos pos-embed (``use_rope=False``)
  the pos-embed add and the context gather in one pass (:func:`fastjepa.ops.gather_tokens`
  with ``pos_embed``); with RoPE the fused gather alone.

* ``rope``: ``RoPEAttention.forward`` -> q and k rotated by one fused call
  (:func:`fastjepa.ops.rope_qk`, V-JEPA 2's frequency layout including its duplicated
  frequencies), and ``rotate_queries_or_keys`` -> one expression on a cached table
  (:mod:`fastjepa.integrations._vjepa2_rope`).
* ``predictor``: ``VisionTransformerPredictor.forward`` -> the sorted predictor input in
  one pass and the un-sort + take of the targets as one gather
  (:func:`fastjepa.ops.sorted_predictor_tokens`, :mod:`._vjepa2_predictor`).
* ``masks``: ``src.masks.multiseq_multiblock3d._MaskGenerator.__call__`` -> the C++ 3-D
  multi-block sampler, block sizes from the original's own counter-seeded draw, offsets
  with the same distribution (:mod:`._vjepa2_masks`).

Every replacement falls back to the original for a call it does not cover.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from . import _common as common
from ._patching import CodebaseMismatch, PatchSet, class_patch, function_patches, package_modules, parameters, replaces

API = "fastjepa.integrations.vjepa2.apply()"
CODEBASE = "V-JEPA 2 (facebookresearch/vjepa2)"
_STATE = PatchSet("vjepa2")


def _check_masks_utils(m):
    if not callable(getattr(m, "apply_masks", None)):
        return "expected a function apply_masks(x, masks, concat=True), found none"
    got = parameters(m.apply_masks)
    if got != ["x", "masks", "concat"]:
        return f"expected apply_masks(x, masks, concat=True), found apply_masks({', '.join(got)})"
    return None


def _check_tensors(m):
    if not callable(getattr(m, "repeat_interleave_batch", None)):
        return "expected a function repeat_interleave_batch(x, B, repeat), found none"
    return None


def _check_vit(m):
    problem = common.has_attrs(m, "VisionTransformer")
    if problem:
        return problem
    if hasattr(m, "VisionTransformerPredictor"):
        return "found VisionTransformerPredictor beside the encoder (I-JEPA's layout; V-JEPA 2 has it in src.models.predictor)"
    got = parameters(vars(m.VisionTransformer).get("__init__", m.VisionTransformer))
    missing = [p for p in ("num_frames", "tubelet_size", "use_rope") if p not in got]
    if missing:
        return f"expected VisionTransformer(..., num_frames, tubelet_size, use_rope, ...), missing {', '.join(missing)}"
    return None


def _check_predictor(m):
    return common.has_attrs(m, "VisionTransformerPredictor")


def _check_modules(m):
    rope = getattr(m, "RoPEAttention", None)
    if isinstance(rope, type) and not callable(getattr(rope, "separate_positions", None)):
        return "expected V-JEPA 2's RoPEAttention (with separate_positions), found one without"
    return None


def _check_masks3d(m):
    from ._vjepa2_masks import check_masks_module

    return check_masks_module(m)


CHECKS = {
    "src.masks.utils": _check_masks_utils,
    "src.masks.multiseq_multiblock3d": _check_masks3d,
    "src.models.utils.modules": _check_modules,
    "src.utils.tensors": _check_tensors,
    "src.models.vision_transformer": _check_vit,
    "src.models.predictor": _check_predictor,
}
HINT = "Import the V-JEPA 2 modules first (e.g. `import src.models.vision_transformer`), then call apply()."


# -- providers: one per flag --------------------------------------------------------------


def _apply_masks(mods):
    if "src.masks.utils" not in mods:
        return []
    from ..ops import apply_masks as fused

    original = mods["src.masks.utils"].apply_masks

    @replaces(original)
    def apply_masks(x, masks, concat=True):
        if common.gather_applies(x, masks, same_length=bool(concat)) is None:
            return original(x, masks, concat)
        return fused(x, masks, concat=concat)

    return function_patches(original, apply_masks)


def _encoder(mods):
    if "src.models.vision_transformer" not in mods:
        return []
    from ..ops import gather_tokens

    def make(original):
        @replaces(original)
        def forward(self, x, masks=None):
            if masks is not None and not isinstance(masks, list):
                masks = [masks]
            if masks is not None and common.masks_applies(masks, x.size(0)) is None:
                return original(self, x, masks)
            # token grid, as the original reads it off the input
            if x.ndim == 4:
                _, _, H, W = x.shape
                T = 1
            elif x.ndim == 5:
                _, _, T, H, W = x.shape
                T = T // self.tubelet_size
            else:
                return original(self, x, masks)
            H_patches, W_patches = H // self.patch_size, W // self.patch_size
            if not self.handle_nonsquare_inputs:
                T = H_patches = W_patches = None

            if not self.use_rope:
                pos_embed = self.interpolate_pos_encoding(x, self.pos_embed)  # (1, N, D)
                x = self.patch_embed(x)  # (B, N, D)
                if masks is None:
                    x = x + pos_embed
                elif common.pos_applies(pos_embed, x):
                    x = gather_tokens(x, masks, pos_embed)  # pos added at the kept tokens only
                else:
                    x = gather_tokens(x + pos_embed, masks)
            else:
                x = self.patch_embed(x)  # (B, N, D)
                if masks is not None:
                    x = gather_tokens(x, masks)  # (M·B, K, D)
            if masks is not None:
                masks = torch.cat(masks, dim=0)  # (M·B, K): the token positions the blocks (RoPE) take

            outs = []
            for i, blk in enumerate(self.blocks):
                if self.use_activation_checkpointing:
                    x = torch.utils.checkpoint.checkpoint(
                        blk, x, masks, None, T=T, H_patches=H_patches, W_patches=W_patches, use_reentrant=False
                    )
                else:
                    x = blk(x, mask=masks, attn_mask=None, T=T, H_patches=H_patches, W_patches=W_patches)
                if self.out_layers is not None and i in self.out_layers:
                    outs.append(self.norm(x))
            if self.out_layers is not None:
                return outs
            if self.norm is not None:
                x = self.norm(x)
            return x

        return forward

    return [class_patch(mods["src.models.vision_transformer"].VisionTransformer, "forward", make)]


def _rope(mods):
    from ._vjepa2_rope import rope_patches

    # RoPEAttention and rotate_queries_or_keys wherever V-JEPA 2's modules imported them
    return rope_patches(package_modules(("src", "app")))


def _predictor(mods):
    from ._vjepa2_predictor import predictor_patches

    try:
        return predictor_patches(mods)
    except ValueError as exc:  # a predictor whose forward is not V-JEPA 2's
        raise CodebaseMismatch(f"{API}: the imported 'src' is not {CODEBASE}: {exc}") from None


def _masks(mods):
    from ._vjepa2_masks import masks_patches

    return masks_patches(mods)


# -- public API ---------------------------------------------------------------------------


def apply(
    *,
    apply_masks: bool = True,
    repeat_interleave_batch: bool = True,
    encoder: bool = True,
    rope: bool = True,
    predictor: bool = True,
    masks: bool = True,
) -> list[str]:
    """Patch the imported V-JEPA 2 modules; returns what was patched (``module.attr`` names).

    Refuses (:class:`~fastjepa.integrations._patching.CodebaseMismatch`) when nothing of
    V-JEPA 2 is imported or the imported ``src`` is another codebase. Calling it again
    first reverts the previous call.
    """
    mods = common.identify(API, CODEBASE, "src", CHECKS, HINT)
    chosen = [
        (apply_masks, _apply_masks),
        (repeat_interleave_batch, common.repeat_interleave_batch_patches),
        (encoder, _encoder),
        (rope, _rope),
        (predictor, _predictor),
        (masks, _masks),
    ]
    return _STATE.apply_providers(mods, chosen)


def revert() -> list[str]:
    """Put every object :func:`apply` replaced back (the very same objects)."""
    return _STATE.revert()


def patched() -> list[str]:
    """What is patched now."""
    return _STATE.patched()

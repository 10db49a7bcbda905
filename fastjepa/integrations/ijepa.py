"""fastjepa for the public I-JEPA code (facebookresearch/ijepa, imported as ``src``).

::

    import fastjepa.integrations.ijepa
    fastjepa.integrations.ijepa.apply()      # after importing src.models / src.masks

Each flag swaps one piece (``False`` leaves it as it is):

* ``apply_masks``: ``src.masks.utils.apply_masks`` and every module's ``from … import``
  copy -> :func:`fastjepa.ops.apply_masks` (the fused gather).
* ``repeat_interleave_batch``: ``src.utils.tensors.repeat_interleave_batch`` (and its
  copies) -> one ``torch.repeat_interleave`` copy instead of a Python list of ``cat``.
* ``encoder``: ``VisionTransformer.forward``: the pos-embed add and the context gather in
  one pass (:func:`fastjepa.ops.gather_tokens` with ``pos_embed``).
* ``predictor``: ``VisionTransformerPredictor.forward``: the predictor input (context +
  pos, mask tokens + pos, the npred repeat, the concatenation) in one pass
  (:func:`fastjepa.ops.predictor_tokens`).
* ``attention``: ``Attention.forward`` through :func:`fastjepa.ops.attention` (SDPA or
  flash-attn) instead of an explicit softmax of the scores; it returns ``(x, None)``, and
  ``Block.forward(x, return_attention=True)`` computes the scores the original way.
  With attention dropout active in training it falls back to the original.
* ``mask_collator``: ``MaskCollator.__call__`` samples the batch in the C++ extension
  (the reference's block sizes from its own counter-seeded generator, corners on the
  reference's exclusive range ``top ∈ [0, H − h)``, the same relaxation and truncation),
  so the masks have the reference's distribution; the corner stream is seeded from the
  global torch RNG, as the reference's corners are. Without the C++ extension this piece is
  skipped with a warning (and missing from the returned list).

Every replacement falls back to the original for a call it does not cover (a mask
given as a bare tensor, ragged masks, an interpolated pos-embed of another size).
"""

from __future__ import annotations

import warnings

import torch

from . import _common as common
from ._patching import PatchSet, class_patch, function_patches, parameters, replaces

API = "fastjepa.integrations.ijepa.apply()"
CODEBASE = "the I-JEPA reference code (facebookresearch/ijepa)"
_STATE = PatchSet("ijepa")


def _check_masks_utils(m):
    if not callable(getattr(m, "apply_masks", None)):
        return "expected a function apply_masks(x, masks), found none"
    got = parameters(m.apply_masks)
    return None if got == ["x", "masks"] else f"expected apply_masks(x, masks), found apply_masks({', '.join(got)})"


def _check_tensors(m):
    if not callable(getattr(m, "repeat_interleave_batch", None)):
        return "expected a function repeat_interleave_batch(x, B, repeat), found none"
    return None


def _check_vit(m):
    problem = common.has_attrs(m, "VisionTransformer", "VisionTransformerPredictor", "Attention", "Block")
    if problem:
        return problem + " (I-JEPA defines its predictor beside the encoder)"
    if not hasattr(m.VisionTransformer, "interpolate_pos_encoding"):
        return "expected VisionTransformer.interpolate_pos_encoding, missing"
    return None


def _check_multiblock(m):
    problem = common.has_attrs(m, "MaskCollator")
    if problem:
        return problem
    missing = [a for a in ("_sample_block_size", "_sample_block_mask", "step") if not hasattr(m.MaskCollator, a)]
    return f"expected MaskCollator._sample_block_size, _sample_block_mask, step; missing {', '.join(missing)}" if missing else None


CHECKS = {
    "src.masks.utils": _check_masks_utils,
    "src.utils.tensors": _check_tensors,
    "src.models.vision_transformer": _check_vit,
    "src.masks.multiblock": _check_multiblock,
}
HINT = "Import the I-JEPA modules first (e.g. `import src.models.vision_transformer`), then call apply()."


# -- providers: one per flag --------------------------------------------------------------


def _apply_masks(mods):
    if "src.masks.utils" not in mods:
        return []
    from ..ops import apply_masks as fused

    original = mods["src.masks.utils"].apply_masks

    @replaces(original)
    def apply_masks(x, masks):
        if common.gather_applies(x, masks) is None:
            return original(x, masks)
        return fused(x, masks)

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
            x = self.patch_embed(x)  # (B, N, D)
            pos_embed = self.interpolate_pos_encoding(x, self.pos_embed)  # (1, N, D)
            if masks is None:
                x = x + pos_embed
            elif common.pos_applies(pos_embed, x):
                x = gather_tokens(x, masks, pos_embed)  # (M·B, K, D), pos added at the kept tokens only
            else:
                x = gather_tokens(x + pos_embed, masks)
            for blk in self.blocks:
                x = blk(x)
            if self.norm is not None:
                x = self.norm(x)
            return x

        return forward

    return [class_patch(mods["src.models.vision_transformer"].VisionTransformer, "forward", make)]


def _predictor(mods):
    if "src.models.vision_transformer" not in mods:
        return []
    from ..ops import predictor_tokens

    def make(original):
        @replaces(original)
        def forward(self, x, masks_x, masks):
            if masks is None or masks_x is None:
                return original(self, x, masks_x, masks)  # its own assertion
            mx = [masks_x] if not isinstance(masks_x, list) else masks_x
            mt = [masks] if not isinstance(masks, list) else masks
            B = x.size(0) // max(len(mx), 1)
            if x.dim() != 3 or common.masks_applies(mx, B) is None or common.masks_applies(mt, B) is None:
                return original(self, x, masks_x, masks)
            if mx[0].size(1) != x.size(1) or B * len(mx) != x.size(0):
                return original(self, x, masks_x, masks)
            x = self.predictor_embed(x)  # (nenc·B, Kc, P)
            n_ctx = x.size(1)
            x = predictor_tokens(x, mx, mt, self.predictor_pos_embed, self.mask_token)  # (npred·nenc·B, Kc+Kt, P)
            for blk in self.predictor_blocks:
                x = blk(x)
            x = self.predictor_norm(x)
            x = x[:, n_ctx:]  # the mask tokens' outputs
            return self.predictor_proj(x)  # (npred·nenc·B, Kt, D)

        return forward

    return [class_patch(mods["src.models.vision_transformer"].VisionTransformerPredictor, "forward", make)]


def _attention(mods):
    if "src.models.vision_transformer" not in mods:
        return []
    from ..ops import attention

    vit = mods["src.models.vision_transformer"]
    attn_original = vars(vit.Attention)["forward"]

    def make_attention(original):
        @replaces(original)
        def forward(self, x):
            if (self.training and self.attn_drop.p > 0) or x.dim() != 3:
                return original(self, x)
            B, N, C_ = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C_ // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, N, hd)
            x = attention(q, k, v, scale=self.scale)  # (B, h, N, hd)
            x = x.transpose(1, 2).reshape(B, N, C_)  # (B, N, C)
            x = self.proj_drop(self.proj(x))
            return x, None  # the scores are never formed

        return forward

    def make_block(original):
        @replaces(original)
        def forward(self, x, return_attention=False):
            if return_attention:
                return attn_original(self.attn, self.norm1(x))[1]  # the scores, the original way
            return original(self, x)

        return forward

    return [class_patch(vit.Attention, "forward", make_attention), class_patch(vit.Block, "forward", make_block)]


def _mask_collator(mods):
    if "src.masks.multiblock" not in mods:
        return []
    from ..ops import available

    why = None if available()["cpp"] else available()["cpp"].reason
    if why is None and not hasattr(torch.ops.fastjepa, "sample_masks_sized"):
        why = "the built fastjepa._C predates sample_masks_sized; rebuild it"
    if why is not None:
        warnings.warn(f"{API}: MaskCollator left as it is: the C++ sampler is not available ({why})", stacklevel=3)
        return []
    from ..masks.multiblock import sample_reference_cpp

    def make(original):
        @replaces(original)
        def __call__(self, batch):
            B = len(batch)
            collated_batch = torch.utils.data.default_collate(batch)
            seed = self.step()  # the shared counter, as the reference
            g = torch.Generator()
            g.manual_seed(seed)
            p_size = self._sample_block_size(generator=g, scale=self.pred_mask_scale, aspect_ratio_scale=self.aspect_ratio)
            e_size = self._sample_block_size(generator=g, scale=self.enc_mask_scale, aspect_ratio_scale=(1.0, 1.0))
            corner_seed = int(torch.randint(0, 2**62, (1,)).item())  # global RNG, as the reference's corners
            masks_enc, masks_pred = sample_reference_cpp(
                B, self.height, self.width, p_size, e_size, self.nenc, self.npred, self.min_keep,
                self.allow_overlap, corner_seed,
            )
            return collated_batch, masks_enc, masks_pred

        return __call__

    return [class_patch(mods["src.masks.multiblock"].MaskCollator, "__call__", make)]


# -- public API ---------------------------------------------------------------------------


def apply(
    *,
    apply_masks: bool = True,
    repeat_interleave_batch: bool = True,
    encoder: bool = True,
    predictor: bool = True,
    attention: bool = True,
    mask_collator: bool = True,
) -> list[str]:
    """Patch the imported I-JEPA modules; returns what was patched (``module.attr`` names).

    Refuses (:class:`~fastjepa.integrations._patching.CodebaseMismatch`) when nothing of
    I-JEPA is imported or the imported ``src`` is another codebase. Calling it again
    first reverts the previous call.
    """
    mods = common.identify(API, CODEBASE, "src", CHECKS, HINT)
    chosen = [
        (apply_masks, _apply_masks),
        (repeat_interleave_batch, common.repeat_interleave_batch_patches),
        (encoder, _encoder),
        (predictor, _predictor),
        (attention, _attention),
        (mask_collator, _mask_collator),
    ]
    return _STATE.apply_providers(mods, chosen)


def revert() -> list[str]:
    """Put every object :func:`apply` replaced back (the very same objects)."""
    return _STATE.revert()


def patched() -> list[str]:
    """What is patched now."""
    return _STATE.patched()


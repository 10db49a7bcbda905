"""V-JEPA 2's predictor forward through :func:`fastjepa.ops.sorted_predictor_tokens`.

:func:`predictor_patches` returns the patch that :func:`fastjepa.integrations.vjepa2.apply`
installs: ``src.models.predictor.VisionTransformerPredictor.forward`` replaced by
:func:`predictor_forward`, which computes what the original computes:

1. ``predictor_embed`` of the context tokens;
2. the sequence of context tokens (+ the predictor pos table at ``masks_x``) and copies of
   the chosen mask token (+ the pos table at ``masks_y``), sorted per row by token position,
   the last ``chop_last_n_tokens`` dropped, the class token in front with ``has_cls`` —
   one kernel instead of repeat, gather, cat, argsort and a Python loop over the batch;
3. the blocks, given the sorted positions as their ``mask`` (RoPE rotates by them);
4. ``predictor_norm``; unless ``return_all_tokens``, the un-sort and take of the target
   tokens as one gather; ``predictor_proj``.

Differences, none of which a V-JEPA 2 training run meets:

* Equal positions (a token in both masks, or twice in one) sort stably, context first;
  the original's ``torch.argsort`` leaves their order unspecified. The output does not
  depend on it unless ``chop_last_n_tokens`` or ``return_all_tokens`` exposes the sequence
  order (attention is permutation-equivariant; RoPE rotates by position, not slot).
* Several mask pairs in one call (``len(masks_x) == len(masks_y) > 1``) pair context mask
  *i* with target mask *i*; the original's ``x.repeat(len(masks_x), 1, 1)`` makes such a
  call fail with a shape error (its training passes one pair per call).
* ``chop_last_n_tokens > 0`` without ``return_all_tokens`` raises a ValueError naming it;
  the original fails with an IndexError in its un-sort.
* Under autocast the blocks see the same values; the sort of mixed int32/int64 masks
  gives int64 positions, as ``torch.cat`` does in the original.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.utils.checkpoint

from ..ops.sorted_predictor_tokens import sorted_predictor_take_targets, sorted_predictor_tokens

MODULE = "src.models.predictor"
CLASS = "VisionTransformerPredictor"
FORWARD_PARAMS = ("self", "x", "masks_x", "masks_y", "mask_index", "has_cls")


def predictor_forward(self, x, masks_x, masks_y, mask_index=1, has_cls=False):
    """V-JEPA 2's ``VisionTransformerPredictor.forward`` on fastjepa's fused ops.

    :param x: context tokens (M·B, has_cls + Kc, embed_dim) from the encoder
    :param masks_x: M (B, Kc) indices of the context tokens (or one tensor)
    :param masks_y: M (B, Kt) indices of the target tokens (or one tensor)
    :param mask_index: which mask token (modulo their number)
    :param has_cls: ``x`` starts with a class token
    """
    assert (masks_x is not None) and (masks_y is not None), "Cannot run predictor without mask indices"
    if not isinstance(masks_x, list):
        masks_x = [masks_x]
    if not isinstance(masks_y, list):
        masks_y = [masks_y]

    x = self.predictor_embed(x)  # (M·B, has_cls + Kc, P)
    mask_token = self.mask_tokens[mask_index % self.num_mask_tokens]  # (1, 1, P)
    pos = None if self.use_rope else self.predictor_pos_embed  # (1, N, P) or None
    x, masks, order = sorted_predictor_tokens(
        x, masks_x, masks_y, mask_token, pos,
        has_cls=has_cls, chop_last_n=self.chop_last_n_tokens, num_patches=self.num_patches,
    )  # fmt: skip  # (M·B, has_cls + L - chop, P), positions (M·B, L - chop)

    for blk in self.predictor_blocks:
        if self.use_activation_checkpointing:
            x = torch.utils.checkpoint.checkpoint(blk, x, masks, None, use_reentrant=False)
        else:
            x = blk(x, mask=masks, attn_mask=None)
    x = self.predictor_norm(x)

    if not self.return_all_tokens:
        x = sorted_predictor_take_targets(x, order)  # (M·B, Kt, P), in the order of masks_y
    elif has_cls:
        x = x[:, 1:]  # (M·B, L - chop, P), sorted
    return self.predictor_proj(x)


def predictor_patches(modules: dict[str, types.ModuleType]) -> list[tuple[object, str, object]]:
    """``[(VisionTransformerPredictor, "forward", predictor_forward)]`` when ``modules`` (imported
    module name -> module) holds ``src.models.predictor``, else ``[]``.

    Raises ValueError, naming what it expected and found, when that module is not V-JEPA 2's
    (no such class, or a forward with other parameters).
    """
    module = modules.get(MODULE)
    if module is None:
        return []
    cls = getattr(module, CLASS, None)
    if not isinstance(cls, type) or not callable(getattr(cls, "forward", None)):
        found = "nothing" if cls is None else type(cls).__name__
        raise ValueError(f"{MODULE}: expected V-JEPA 2's class {CLASS} with a forward, found {found}")
    params = tuple(inspect.signature(cls.forward).parameters)
    if params != FORWARD_PARAMS:
        raise ValueError(
            f"{MODULE}.{CLASS}.forward takes ({', '.join(params)}), expected V-JEPA 2's ({', '.join(FORWARD_PARAMS)})"
        )
    return [(cls, "forward", predictor_forward)]

"""fastjepa for MAE (facebookresearch/mae, imported as ``models_mae``).

::

    import fastjepa.integrations.mae
    fastjepa.integrations.mae.apply()        # after importing models_mae

One flag, one piece (``False`` leaves it as it is):

* ``random_masking``: ``MaskedAutoencoderViT.forward_encoder`` adds the pos-embed
  (``pos_embed[:, 1:]``, the class token's row excluded) only at the kept tokens, in the
  same pass as the gather (:func:`fastjepa.ops.gather_tokens`), and
  ``MaskedAutoencoderViT.random_masking`` gathers through the fused op. Both draw the
  same noise from the global RNG (``torch.rand(N, L)``), so ``ids_restore`` and the binary
  mask are the original's, element for element; the mask is computed as
  ``ids_restore >= len_keep`` instead of a gather of a ones/zeros row (the same values).

A subclass that overrides ``random_masking`` keeps its own: the patched
``forward_encoder`` then runs the original.
"""

from __future__ import annotations

import torch

from . import _common as common
from ._patching import PatchSet, class_patch, replaces

API = "fastjepa.integrations.mae.apply()"
CODEBASE = "MAE (facebookresearch/mae)"
_STATE = PatchSet("mae")


def _check_models_mae(m):
    problem = common.has_attrs(m, "MaskedAutoencoderViT")
    if problem:
        return problem
    missing = [a for a in ("random_masking", "forward_encoder", "forward_decoder") if a not in vars(m.MaskedAutoencoderViT)]
    return f"expected MaskedAutoencoderViT.random_masking, forward_encoder, forward_decoder; missing {', '.join(missing)}" if missing else None


CHECKS = {"models_mae": _check_models_mae}
HINT = "Import it first (`import models_mae` from the MAE repository's root), then call apply()."


def _masking(x: torch.Tensor, mask_ratio: float, pos: torch.Tensor | None):
    """MAE's per-sample random masking with the fused gather (+ pos at the kept tokens)."""
    from ..ops import gather_tokens

    N, L, D = x.shape  # batch, length, dim
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device)  # the original's draw, in its order
    ids_shuffle = torch.argsort(noise, dim=1)  # (N, L) ascending: small is keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
    ids_keep = ids_shuffle[:, :len_keep]  # (N, K)
    x_masked = gather_tokens(x, [ids_keep], pos)  # (N, K, D)
    mask = (ids_restore >= len_keep).to(torch.get_default_dtype())  # (N, L): 0 keep, 1 remove
    return x_masked, mask, ids_restore


def _fused_masking_applies(x, mask_ratio) -> bool:
    return (
        isinstance(x, torch.Tensor) and x.dim() == 3 and x.is_floating_point()
        and int(x.size(1) * (1 - mask_ratio)) > 0
    )


def _random_masking(mods):
    if "models_mae" not in mods:
        return []
    cls = mods["models_mae"].MaskedAutoencoderViT
    patched_masking = {}

    def make_masking(original):
        @replaces(original)
        def random_masking(self, x, mask_ratio):
            if not _fused_masking_applies(x, mask_ratio):
                return original(self, x, mask_ratio)
            return _masking(x, mask_ratio, None)

        patched_masking["fn"] = random_masking
        return random_masking

    def make_encoder(original):
        @replaces(original)
        def forward_encoder(self, x, mask_ratio):
            if type(self).random_masking is not patched_masking["fn"]:
                return original(self, x, mask_ratio)  # a subclass's own masking
            x = self.patch_embed(x)  # (N, L, D)
            pos = self.pos_embed[:, 1:, :]  # (1, L, D), without the class token's row
            if not (_fused_masking_applies(x, mask_ratio) and common.pos_applies(pos, x)):
                x, mask, ids_restore = self.random_masking(x + pos, mask_ratio)
            else:
                x, mask, ids_restore = _masking(x, mask_ratio, pos)  # (N, K, D): pos added at kept tokens only
            cls_token = self.cls_token + self.pos_embed[:, :1, :]  # (1, 1, D)
            cls_tokens = cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat((cls_tokens, x), dim=1)  # (N, 1+K, D)
            for blk in self.blocks:
                x = blk(x)
            x = self.norm(x)
            return x, mask, ids_restore

        return forward_encoder

    return [class_patch(cls, "random_masking", make_masking), class_patch(cls, "forward_encoder", make_encoder)]


def apply(*, random_masking: bool = True) -> list[str]:
    """Patch the imported ``models_mae``; returns what was patched (``module.attr`` names).

    Refuses (:class:`~fastjepa.integrations._patching.CodebaseMismatch`) when
    ``models_mae`` is not imported or is not MAE's. Calling it again first reverts the
    previous call.
    """
    mods = common.identify(API, CODEBASE, "models_mae", CHECKS, HINT)
    return _STATE.apply_providers(mods, [(random_masking, _random_masking)])


def revert() -> list[str]:
    """Put every object :func:`apply` replaced back (the very same objects)."""
    return _STATE.revert()


def patched() -> list[str]:
    """What is patched now."""
    return _STATE.patched()

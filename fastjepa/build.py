"""From a config to a model on a device: the one place that turns the ``meta``/``mask``/``data``
settings into the I-JEPA networks, and ``meta.device`` into a torch device."""

from __future__ import annotations

import inspect

import torch

from . import models
from .architecture import check_model_fits
from .config import ConfigError
from .models.ijepa import IJEPA


def pick_device(name: str, setting: str = "meta.device={}") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` as a device; ``cuda`` with none visible is a
    :class:`ConfigError` naming ``setting`` (how the caller's user spells it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = f" (this torch, {torch.__version__}, is a CPU build)" if torch.version.cuda is None else ""
        raise ConfigError(
            f"{setting.format('cuda')}, but no CUDA device is visible here{why}: "
            f"set {setting.format('cpu')} (or {setting.format('auto')})"
        )
    return torch.device(name)


def build_model(cfg: dict) -> IJEPA:
    """The I-JEPA model ``cfg`` describes; a model whose parameters alone exceed this
    machine's memory is refused before anything is allocated (:func:`check_model_fits`)."""
    meta, data, mask = cfg["meta"], cfg["data"], cfg["mask"]
    check_model_fits(cfg)
    factory = getattr(models, meta["model_name"])
    allowed = set(inspect.signature(models.VisionTransformer).parameters) - {"kwargs", "img_size", "patch_size"}
    unknown = sorted(set(meta["model_kwargs"]) - allowed)
    if unknown:
        raise ConfigError(f"meta.model_kwargs: unknown key(s) {unknown}; expected some of {sorted(allowed)} (YAML needs 'key: value' with a space)")
    try:
        encoder = factory(patch_size=mask["patch_size"], img_size=data["crop_size"], **meta["model_kwargs"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"meta.model_kwargs={meta['model_kwargs']}: {exc}") from None
    heads = meta["pred_num_heads"] or encoder.num_heads
    if meta["pred_emb_dim"] % heads != 0:
        raise ConfigError(
            f"meta.pred_emb_dim={meta['pred_emb_dim']} is not divisible by the predictor's {heads} heads "
            f"({'meta.pred_num_heads' if meta['pred_num_heads'] else 'the encoder' + chr(39) + 's, as the reference'}); "
            "change meta.pred_emb_dim or set meta.pred_num_heads"
        )
    predictor = models.vit_predictor(
        num_patches=encoder.patch_embed.num_patches,
        embed_dim=encoder.embed_dim,
        predictor_embed_dim=meta["pred_emb_dim"],
        depth=meta["pred_depth"],
        num_heads=heads,
    )
    return IJEPA(encoder, predictor)

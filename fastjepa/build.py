"""From a config or an architecture to modules on a device: the one place that builds the
I-JEPA networks from the ``meta``/``mask``/``data`` settings (:func:`build_model`), one
encoder from a config or from an encoder architecture (:func:`config_encoder`,
:func:`random_init_encoder`, :func:`build_encoder`), and turns ``meta.device`` into a torch
device. What a config, an encoder or a file describes, as numbers, is :mod:`fastjepa.architecture`."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn

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


def config_encoder(cfg: dict) -> models.VisionTransformer:
    """The target encoder that ``cfg`` builds, as :func:`build_model` builds it (initialised
    from the global RNG; every ``meta.model_kwargs`` setting applies)."""
    return build_model(cfg).target_encoder


def random_init_encoder(cfg: dict) -> models.VisionTransformer:
    """The target encoder exactly as training initialises it (``meta.seed``), without
    touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["meta"]["seed"])
        return config_encoder(cfg)


def build_encoder(arch: Mapping[str, Any], *, device: torch.device | str | None = None) -> models.VisionTransformer:
    """A randomly initialised encoder of the encoder architecture ``arch``
    (:data:`fastjepa.architecture.ARCH_KEYS`; its LayerNorms with ``norm_eps``), on
    ``device`` (``"meta"``: nothing is allocated)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return models.VisionTransformer(
            img_size=int(arch["img_size"]),
            patch_size=int(arch["patch_size"]),
            in_chans=int(arch["in_chans"]),
            embed_dim=int(arch["embed_dim"]),
            depth=int(arch["depth"]),
            num_heads=int(arch["num_heads"]),
            mlp_ratio=float(arch["mlp_ratio"]),
            qkv_bias=bool(arch["qkv_bias"]),
            norm_layer=partial(nn.LayerNorm, eps=float(arch["norm_eps"])),
        )

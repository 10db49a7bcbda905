"""Building a run: the device, the model, the optimizer, autocast, seeds and RNG state."""

from __future__ import annotations

import inspect
import random
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .. import models
from ..architecture import check_model_fits
from ..checkpoint import (
    numpy_rng_from_plain,
    numpy_rng_to_plain,
)
from ..config import ConfigError
from ..ijepa import IJEPA
from ..ops._dispatch import cpu_has_bf16


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


def param_groups(model: IJEPA) -> list[dict]:
    """The reference's four groups: encoder / predictor × (decayed, no-decay biases & 1-D)."""

    def split(module: nn.Module):
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim == 1 or name.endswith("bias") else decay).append(p)
        return decay, no_decay

    enc_d, enc_n = split(model.encoder)
    pred_d, pred_n = split(model.predictor)
    return [
        {"params": enc_d},
        {"params": pred_d},
        {"params": enc_n, "WD_exclude": True, "weight_decay": 0.0},
        {"params": pred_n, "WD_exclude": True, "weight_decay": 0.0},
    ]


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # torch >= 2.4 has a fused AdamW kernel for both


def make_optimizer(model: IJEPA, device: torch.device, reference_step: bool) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. fastjepa: the fused kernel (one pass over each
    parameter) on CUDA and on the CPU — on the CPU ``foreach`` is a per-tensor loop, 3-4x
    slower than fused for vit_tiny's 6 M parameters (measured) —, ``foreach`` elsewhere.
    The reference step: the per-parameter loop, as the reference code gets by default."""
    kwargs: dict[str, Any] = {}
    if not reference_step:
        kwargs = {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {"foreach": True}
    return torch.optim.AdamW(param_groups(model), **kwargs)


def autocast_dtype(use_bfloat16: bool, device: torch.device, reference_step: bool) -> torch.dtype | None:
    """bf16 autocast on CUDA (docs/design.md §5), and on CPUs with bf16 matrix units — where it pays
    (measured 1.4-1.5x on AVX512-BF16) — except for the reference step, which runs fp32 off
    CUDA as the reference code does. None: fp32."""
    if not use_bfloat16:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and not reference_step and cpu_has_bf16():
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states of Python, NumPy and torch (and CUDA), in types a
    weights-only load accepts (NumPy's key as a tensor; Python's state is a tuple of ints)."""
    state = {"python": random.getstate(), "numpy": numpy_rng_to_plain(np.random.get_state()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(numpy_rng_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

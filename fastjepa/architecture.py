"""Config ↔ architecture: the one place that says what a config, a built encoder or a state
dict describes, as numbers, checked before anything is built (:mod:`fastjepa.build` turns
them into modules).

Two kinds of dict: a config's *effective architecture* (:func:`architecture`, its fields
named as the config names them, the predictor's included) and an *encoder architecture*
(:data:`ARCH_KEYS`: what rebuilding one encoder takes, as every file layout records it).

* :func:`architecture`: the effective architecture of a config (the named ViT size with
  ``meta.model_kwargs`` applied, the predictor's resolved head count, patch and crop size):
  the values that decide what each weight means.
* encoder architecture from a config (:func:`arch_from_config`), from a built encoder
  (:func:`arch_from_module`), from a state dict's shapes (:func:`arch_from_state`); back to
  a config's names (:func:`config_names`) and to a whole config (:func:`config_for_architecture`).
* :func:`checkpoint_config`: the config that describes a training checkpoint (``--config``,
  else the one it stores, else the packaged one with overrides).
* :func:`describe_model`: the encoder a config builds, in one phrase.
* :func:`check_same_architecture`: ``--resume`` refuses a config whose architecture differs
  from the one stored in the checkpoint (a head count changes what the weights mean
  without changing a single shape).
* :func:`check_encoder_shapes`: an architecture read from a file (a stored config, safetensors
  metadata) must agree with the file's tensors before a model of that size is built.
* :func:`check_model_fits`: a model whose parameters alone would not fit this machine's
  memory is refused before the allocation is attempted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import models
from .checkpoint import CheckpointError
from .checkpoint.formats import ARCH_KEYS, arch_from_module, arch_from_state
from .config import ConfigError, apply_overrides, load_config, merge
from .models import VIT_SIZES

__all__ = [
    "ARCH_KEYS",
    "ENCODER_WEIGHT_KEYS",
    "FIELD_SOURCE",
    "arch_from_config",
    "arch_from_module",
    "arch_from_state",
    "architecture",
    "check_encoder_shapes",
    "check_model_fits",
    "check_same_architecture",
    "checkpoint_config",
    "config_for_architecture",
    "config_names",
    "describe_model",
    "memory_limit_bytes",
    "parameter_count",
]

# model_kwargs that change what the encoder's weights mean (the others — drop rates,
# init_std — change training, not the meaning of a stored weight)
ENCODER_WEIGHT_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_scale", "in_chans")

# each architecture field and the config key a user changes it with
FIELD_SOURCE = {
    "embed_dim": "meta.model_name / meta.model_kwargs",
    "depth": "meta.model_name / meta.model_kwargs",
    "num_heads": "meta.model_name / meta.model_kwargs",
    "mlp_ratio": "meta.model_name / meta.model_kwargs",
    "qkv_bias": "meta.model_kwargs",
    "qk_scale": "meta.model_kwargs",
    "in_chans": "meta.model_kwargs",
    "patch_size": "mask.patch_size",
    "crop_size": "data.crop_size",
    "pred_depth": "meta.pred_depth",
    "pred_emb_dim": "meta.pred_emb_dim",
    "pred_num_heads": "meta.pred_num_heads",
}


def architecture(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The effective architecture of ``cfg``: every field of :data:`FIELD_SOURCE`."""
    meta = cfg["meta"]
    name = meta["model_name"]
    if name not in VIT_SIZES:
        raise ConfigError(f"config key meta.model_name: got {name!r}, expected one of {', '.join(map(repr, VIT_SIZES))}")
    kwargs = meta.get("model_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"config key meta.model_kwargs: got {kwargs!r} ({type(kwargs).__name__}), expected a mapping")
    enc = {"qkv_bias": True, "qk_scale": None, "in_chans": 3, **VIT_SIZES[name]}
    enc.update({k: v for k, v in kwargs.items() if k in ENCODER_WEIGHT_KEYS})
    enc["mlp_ratio"] = float(enc["mlp_ratio"]) if isinstance(enc["mlp_ratio"], (int, float)) else enc["mlp_ratio"]
    return {
        **enc,
        "patch_size": cfg["mask"]["patch_size"],
        "crop_size": cfg["data"]["crop_size"],
        "pred_depth": meta["pred_depth"],
        "pred_emb_dim": meta["pred_emb_dim"],
        "pred_num_heads": meta.get("pred_num_heads") or enc["num_heads"],
    }


def describe_model(cfg: Mapping[str, Any]) -> str:
    """``vit_tiny {'depth': 6}, patch 4, 32 px``: the encoder a config builds, in one phrase."""
    kw = cfg["meta"]["model_kwargs"]
    extra = f" {kw}" if kw else ""
    return f"{cfg['meta']['model_name']}{extra}, patch {cfg['mask']['patch_size']}, {cfg['data']['crop_size']} px"


def arch_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder architecture (:data:`ARCH_KEYS`) a config builds: its factory run on the
    meta device (nothing is allocated) and read back with :func:`arch_from_module`."""
    meta = cfg["meta"]
    factory = getattr(models, str(meta["model_name"]), None)
    if factory is None or not callable(factory):
        raise ConfigError(f"meta.model_name={meta['model_name']!r} is not a fastjepa model")
    with torch.device("meta"):
        enc = factory(patch_size=int(cfg["mask"]["patch_size"]), img_size=int(cfg["data"]["crop_size"]), **(meta["model_kwargs"] or {}))
    return arch_from_module(enc)


def config_names(arch: Mapping[str, Any]) -> dict[str, Any]:
    """An encoder architecture as a config's names: ``{model_name, model_kwargs, patch_size,
    crop_size}`` (the factory of that width, else ``vit_base``; kwargs for what differs from
    it). The LayerNorm eps is not a config setting: build with
    :func:`fastjepa.build.build_encoder` to keep it."""
    D = int(arch["embed_dim"])
    name = next((n for n, s in VIT_SIZES.items() if s["embed_dim"] == D), "vit_base")
    base = dict(VIT_SIZES[name], qkv_bias=True, in_chans=3)
    kwargs = {k: arch[k] for k in ("embed_dim", "depth", "num_heads", "qkv_bias", "in_chans") if arch[k] != base[k]}
    if abs(float(arch["mlp_ratio"]) - float(base["mlp_ratio"])) > 1e-9:
        kwargs["mlp_ratio"] = float(arch["mlp_ratio"])
    return {"model_name": name, "model_kwargs": kwargs, "patch_size": int(arch["patch_size"]), "crop_size": int(arch["img_size"])}


def config_for_architecture(names: Mapping[str, Any], overrides: Sequence[str] = ()) -> dict:
    """The packaged config with ``names`` (:func:`config_names`' dict) and ``overrides``
    applied, through the schema: an unknown model_name or a model_kwargs that is not a
    mapping is a :class:`ConfigError` naming it. ``mask.min_keep`` is 0: evaluation samples
    no masks, and any grid size stays valid."""
    cfg = load_config(None, [])
    merge(cfg, {"meta": {"model_name": names["model_name"], "model_kwargs": names["model_kwargs"]}}, "the architecture")
    merge(cfg, {"data": {"crop_size": names["crop_size"]}, "mask": {"patch_size": names["patch_size"], "min_keep": 0}}, "the architecture")
    return apply_overrides(cfg, overrides)


def checkpoint_config(
    stored: Mapping[str, Any] | None,
    config: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    *,
    where: str = "the checkpoint's config",
) -> tuple[dict | None, str]:
    """``(config, where it comes from)`` describing a training checkpoint's networks:
    ``config`` (a YAML file) with ``overrides``; else ``stored`` (the resolved config a
    fastjepa checkpoint holds; ``where`` names it in errors) with them; else the packaged
    config with the overrides; ``(None, "")`` without any of these (the weights' shapes
    must tell). A config that does not validate is a :class:`ConfigError`."""
    if config is not None:
        return load_config(config, overrides), f"--config {config}"
    if isinstance(stored, Mapping):
        return apply_overrides(merge(load_config(None, []), dict(stored), where), overrides), "the checkpoint's config"
    if overrides:
        return load_config(None, overrides), "the packaged config + overrides"
    return None, ""


def check_same_architecture(path: str | os.PathLike, stored: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """``--resume``: the architecture of ``cfg`` must be the one of the config stored in
    checkpoint ``path``; otherwise one line naming each field, both values and its key."""
    try:
        want = architecture(stored)
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: its stored config does not describe a model ({type(exc).__name__}: {exc})") from None
    have = architecture(cfg)
    bad = [
        f"{field} {have[field]!r} here, {want[field]!r} in the checkpoint ({FIELD_SOURCE[field]})"
        for field in FIELD_SOURCE
        if have[field] != want[field]
    ]
    if bad:
        raise CheckpointError(
            f"--resume: this config's architecture differs from checkpoint {path}'s: " + "; ".join(bad)
            + ". A run resumes with the architecture it was trained with: drop the override(s), or train a new run into another --output"
        )


def _shape(t: Any) -> tuple[int, ...] | None:
    shape = getattr(t, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def check_encoder_shapes(path: str | os.PathLike, name: str, arch: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """The encoder ``arch`` describes must be the one ``state``'s tensors hold (their shapes
    and block count), checked before a model of that size is built: an architecture read
    from a file cannot make fastjepa allocate more than the file's own tensors."""
    D, depth, heads = arch["embed_dim"], arch["depth"], arch["num_heads"]
    patch, crop, chans, ratio = arch["patch_size"], arch["crop_size"], arch["in_chans"], arch["mlp_ratio"]
    for field, value in (("embed_dim", D), ("depth", depth), ("num_heads", heads), ("patch_size", patch), ("crop_size", crop), ("in_chans", chans)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: its architecture's {field} is {value!r}, expected an integer >= 1")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise CheckpointError(f"{path}: its architecture's mlp_ratio is {ratio!r}, expected a number > 0")
    if D % heads:
        raise CheckpointError(f"{path}: its architecture's embed_dim {D} is not divisible by num_heads {heads}")
    grid = crop // patch
    hidden = int(D * ratio)
    expected = {
        "pos_embed": (1, grid * grid, D),
        "patch_embed.proj.weight": (D, chans, patch, patch),
        "blocks.0.attn.qkv.weight": (3 * D, D),
        "blocks.0.mlp.fc1.weight": (hidden, D),
        "norm.weight": (D,),
    }
    for key, want in expected.items():
        got = _shape(state.get(key))
        if got is not None and got != want:
            raise CheckpointError(
                f"{path}: '{name}.{key}' has shape {got}, but the architecture it comes with "
                f"(embed_dim {D}, depth {depth}, patch {patch}, crop {crop}, mlp_ratio {ratio:g}) makes {want}"
            )
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    if blocks and len(blocks) != depth:
        raise CheckpointError(f"{path}: '{name}' holds {len(blocks)} blocks, but the architecture it comes with has depth {depth}")


def parameter_count(arch: Mapping[str, Any]) -> tuple[int, int]:
    """``(encoder, predictor)`` parameter counts of ``arch``, from the formulas of the layers."""

    def block(d: int, ratio: float) -> int:
        h = int(d * ratio)
        return 3 * d * d + 3 * d + d * d + d + d * h + h + h * d + d + 4 * d

    D, P = int(arch["embed_dim"]), int(arch["pred_emb_dim"])
    n = (int(arch["crop_size"]) // int(arch["patch_size"])) ** 2
    p = int(arch["patch_size"])
    enc = D * int(arch["in_chans"]) * p * p + D + n * D + int(arch["depth"]) * block(D, float(arch["mlp_ratio"])) + 2 * D
    pred = D * P + P + P + n * P + int(arch["pred_depth"]) * block(P, 4.0) + 2 * P + P * D + D
    return enc, pred


def memory_limit_bytes() -> int | None:
    """The memory this process may use: the smallest of physical memory, the address-space
    limit (``ulimit -v``) and the cgroup's ``memory.max``; None when none is known."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
            limits.append(soft)
    except (ImportError, ValueError, OSError):
        pass
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            limits.append(int(text))
    except OSError:
        pass
    return min(limits) if limits else None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_model_fits(cfg: Mapping[str, Any], *, training: bool = False) -> None:
    """Refuse, before anything is built, a model that cannot fit this machine's memory: its
    fp32 parameters (encoder, its target copy, predictor) or, with ``training``, those plus
    the gradients and AdamW's two moments of the trained networks and one batch of input
    images. One line naming the size and the keys that set it."""
    arch = architecture(cfg)
    enc, pred = parameter_count(arch)
    params = 2 * enc + pred
    need = 4 * params
    what = "in fp32"
    if training:
        images = cfg["data"]["batch_size"] * int(arch["in_chans"]) * int(arch["crop_size"]) ** 2
        need = 4 * (enc + 4 * (enc + pred) + images)
        what = "with gradients, AdamW state and one batch of images"
    limit = memory_limit_bytes()
    if limit is not None and need > limit:
        raise ConfigError(
            f"the model this config builds ({cfg['meta']['model_name']}, embed_dim {arch['embed_dim']}, depth {arch['depth']}, "
            f"patch {arch['patch_size']}, crop {arch['crop_size']}, predictor width {arch['pred_emb_dim']}) has "
            f"{params / 1e9:,.2f} G parameters with its target copy, {_gib(need)} {what}, "
            f"more than this machine's {_gib(limit)}: check meta.model_name / meta.model_kwargs, "
            "data.crop_size, mask.patch_size" + (" and data.batch_size" if training else "")
        )

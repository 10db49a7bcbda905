"""Other tools' layouts of the I-JEPA encoder: Hugging Face transformers' ``IJepaModel``
and timm's ``VisionTransformer`` (docs/interop.md).

Pure name and config mappings over state dicts, and the architecture read off a state
dict's shapes or a built encoder; nothing here builds a model or imports transformers or
timm (:mod:`fastjepa.architecture` maps these architectures to configs and models).

* fastjepa (the reference's names): ``pos_embed``, ``patch_embed.proj.*``,
  ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``, ``norm.*``.
* timm (``VisionTransformer(class_token=False, global_pool="avg", fc_norm=False,
  num_classes=0)``, I-JEPA's configuration in timm): the same names and shapes.
* transformers (``IJepaModel``, as ``save_pretrained`` writes it): ``embeddings.*``,
  ``encoder.layer.{i}.*`` with the fused ``qkv`` split into ``query``/``key``/``value``,
  ``layernorm.*``; read also with an ``ijepa.`` prefix (``IJepaForImageClassification``)
  and under the module names transformers 5 uses in memory (``layers.{i}.attention.q_proj``…).

An architecture is a dict with the :data:`ARCH_KEYS`: ``embed_dim, depth, num_heads,
mlp_ratio, patch_size, img_size, in_chans, qkv_bias, norm_eps``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size", "in_chans", "qkv_bias", "norm_eps")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HF_MODEL_TYPE = "ijepa"
TIMM_ARGS = {"class_token": False, "global_pool": "avg", "fc_norm": False, "num_classes": 0}  # I-JEPA's ViT in timm
# head count of each standard width (a state dict does not record it)
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}

# fastjepa name (per block: after "blocks.{i}.") -> transformers' saved name (after "encoder.layer.{i}.")
_HF_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_HF_TOP = {
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# transformers 5's in-memory module names -> the saved ones (what save_pretrained converts them to)
_HF_MEMORY = [
    (re.compile(r"^layers\.(\d+)\.attention\.q_proj\."), r"encoder.layer.\1.attention.attention.query."),
    (re.compile(r"^layers\.(\d+)\.attention\.k_proj\."), r"encoder.layer.\1.attention.attention.key."),
    (re.compile(r"^layers\.(\d+)\.attention\.v_proj\."), r"encoder.layer.\1.attention.attention.value."),
    (re.compile(r"^layers\.(\d+)\.attention\.o_proj\."), r"encoder.layer.\1.attention.output.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc1\."), r"encoder.layer.\1.intermediate.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc2\."), r"encoder.layer.\1.output.dense."),
    (re.compile(r"^layers\.(\d+)\.(layernorm_before|layernorm_after)\."), r"encoder.layer.\1.\2."),
]


class FormatError(ValueError):
    """A state dict or config that is not the layout it was read as (the message says what is off)."""


def _depth(state: Mapping[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise FormatError(f"block indices {sorted(found)} are not 0..{len(found) - 1}")
    return len(found)


def layout_of(state: Mapping[str, Any]) -> str | None:
    """``"fastjepa"`` (also timm's names), ``"hf"``, or None for a state dict of neither."""
    keys = set(state)
    if {"pos_embed", "patch_embed.proj.weight"} <= keys and any(k.startswith("blocks.") for k in keys):
        return "fastjepa"
    hf = {_hf_plain_name(k) for k in keys}
    if "embeddings.patch_embeddings.projection.weight" in hf and "embeddings.position_embeddings" in hf:
        return "hf"
    return None


def _hf_plain_name(key: str) -> str:
    if key.startswith("ijepa."):
        key = key[len("ijepa.") :]
    for pattern, repl in _HF_MEMORY:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


# -- transformers


def fastjepa_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An encoder state dict under fastjepa's names -> transformers' ``IJepaModel`` names
    (``qkv`` split into ``query``, ``key``, ``value``). Every key must be mapped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:
            raise FormatError(f"{key!r} is not a fastjepa encoder parameter")
        i, name, kind = m.groups()
        if name == "attn.qkv":
            for part, hf in zip(value.chunk(3, dim=0), _HF_QKV):
                out[f"encoder.layer.{i}.{hf}.{kind}"] = part.contiguous()
        elif name in _HF_BLOCK:
            out[f"encoder.layer.{i}.{_HF_BLOCK[name]}.{kind}"] = value
        else:
            raise FormatError(f"{key!r} is not a fastjepa encoder parameter")
    return out


def hf_to_fastjepa(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' ``IJepaModel`` state dict (saved or in-memory names, optional
    ``ijepa.`` prefix) -> fastjepa's names, ``query``/``key``/``value`` fused into ``qkv``.
    A classifier head (``classifier.*``) or a pooler (``pooler.*``) is dropped; any other
    key it cannot place is an error naming it."""
    top = {v: k for k, v in _HF_TOP.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        name = _hf_plain_name(key)
        if name.startswith(("classifier.", "pooler.")) or name == "embeddings.mask_token":
            continue
        if name in top:
            out[top[name]] = value
            continue
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m is None:
            raise FormatError(f"{key!r} is not an IJepaModel parameter")
        i, sub, kind = m.groups()
        if sub in _HF_QKV:
            qkv.setdefault((i, kind), {})[_HF_QKV.index(sub)] = value
        elif sub in block:
            out[f"blocks.{i}.{block[sub]}.{kind}"] = value
        else:
            raise FormatError(f"{key!r} is not an IJepaModel parameter")
    for (i, kind), parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            raise FormatError(f"layer {i}: query/key/value {kind} incomplete (found {sorted(parts)})")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


def hf_config(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of transformers' ``IJepaModel`` for ``arch``."""
    return {
        "architectures": ["IJepaModel"],
        "model_type": HF_MODEL_TYPE,
        "hidden_size": int(arch["embed_dim"]),
        "num_hidden_layers": int(arch["depth"]),
        "num_attention_heads": int(arch["num_heads"]),
        "intermediate_size": int(round(arch["embed_dim"] * arch["mlp_ratio"])),
        "hidden_act": "gelu",  # the exact (erf) GELU, as nn.GELU()
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": float(arch["norm_eps"]),
        "image_size": int(arch["img_size"]),
        "patch_size": int(arch["patch_size"]),
        "num_channels": int(arch["in_chans"]),
        "qkv_bias": bool(arch["qkv_bias"]),
        "pooler_output_size": int(arch["embed_dim"]),
        "pooler_act": "tanh",
        "dtype": "float32",
    }


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise FormatError(f"{what}={list(value)}: only square sizes are supported")
        value = value[0]
    return int(value)


def arch_from_hf_config(cfg: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """``arch`` from an ``IJepaModel`` config.json (a ``FormatError`` names what is off)."""
    if cfg.get("model_type") != HF_MODEL_TYPE:
        raise FormatError(f"{where}: model_type {cfg.get('model_type')!r}, expected {HF_MODEL_TYPE!r} (transformers' IJepaModel)")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise FormatError(f"{where}: hidden_act {cfg['hidden_act']!r}; fastjepa's encoder uses 'gelu'")
    try:
        D = int(cfg["hidden_size"])
        return {
            "embed_dim": D,
            "depth": int(cfg["num_hidden_layers"]),
            "num_heads": int(cfg["num_attention_heads"]),
            "mlp_ratio": int(cfg["intermediate_size"]) / D,
            "patch_size": _square(cfg["patch_size"], "patch_size"),
            "img_size": _square(cfg["image_size"], "image_size"),
            "in_chans": int(cfg.get("num_channels", 3)),
            "qkv_bias": bool(cfg.get("qkv_bias", True)),
            "norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),  # transformers' default when absent
        }
    except KeyError as exc:
        raise FormatError(f"{where}: no {exc.args[0]!r}, which an IJepaModel config has") from None


# -- timm


def timm_model_name(arch: Mapping[str, Any]) -> str:
    """A timm architecture to build ``arch`` from: its registered ViT of that width — for
    ViT-H and ViT-g the one timm's I-JEPA weights use — (the ``model_args`` of
    :func:`timm_config` set everything else)."""
    names = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224", 1024: "vit_large_patch16_224",
             1280: "vit_huge_patch14_gap_224", 1408: "vit_giant_patch16_gap_224"}  # fmt: skip
    return names.get(int(arch["embed_dim"]), "vit_base_patch16_224")


def timm_config(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a timm model folder, so that
    ``timm.create_model("local-dir:FOLDER", pretrained=True)`` builds I-JEPA's ViT."""
    model_args = {
        "img_size": int(arch["img_size"]),
        "patch_size": int(arch["patch_size"]),
        "in_chans": int(arch["in_chans"]),
        "embed_dim": int(arch["embed_dim"]),
        "depth": int(arch["depth"]),
        "num_heads": int(arch["num_heads"]),
        "mlp_ratio": float(arch["mlp_ratio"]),
        "qkv_bias": bool(arch["qkv_bias"]),
        **TIMM_ARGS,
    }
    size = int(arch["img_size"])
    return {
        "architecture": timm_model_name(arch),
        "num_classes": 0,
        "num_features": int(arch["embed_dim"]),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [int(arch["in_chans"]), size, size],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def arch_from_timm_config(cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], where: str = "config.json") -> dict[str, Any]:
    """``arch`` of a timm folder: its ``model_args`` where given, the weights' shapes otherwise."""
    arch = arch_from_state(state)
    args = cfg.get("model_args") or {}
    if args.get("class_token", True) and "cls_token" in state:
        raise FormatError(f"{where}: a ViT with a class token; an I-JEPA encoder has none")
    for key in ("num_heads", "mlp_ratio", "qkv_bias"):
        if key in args:
            arch[key] = type(arch[key])(args[key]) if arch[key] is not None else args[key]
    if "img_size" in args:
        arch["img_size"] = _square(args["img_size"], "img_size")
    return arch


# -- shapes


def arch_from_state(state: Mapping[str, torch.Tensor], *, norm_eps: float = 1e-6) -> dict[str, Any]:
    """``arch`` read off a fastjepa-named state dict's shapes. The head count is not in
    the weights: the standard one for the width (or width / 64) is used."""
    need = ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise FormatError(f"no {', '.join(missing)}: not a ViT encoder state dict")
    if state["pos_embed"].dim() != 3:
        raise FormatError(f"pos_embed of shape {tuple(state['pos_embed'].shape)}, expected (1, N, D)")
    _, N, D = state["pos_embed"].shape
    grid = math.isqrt(int(N))
    if grid * grid != N:
        raise FormatError(f"pos_embed holds {N} positions: not a square grid (or a class token is included)")
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    return {
        "embed_dim": int(D),
        "depth": _depth(state, r"^blocks\.(\d+)\."),
        "num_heads": STANDARD_HEADS.get(int(D), max(1, int(D) // 64)),
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / int(D),
        "patch_size": patch,
        "img_size": grid * patch,
        "in_chans": int(state["patch_embed.proj.weight"].shape[1]),
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "norm_eps": norm_eps,
    }


def arch_from_module(encoder: Any) -> dict[str, Any]:
    """``arch`` read off a built encoder (a fastjepa / reference ViT, also inside a DDP
    wrapper's ``.module``). An encoder without blocks has no MLP ratio or qkv bias to read:
    those are None. Anything else is a ``FormatError`` naming its type."""
    enc = getattr(encoder, "module", encoder)
    try:
        D = int(enc.embed_dim)
        block = enc.blocks[0] if len(enc.blocks) else None
        return {
            "embed_dim": D,
            "depth": len(enc.blocks),
            "num_heads": int(enc.num_heads),
            "mlp_ratio": block.mlp.fc1.out_features / D if block is not None else None,
            "patch_size": int(enc.patch_embed.patch_size),
            "img_size": int(enc.patch_embed.img_size),
            "in_chans": int(enc.patch_embed.proj.in_channels),
            "qkv_bias": block.attn.qkv.bias is not None if block is not None else None,
            "norm_eps": float(enc.norm.eps),
        }
    except AttributeError as exc:
        raise FormatError(f"{type(enc).__name__} is not a fastjepa VisionTransformer encoder ({exc})") from None


def dumps_config(cfg: Mapping[str, Any]) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"

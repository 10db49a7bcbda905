"""An encoder from any file, and to other tools' layouts (docs/interop.md).

* :func:`load_encoder` (also ``fastjepa.load_encoder``): a ready
  :class:`~fastjepa.models.VisionTransformer`, its architecture read from the file, for
  every layout in :data:`LAYOUTS`.
* :func:`read_encoder`: the same file as ``(state dict under fastjepa's names,
  architecture, info)``, without building a model.
* :func:`write_folder`: what :func:`read_encoder` read, as a Hugging Face ``IJepaModel``
  folder (``format="hf"``) or a timm model folder (``format="timm"``), each with a model
  card; :func:`fastjepa.encoder.export_encoder` (``python -m fastjepa.checkpoint export …
  --format hf|timm``) resolves the source and calls it.

transformers and timm are not imported: the files are written and read directly
(:mod:`fastjepa.checkpoint.formats` holds the name and config mappings).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import models
from .architecture import arch_from_config, checkpoint_config
from .build import build_encoder
from .models.pos_embed import sincos_2d
from .checkpoint import (
    resolve_run_checkpoint,
    run_checkpoint_kind,
    ENCODER_FLAG,
    ENCODER_FORMAT,
    ENCODER_KEYS,
    SAFETENSORS_SUFFIX,
    CheckpointError,
    atomic_write_text,
    read_checkpoint,
    read_safetensors,
    save_safetensors,
    strip_module_prefix,
)
from .checkpoint.formats import (
    CONFIG_NAME,
    HF_MODEL_TYPE,
    WEIGHTS_NAME,
    FormatError,
    arch_from_hf_config,
    arch_from_state,
    arch_from_timm_config,
    dumps_config,
    fastjepa_to_hf,
    hf_config,
    hf_to_fastjepa,
    layout_of,
    timm_config,
)
from .config import ConfigError

log = logging.getLogger(__name__)

LAYOUTS = (
    "a fastjepa run folder (its <tag>-best.pth.tar, else <tag>-latest.pth.tar)",
    "a fastjepa or reference I-JEPA training checkpoint (.pth.tar: encoder / target_encoder state dicts)",
    "a fastjepa encoder export (.safetensors with fastjepa metadata)",
    "a Hugging Face IJepaModel folder (config.json + model.safetensors) or its model.safetensors / pytorch_model.bin",
    "a timm VisionTransformer state dict (.safetensors, .pth, .bin; I-JEPA's: no class token) or timm model folder",
)


@dataclass
class EncoderFile:
    """What :func:`read_encoder` found: the weights under fastjepa's names, the
    architecture (:data:`~fastjepa.checkpoint.formats.ARCH_KEYS`), and ``info``: ``path``,
    ``layout``, ``network``, ``epoch``, ``architecture_from``, ``config`` (a fastjepa
    run's resolved config, when the file holds one) and, for a run folder, ``checkpoint``."""

    state: dict[str, torch.Tensor]
    arch: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


def _unknown(path: Path, found: str) -> CheckpointError:
    known = "; ".join(LAYOUTS)
    return CheckpointError(f"{path}: {found}, which is not an encoder layout fastjepa reads. It reads: {known}")


def _describe_keys(state: Mapping[str, Any]) -> str:
    keys = list(state)
    shown = ", ".join(repr(k) for k in keys[:6])
    return f"{len(keys)} keys ({shown}{', …' if len(keys) > 6 else ''})"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _weights_in(folder: Path) -> Path | None:
    for name in (WEIGHTS_NAME, "pytorch_model.bin", "open_clip_model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_tensors(path: Path, trust: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """(dict, safetensors metadata) of a weights file of any kind."""
    if path.name.endswith(SAFETENSORS_SUFFIX):
        return read_safetensors(path)
    return dict(read_checkpoint(path, trust=trust)), {}  # weights-only; a non-dict is an error naming its type


def _from_state(path: Path, state: Mapping[str, Any], folder_config: dict | None, info: dict[str, Any]) -> EncoderFile:
    """A flat state dict in the HF or fastjepa/timm layout -> an :class:`EncoderFile`."""
    state = strip_module_prefix(state)
    layout = layout_of(state)
    try:
        if layout == "hf":
            fj = hf_to_fastjepa(state)
            if folder_config is not None:
                arch, source = arch_from_hf_config(folder_config, str(path.parent / CONFIG_NAME)), "config.json"
            else:
                arch, source = arch_from_state(fj, norm_eps=1e-12), "the weights' shapes (no config.json beside it)"
            return EncoderFile(fj, arch, {**info, "layout": "hf", "architecture_from": source})
        if layout == "fastjepa":
            if "cls_token" in state:
                raise FormatError("a ViT with a class token (cls_token); an I-JEPA encoder has none")
            if folder_config is not None and "architecture" in folder_config:
                arch, source, kind = arch_from_timm_config(folder_config, state, str(path.parent / CONFIG_NAME)), "config.json", "timm"
            else:
                arch, source, kind = arch_from_state(state), "the weights' shapes", "timm"
            extra = [k for k in state if k.startswith(("head.", "fc_norm.")) or k in ("norm_pre.weight", "norm_pre.bias")]
            head = {k: state[k] for k in extra}
            fj = {k: v for k, v in state.items() if k not in head}
            return EncoderFile(fj, arch, {**info, "layout": kind, "architecture_from": source})
    except FormatError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    raise _unknown(path, f"it holds {_describe_keys(state)}")


def read_encoder(
    path: str | os.PathLike,
    *,
    which: str = "target",
    trust: bool = False,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> EncoderFile:
    """Read one encoder from any layout in :data:`LAYOUTS` (see :func:`load_encoder`).
    ``config`` / ``overrides`` give the architecture of a training checkpoint instead of
    its stored config (or of a reference checkpoint instead of its weights' shapes)."""
    if which not in ENCODER_KEYS:
        raise ValueError(f"which={which!r}: expected one of {', '.join(ENCODER_KEYS)}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    info: dict[str, Any] = {"path": str(path), "network": ENCODER_KEYS[which], "epoch": None, "config": None}
    if path.is_dir():
        cfg_file, weights = path / CONFIG_NAME, _weights_in(path)
        if cfg_file.is_file() and weights is not None:
            return _read_weights_file(weights, which, trust, info | {"path": str(path)}, _read_json(cfg_file))
        ckpt = resolve_run_checkpoint(path, strict=False)  # a run folder: its best, else latest checkpoint
        if ckpt == path:
            listing = sorted(p.name for p in path.iterdir())[:8]
            raise _unknown(path, f"a folder holding {listing or 'nothing'}")
        kind = run_checkpoint_kind(ckpt)
        found = read_encoder(ckpt, which=which, trust=trust, config=config, overrides=overrides)
        found.info.update({"path": str(path), "checkpoint": str(ckpt), "chosen": kind})
        log.info("fastjepa: %s: loading its %s checkpoint %s", path, kind, ckpt.name)
        return found
    beside = path.parent / CONFIG_NAME
    folder_config = _read_json(beside) if beside.is_file() else None
    return _read_weights_file(path, which, trust, info, folder_config, config=config, overrides=overrides)


def _read_weights_file(
    path: Path,
    which: str,
    trust: bool,
    info: dict[str, Any],
    folder_config: dict | None,
    *,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> EncoderFile:
    obj, meta = _load_tensors(path, trust)
    key = ENCODER_KEYS[which]
    if meta.get("format") == ENCODER_FORMAT:  # fastjepa's own safetensors export
        stored = meta.get("network")
        if stored and stored != key:
            flag = ENCODER_FLAG.get(stored, stored)
            raise CheckpointError(f"{path} holds the {stored}, not the {key} (ask for which={flag!r})")
        try:
            arch = arch_from_state(obj)
            arch.update(num_heads=int(meta["num_heads"]), mlp_ratio=float(meta["mlp_ratio"]), img_size=int(meta["img_size"]))
        except (KeyError, ValueError, FormatError) as exc:
            raise CheckpointError(f"{path}: its metadata does not describe an encoder ({type(exc).__name__}: {exc})") from None
        epoch = meta.get("epoch", "")
        return EncoderFile(obj, arch, {**info, "layout": "fastjepa safetensors", "architecture_from": "the file's metadata",
                                       "epoch": int(epoch) if epoch.isdigit() else None})  # fmt: skip
    if folder_config is not None and folder_config.get("model_type") not in (None, HF_MODEL_TYPE) and "architecture" not in folder_config:
        raise _unknown(path, f"config.json of model_type {folder_config.get('model_type')!r}")
    if isinstance(obj.get(key), Mapping) or isinstance(obj.get("encoder"), Mapping):  # a training checkpoint
        if not isinstance(obj.get(key), Mapping):
            raise CheckpointError(f"checkpoint {path} has no {key!r} (keys: {sorted(obj)})")
        state = strip_module_prefix(obj[key])
        extra = obj.get("fastjepa") if isinstance(obj.get("fastjepa"), Mapping) else None
        stored = extra.get("config") if extra and isinstance(extra.get("config"), Mapping) else None
        try:
            cfg, source = checkpoint_config(stored, config, overrides)
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {path}: the config does not validate ({exc}); pass --config FILE") from None
        try:
            arch = arch_from_config(cfg) if cfg is not None else arch_from_state(state)
        except (FormatError, ConfigError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: cannot tell its architecture ({exc}); pass --config FILE") from None
        epoch = obj.get("epoch")
        return EncoderFile(state, arch, {**info, "layout": "fastjepa checkpoint" if extra else "reference checkpoint",
                                         "architecture_from": source or "the weights' shapes", "epoch": epoch, "config": cfg if stored else None})  # fmt: skip
    for wrapper in ("state_dict", "model"):  # timm's and others' checkpoint dicts
        if isinstance(obj.get(wrapper), Mapping) and layout_of(obj) is None:
            obj = dict(obj[wrapper])
    return _from_state(path, obj, folder_config, info)


def load_encoder(
    path: str | os.PathLike,
    *,
    which: str = "target",
    trust: bool = False,
    device: torch.device | str | None = None,
) -> models.VisionTransformer:
    """A ready encoder (eval mode) from ``path``, its architecture read from the file:

    * a fastjepa run folder: its ``<tag>-best.pth.tar`` if present, else ``<tag>-latest.pth.tar``
      (which one is logged, and kept in ``encoder.fastjepa_source["chosen"]``);
    * a fastjepa or reference I-JEPA training checkpoint (``.pth.tar``; the target encoder,
      ``which="context"`` for the context encoder), opened weights-only (``trust=True``
      opens a file that needs more, with a warning);
    * fastjepa's ``.safetensors`` export;
    * a Hugging Face ``IJepaModel`` folder (``save_pretrained``: config.json +
      model.safetensors) or its model.safetensors (config.json beside it is read);
    * a timm ``VisionTransformer`` state dict (I-JEPA's: no class token), or a timm folder.

    ``encoder.fastjepa_source`` holds what was read (layout, file, epoch, where the
    architecture came from). An unknown layout raises :class:`~fastjepa.checkpoint.CheckpointError`
    naming what was found and the layouts read."""
    found = read_encoder(path, which=which, trust=trust)
    encoder = build_encoder(found.arch, device="meta")
    try:
        encoder.load_state_dict(found.state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = " ".join(ln.strip() for ln in str(exc).strip().splitlines())
        raise CheckpointError(
            f"{path}: its weights ({found.info.get('layout')}) do not fit the architecture read from "
            f"{found.info.get('architecture_from')}: {lines}"
        ) from None
    encoder.pos_embed.requires_grad_(False)  # the fixed table, as a freshly built encoder has it
    encoder.fastjepa_source = {k: v for k, v in found.info.items() if k != "config"}
    encoder.eval()
    return encoder.to(device) if device is not None else encoder


# -- export


def _run_folder(src: Path, info: Mapping[str, Any]) -> Path | None:
    if src.is_dir():
        return src
    ckpt = Path(info.get("checkpoint") or info.get("path", src))
    return ckpt.parent if ckpt.parent.is_dir() else None


def _probe_numbers(folder: Path | None) -> dict[str, Any] | None:
    if folder is None or not (folder / "eval.json").is_file():
        return None
    try:
        data = json.loads((folder / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pct(x: Any) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "?"


def _is_sincos_table(found: EncoderFile) -> bool:
    pos = found.state.get("pos_embed")
    grid = int(found.arch["img_size"]) // int(found.arch["patch_size"])
    if pos is None or tuple(pos.shape) != (1, grid * grid, int(found.arch["embed_dim"])):
        return False
    return bool(torch.equal(pos[0].float(), sincos_2d(int(found.arch["embed_dim"]), grid)))


def model_card(found: EncoderFile, *, fmt: str, source: str, out_name: str) -> str:
    """README.md of an exported folder: what the weights are, the run's config, data,
    epochs and probe numbers (where the run folder has them), and how to load them."""
    arch, info, cfg = found.arch, found.info, found.info.get("config")
    network = "target encoder (EMA)" if info.get("network") == "target_encoder" else "context encoder"
    lines = [
        "---",
        "library_name: " + ("transformers" if fmt == "hf" else "timm"),
        "pipeline_tag: image-feature-extraction",
        "tags:",
        "- ijepa",
        "- fastjepa",
        "- self-supervised",
        "---",
        "",
        "# I-JEPA encoder exported by fastjepa",
        "",
        f"The **{network}** of `{source}` ({info.get('layout')}), epoch {info.get('epoch')}, exported with "
        f"`python -m fastjepa.checkpoint export {source} {out_name} --format {fmt}`.",
        "",
        "## Architecture",
        "",
        "| width | depth | heads | MLP ratio | patch | image size | channels | qkv bias | LayerNorm eps |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {arch['embed_dim']} | {arch['depth']} | {arch['num_heads']} | {arch['mlp_ratio']:g} | {arch['patch_size']} | "
        f"{arch['img_size']} | {arch['in_chans']} | {arch['qkv_bias']} | {arch['norm_eps']:g} |",
        "",
        "No class token; the features are the normed patch tokens, pooled by their mean for linear evaluation. "
        + ("The position table is I-JEPA's fixed 2-D sin-cos one." if _is_sincos_table(found) else
           "The position table is not the fixed 2-D sin-cos one (learned or edited)."),
        "",
    ]
    if cfg:
        data, opt, mask, meta = cfg.get("data", {}), cfg.get("optimization", {}), cfg.get("mask", {}), cfg.get("meta", {})
        lines += [
            "## Training",
            "",
            f"- model: `{meta.get('model_name')}` {meta.get('model_kwargs') or ''}".rstrip(),
            f"- data: {data.get('dataset')} {data.get('root_path') or ''} {data.get('image_folder') or ''}".rstrip()
            + f", crop {data.get('crop_size')} px, batch size {data.get('batch_size')}",
            f"- epochs: {opt.get('epochs')} (this checkpoint: epoch {info.get('epoch')}), lr {opt.get('lr')}, "
            f"EMA {opt.get('ema')}, weight decay {opt.get('weight_decay')} → {opt.get('final_weight_decay')}",
            f"- masks: {mask.get('num_enc_masks')} context block(s) of scale {mask.get('enc_mask_scale')}, "
            f"{mask.get('num_pred_masks')} target block(s) of scale {mask.get('pred_mask_scale')}",
            f"- seed: {meta.get('seed')}",
            "",
            "<details><summary>Full resolved config</summary>",
            "",
            "```json",
            json.dumps(cfg, indent=2, sort_keys=True, default=str),
            "```",
            "",
            "</details>",
            "",
        ]
    probe = _probe_numbers(_run_folder(Path(source), info))
    if probe and "linear_probe_top1" in probe:
        base = probe.get("random_init") or {}
        desc = (probe.get("data") or {}).get("description", "?")
        lines += [
            "## Frozen-feature evaluation",
            "",
            f"From the run folder's eval.json (`python -m fastjepa.eval`), on {desc}, epoch {probe.get('epoch', '?')}"
            f"{' (quick probe)' if probe.get('quick') else ''}:",
            "",
            "| encoder | linear probe top-1 | k-NN top-1 |",
            "|---|---|---|",
            f"| this checkpoint | {_pct(probe.get('linear_probe_top1'))} | {_pct(probe.get('knn_top1'))} |",
        ]
        if base:
            lines.append(f"| random init | {_pct(base.get('linear_probe_top1'))} | {_pct(base.get('knn_top1'))} |")
        lines.append("")
    lines += ["## Loading", ""]
    if fmt == "hf":
        lines += [
            "```python",
            "from transformers import IJepaModel",
            f'model = IJepaModel.from_pretrained("{out_name}")  # last_hidden_state: the normed tokens',
            "import fastjepa",
            f'encoder = fastjepa.load_encoder("{out_name}")  # the same network as a fastjepa VisionTransformer',
            "```",
        ]
    else:
        lines += [
            "```python",
            "import timm",
            f'model = timm.create_model("local-dir:{out_name}", pretrained=True)  # forward(): the mean-pooled tokens',
            "import fastjepa",
            f'encoder = fastjepa.load_encoder("{out_name}")',
            "```",
        ]
    return "\n".join(lines) + "\n"


def write_folder(found: EncoderFile, dst: str | os.PathLike, *, format: str, source: str | os.PathLike) -> dict[str, Any]:
    """Write the encoder :func:`read_encoder` read from ``source`` to the folder ``dst``:
    ``format="hf"`` a transformers ``IJepaModel`` (config.json, model.safetensors,
    README.md), ``format="timm"`` a timm model folder (the same three files, for
    ``timm.create_model("local-dir:DST", pretrained=True)``). The weights are checked
    against the architecture before anything is written. ``source``: what the user named
    (a run folder's eval.json goes into the model card). Returns ``{"format", "path",
    "network", "arch", "info", "metadata"}`` (as :func:`fastjepa.encoder.export_encoder`)."""
    if format not in ("hf", "timm"):
        raise ValueError(f"format={format!r}: expected 'hf' or 'timm'")
    src, dst = Path(source), Path(dst)
    probe = build_encoder(found.arch, device="meta")  # check that the weights fit the architecture before writing anything
    missing, unexpected = _key_diff(probe.state_dict(), found.state)
    if missing or unexpected:
        raise CheckpointError(f"export: {src}'s weights do not fit its architecture (missing {missing[:4]}, unexpected {unexpected[:4]})")
    if format == "hf":
        state, cfg_json = fastjepa_to_hf(found.state), hf_config(found.arch)
    else:
        state, cfg_json = dict(found.state), timm_config(found.arch)
    meta = {"format": "pt", "fastjepa.network": str(found.info.get("network")), "fastjepa.source": src.name,
            "fastjepa.epoch": str(found.info.get("epoch"))}  # fmt: skip
    dst.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, meta, dst / WEIGHTS_NAME)
    atomic_write_text(dst / CONFIG_NAME, dumps_config(cfg_json))
    atomic_write_text(dst / "README.md", model_card(found, fmt=format, source=str(src), out_name=str(dst)))
    info = {k: v for k, v in found.info.items() if k != "config"}
    return {"format": format, "path": str(dst), "network": info.get("network"), "arch": found.arch, "info": info, "metadata": meta}


def _key_diff(want: Mapping[str, Any], have: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(want) - set(have)), sorted(set(have) - set(want))

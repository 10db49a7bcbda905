"""The encoder under evaluation, the evaluation images and their frozen features
(see :mod:`fastjepa.eval` for the definitions)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint import SAFETENSORS_SUFFIX, CheckpointError, check_module_state, read_checkpoint, strip_module_prefix
from ..config import ConfigError, load_config, merge, validate

FEATURE_VERSION = 1  # bump when the feature definition changes (invalidates caches)


def describe_model(cfg: dict) -> str:
    """``vit_tiny {'depth': 6}, patch 4, 32 px``: the encoder a config builds, in one phrase."""
    kw = cfg["meta"]["model_kwargs"]
    extra = f" {kw}" if kw else ""
    return f"{cfg['meta']['model_name']}{extra}, patch {cfg['mask']['patch_size']}, {cfg['data']['crop_size']} px"


class EvalError(RuntimeError):
    """A problem with the evaluation's inputs, with what to do about it."""


# -- models


def random_init_encoder(cfg: dict) -> nn.Module:
    """The target encoder exactly as training initialises it (``meta.seed``), without
    touching the global RNG."""
    from ..trainer import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["meta"]["seed"])
        return build_model(cfg).target_encoder


def _build_encoder(cfg: dict) -> nn.Module:
    from ..trainer import build_model

    return build_model(cfg).target_encoder


def infer_architecture(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Encoder settings read off a state dict's shapes: ``{model_name, model_kwargs,
    patch_size, crop_size}``. The head count cannot be read from weights; the standard
    one for the width is used."""
    from ..models import VIT_SIZES

    need = ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise EvalError(f"cannot infer the architecture: the encoder state has no {', '.join(missing)}; pass --config FILE")
    _, N, D = state["pos_embed"].shape
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(N))
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / D
    name = next((n for n, s in VIT_SIZES.items() if s["embed_dim"] == D), None)
    kwargs: dict[str, Any] = {}
    if name is None:
        name, kwargs = "vit_base", {"embed_dim": int(D), "num_heads": max(1, int(D) // 64)}
    if depth != VIT_SIZES[name]["depth"]:
        kwargs["depth"] = depth
    if not math.isclose(mlp_ratio, VIT_SIZES[name]["mlp_ratio"], rel_tol=1e-6):
        kwargs["mlp_ratio"] = float(mlp_ratio)
    return {"model_name": name, "model_kwargs": kwargs, "patch_size": patch, "crop_size": grid * patch}


def _config_for_architecture(arch: dict[str, Any], overrides: Sequence[str]) -> dict:
    cfg = load_config(None, [])
    # through the schema: an unknown model_name or a model_kwargs that is not a mapping is a
    # ConfigError naming it, not an AttributeError later
    merge(cfg, {"meta": {"model_name": arch["model_name"], "model_kwargs": arch["model_kwargs"]}}, "the architecture")
    merge(cfg, {"data": {"crop_size": arch["crop_size"]}, "mask": {"patch_size": arch["patch_size"], "min_keep": 0}}, "the architecture")
    return _apply_overrides(cfg, overrides)  # min_keep 0: evaluation samples no masks; keep any grid size valid


def _check_before_build(path: Path, key: str, cfg: dict, state: dict, source: str) -> None:
    """The encoder ``cfg`` describes must be the one ``state`` holds (shapes, block count)
    before it is built: an architecture from a file or a flag cannot make evaluation
    allocate a model larger than the weights it is about to load."""
    from ..architecture import architecture, check_encoder_shapes

    try:
        check_encoder_shapes(path, key, architecture(cfg), state)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (architecture from {source}; pass the --config it was trained with, or fix the overrides)") from None


def _apply_overrides(cfg: dict, overrides: Sequence[str]) -> dict:
    from ..config import parse_override

    cfg = copy.deepcopy(cfg)
    for text in overrides:
        sec, key, value = parse_override(text)
        merge(cfg, {sec: {key: value}}, f"override {text!r}")
    return validate(cfg)


ENCODER_KEYS = {"target": "target_encoder", "context": "encoder"}  # --encoder -> checkpoint key


def load_target_encoder(
    path: str | os.PathLike,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    which: str = "target",
    *,
    trust: bool = False,
) -> tuple[nn.Module, dict, dict[str, Any]]:
    """Build the model and load the checkpoint's target encoder (strictly).

    ``path``: a ``.pth.tar`` (read weights-only; ``trust=True`` also opens one that needs
    more, which may run code) or a ``.safetensors`` file from ``python -m fastjepa.checkpoint
    export`` (the architecture comes from its metadata).

    ``which="context"`` loads the context encoder (the network trained by gradients)
    instead: a diagnostic, not the paper's protocol — it shows whether a collapse starts
    in the student before the EMA carries it into the target.

    Returns ``(encoder, cfg, info)``; ``info`` says where the architecture came from, the
    checkpoint's epoch and which encoder was loaded.
    """
    if which not in ENCODER_KEYS:
        raise ValueError(f"which={which!r}: expected one of {', '.join(ENCODER_KEYS)}")
    key = ENCODER_KEYS[which]
    path = Path(path)
    if path.name.endswith(SAFETENSORS_SUFFIX):
        return _load_safetensors_encoder(path, config, overrides, key)
    ckpt = read_checkpoint(path, trust=trust)
    if key not in ckpt:
        raise CheckpointError(
            f"checkpoint {path} has no {key!r} (keys: {sorted(ckpt)}); expected a fastjepa or I-JEPA training checkpoint"
        )
    state = ckpt[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {key!r} is a {type(state).__name__}, expected a state dict")
    state = strip_module_prefix(state)
    extra = ckpt.get("fastjepa")
    stored = extra.get("config") if isinstance(extra, dict) else None
    if config is not None:
        cfg, source = load_config(config, overrides), f"--config {config}"
    elif isinstance(stored, dict):
        try:
            cfg = _apply_overrides(merge(load_config(None, []), stored, f"config stored in {path}"), overrides)
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {path}: its stored config does not validate ({exc}); pass --config FILE") from None
        source = "the checkpoint's config"
    elif overrides:
        cfg, source = load_config(None, overrides), "the packaged config + overrides"
    else:
        cfg, source = _config_for_architecture(infer_architecture(state), overrides), "the checkpoint's weight shapes"
    _check_before_build(path, key, cfg, state, source)
    encoder = _build_encoder(cfg)
    state = check_module_state(path, key, state, encoder)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path}: {key!r} does not fit the model built from {source} "
            f"({cfg['meta']['model_name']}, model_kwargs={cfg['meta']['model_kwargs']}, patch {cfg['mask']['patch_size']}, "
            f"crop {cfg['data']['crop_size']}); pass the --config it was trained with or fix the overrides. {exc}"
        ) from None
    info = {
        "path": str(path),
        "architecture_from": source,
        "epoch": ckpt.get("epoch"),
        "format": "fastjepa" if extra else "reference",
        "encoder": which,
    }
    return encoder, cfg, info


def _load_safetensors_encoder(
    path: Path, config: str | os.PathLike | None, overrides: Sequence[str], key: str
) -> tuple[nn.Module, dict, dict[str, Any]]:
    """:func:`load_target_encoder` for an exported ``.safetensors`` encoder: the model is
    built from the metadata's architecture (or ``--config``), checked against it field by
    field, then loaded strictly."""
    from ..checkpoint import ENCODER_FORMAT, check_architecture, read_safetensors

    state, meta = read_safetensors(path)
    stored = meta.get("network")
    if stored and stored != key:
        flag = {v: k for k, v in ENCODER_KEYS.items()}
        raise CheckpointError(f"{path} holds the {stored}, not the {key}: evaluate it with --encoder {flag.get(stored, 'target')}")
    ours = meta.get("format") == ENCODER_FORMAT
    if config is not None:
        cfg, source = load_config(config, overrides), f"--config {config}"
    elif ours:
        try:
            arch = {
                "model_name": meta["model_name"],
                "model_kwargs": json.loads(meta.get("model_kwargs") or "{}"),
                "patch_size": int(meta["patch_size"]),
                "crop_size": int(meta["img_size"]),
            }
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: its metadata does not describe an encoder ({type(exc).__name__}: {exc}); pass --config FILE") from None
        try:
            cfg = _config_for_architecture(arch, overrides)
            if meta.get("seed", "").lstrip("-").isdigit() and not any(o.startswith("meta.seed=") for o in overrides):
                cfg["meta"]["seed"] = int(meta["seed"])  # the random-init baseline of the run it came from
        except ConfigError as exc:
            raise CheckpointError(f"{path}: its metadata's architecture does not validate ({exc}); pass --config FILE") from None
        source = "the file's metadata"
    else:  # a safetensors file of another tool: read the architecture off the shapes
        cfg, source = _config_for_architecture(infer_architecture(state), overrides), "the file's weight shapes"
    _check_before_build(path, key, cfg, state, source)
    encoder = _build_encoder(cfg)
    if ours:
        check_architecture(path, meta, encoder)
    check_module_state(path, key, state, encoder)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{path}: its tensors do not fit the encoder built from {source} ({describe_model(cfg)}): "
            + " ".join(ln.strip() for ln in first)
        ) from None
    info = {
        "path": str(path),
        "architecture_from": source,
        "epoch": int(meta["epoch"]) if meta.get("epoch", "").isdigit() else None,
        "format": "safetensors",
        "encoder": {v: k for k, v in ENCODER_KEYS.items()}[key],
    }
    return encoder, cfg, info


# -- data


def eval_datasets(
    cfg: dict, data: str | None = None, train_dir: str | None = None, val_dir: str | None = None
) -> tuple[Dataset, Dataset, str]:
    """(train, held-out, description) without augmentation, at the model's crop size.

    ``embedded``: the MNIST-5k 4,000 / 1,000 split. ``imagefolder``: ``train_dir`` /
    ``val_dir``, default ``data.root_path`` / ``data.image_folder`` and ``data.val_folder``.
    """
    from ..data import ImageFolder, build_dataset

    dcfg = dict(cfg["data"])
    kind = data or (dcfg["dataset"] if dcfg["dataset"] == "imagefolder" and (train_dir or dcfg.get("val_folder")) else "embedded")
    if kind == "embedded":
        dcfg["dataset"] = "embedded"
        train = build_dataset(dcfg, split="train", train_transform=False)
        val = build_dataset(dcfg, split="val", train_transform=False)
        return train, val, "embedded MNIST-5k (4,000 train / 1,000 held out)"
    if kind != "imagefolder":
        raise EvalError(f"--data {kind!r}: expected 'embedded' or 'imagefolder'")
    root = dcfg.get("root_path") or ""
    train_dir = train_dir or (os.path.join(root, dcfg["image_folder"]) if dcfg.get("image_folder") else None)
    val_dir = val_dir or (os.path.join(root, dcfg["val_folder"]) if dcfg.get("val_folder") else None)
    if not train_dir or not val_dir:
        raise EvalError("--data imagefolder needs --train-dir DIR and --val-dir DIR (folders of <class>/<image>)")
    crop = int(dcfg["crop_size"])
    train = ImageFolder(train_dir, crop_size=crop, train_transform=False)
    val = ImageFolder(val_dir, crop_size=crop, train_transform=False)
    if train.classes != val.classes:
        raise EvalError(f"{train_dir} and {val_dir} have different class folders ({len(train.classes)} vs {len(val.classes)})")
    return train, val, f"image folders {train_dir} ({len(train)}) / {val_dir} ({len(val)})"


def _limit(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise EvalError(f"a limit of {n} images: expected at least 1")
    return Subset(ds, range(n))


def dataset_fingerprint(ds: Dataset) -> str | None:
    """A digest identifying the images and labels of ``ds``, or None when unknown (no caching)."""
    from ..data import EmbeddedMNIST, ImageFolder

    h = hashlib.sha1()
    if isinstance(ds, Subset):
        inner = dataset_fingerprint(ds.dataset)
        if inner is None:
            return None
        h.update(f"{inner}:{list(ds.indices)}".encode())
        return h.hexdigest()
    if isinstance(ds, EmbeddedMNIST):
        h.update(ds.images.numpy().tobytes())
        h.update(ds.labels.numpy().tobytes())
        h.update(f"embedded:{ds.crop_size}:{ds.crop is not None}".encode())
        return h.hexdigest()
    if isinstance(ds, ImageFolder):
        for p, label in ds.samples:
            st = os.stat(p)
            h.update(f"{p}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(f"folder:{ds.crop_size}:{ds.crop is not None}".encode())
        return h.hexdigest()
    return None


def weights_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# -- features


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, dynamic_ncols=True, leave=False)


@torch.inference_mode()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    *,
    layers: int = 1,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    desc: str = "features",
    quiet: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Average-pooled target-encoder tokens: ((n, layers·D) float32, (n,) int64 labels).

    ``layers=1``: the encoder's output (after its final LayerNorm), mean over tokens.
    ``layers=4``: the last four blocks' outputs, each through the final LayerNorm, pooled
    and concatenated (last block last).
    """
    depth = len(encoder.blocks)
    if layers not in (1, 4) or layers > depth:
        raise EvalError(f"--layers {layers}: expected 1 or 4 (at most the encoder depth, {depth})")
    encoder = encoder.to(device).eval()
    captured: list[torch.Tensor] = []
    hooks = []
    if layers > 1:
        for blk in encoder.blocks[-layers:]:
            hooks.append(blk.register_forward_hook(lambda _m, _i, out: captured.append(out)))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels = [], []
    t0, seen = time.perf_counter(), 0
    try:
        with _progress(len(dataset), desc, quiet) as bar:
            for imgs, y in loader:
                imgs = imgs.to(device, non_blocking=True)  # (B, C, H, W)
                captured.clear()
                out = encoder(imgs)  # (B, N, D)
                if layers == 1:
                    f = out.mean(dim=1)  # (B, D)
                else:
                    f = torch.cat([encoder.norm(h).mean(dim=1) for h in captured], dim=1)  # (B, layers·D)
                feats.append(f.float().cpu())
                labels.append(torch.as_tensor(y).long())
                seen += imgs.size(0)
                bar.update(imgs.size(0))
                bar.set_postfix(img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        for hk in hooks:
            hk.remove()
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTJEPA_CACHE", Path.home() / ".cache" / "fastjepa")) / "features"


def cached_features(
    encoder: nn.Module,
    dataset: Dataset,
    *,
    layers: int,
    cache_dir: Path | None,
    weights_digest: str | None = None,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`extract_features`, read from / written to ``cache_dir`` when the data is
    identifiable. Returns (features, labels, hit)."""
    data_digest = dataset_fingerprint(dataset) if cache_dir is not None else None
    if data_digest is None:
        return (*extract_features(encoder, dataset, layers=layers, **kwargs), False)
    wd = weights_digest or weights_fingerprint(encoder)
    key = hashlib.sha1(f"v{FEATURE_VERSION}:{wd}:{data_digest}:{layers}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return z["features"], z["labels"], True
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed and overwritten
    x, y = extract_features(encoder, dataset, layers=layers, **kwargs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, features=x, labels=y)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not cache features in {cache_dir}: {exc}", RuntimeWarning, stacklevel=2)
    return x, y, False



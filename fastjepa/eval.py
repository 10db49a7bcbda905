"""``python -m fastjepa.eval --checkpoint PATH [--random-init] [--output DIR] [--data embedded|imagefolder]``

Frozen-feature evaluation of an I-JEPA **target encoder**: a linear probe and a k-NN
classifier on held-out images, with the same architecture at random initialisation
beside them as the baseline. Writes ``DIR/eval.json``; accuracies are fractions in [0, 1].
``--encoder context`` evaluates the checkpoint's context encoder instead (a diagnostic).

Features. Each image is resized to the model's crop size (no augmentation), encoded by
the target encoder (the network the paper evaluates), and its output tokens are
average-pooled: (B, N, D) -> (B, D), as the paper's linear evaluation. ``--layers 4``
instead concatenates the pooled tokens of the last four blocks, each passed through the
encoder's final LayerNorm, (B, 4·D). Features are extracted once, in batches, and cached
on disk keyed by a digest of the weights, of the data and of the settings, so a second
evaluation of the same checkpoint (or the same random init) costs only the probe.

Linear probe: scikit-learn's ``LogisticRegression`` (L-BFGS, multinomial, L2) on
standardised features. Why this and not a PyTorch probe trained by SGD:

* it is a convex problem solved to convergence by a well-kept library: no learning rate,
  epochs or batch size to tune, the same answer on every run and every machine;
* standardising (zero mean, unit variance per feature, fitted on the training split)
  puts every feature on the same scale, so L-BFGS converges in tens of iterations and the
  single L2 strength ``C`` means the same thing for any encoder width or layer. Raw ViT
  features have a few channels orders of magnitude larger than the rest; without it the
  solver crawls and the penalty mostly ignores the small channels;
* ``C`` is picked from a short grid on a held-out fifth of the training features, then
  the probe is refitted on all of them (``--C`` fixes it instead).

At the feature sizes this evaluation is meant for (up to ~10^5 images × a few thousand
dimensions) it runs in seconds to minutes on a CPU; for ImageNet-scale probes use a
GPU-trained probe instead.

k-NN: cosine similarity between L2-normalised raw features, the k = 20 nearest training
images vote with weight ``exp(sim / T)``, T = 0.07 (the weighted k-NN of Wu et al. 2018
and DINO).

Checkpoints: a fastjepa checkpoint carries its resolved config (``ckpt["fastjepa"]["config"]``),
which builds the model. A reference I-JEPA checkpoint (keys ``encoder``, ``predictor``,
``target_encoder``, with or without ``module.``) has no config: the architecture comes
from ``--config`` and ``section.key=value`` overrides, or, without them, is read off the
weights' shapes (width, depth, patch, image size, MLP ratio; the head count is the
standard one for that width). ``--random-init`` evaluates only the random initialisation
(the run's own step-0 weights: ``meta.seed`` seeds them exactly as training does).
An encoder exported with ``python -m fastjepa.checkpoint export`` (``.safetensors``) is
rebuilt from the architecture in its metadata. Checkpoints are opened weights-only (no
code in a file runs); ``--trust-checkpoint`` opens one that needs more, with a warning.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .checkpoint import SAFETENSORS_SUFFIX, CheckpointError, atomic_write_text, read_checkpoint, strip_module_prefix
from .config import ConfigError, load_config, merge, validate

FEATURE_VERSION = 1  # bump when the feature definition changes (invalidates caches)
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
KNN_K = 20
KNN_T = 0.07
QUICK_TRAIN = 1000  # quick_probe: training images used (all 1,000 held-out images are scored)


class EvalError(RuntimeError):
    """A problem with the evaluation's inputs, with what to do about it."""


# -- models


def random_init_encoder(cfg: dict) -> nn.Module:
    """The target encoder exactly as training initialises it (``meta.seed``), without
    touching the global RNG."""
    from .trainer import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["meta"]["seed"])
        return build_model(cfg).target_encoder


def _build_encoder(cfg: dict) -> nn.Module:
    from .trainer import build_model

    return build_model(cfg).target_encoder


def infer_architecture(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Encoder settings read off a state dict's shapes: ``{model_name, model_kwargs,
    patch_size, crop_size}``. The head count cannot be read from weights; the standard
    one for the width is used."""
    from .models import VIT_SIZES

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
    cfg["meta"]["model_name"], cfg["meta"]["model_kwargs"] = arch["model_name"], arch["model_kwargs"]
    cfg["data"]["crop_size"], cfg["mask"]["patch_size"] = arch["crop_size"], arch["patch_size"]
    cfg["mask"]["min_keep"] = 0  # evaluation samples no masks; keep any grid size valid
    return _apply_overrides(cfg, overrides)


def _apply_overrides(cfg: dict, overrides: Sequence[str]) -> dict:
    from .config import parse_override

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
    encoder = _build_encoder(cfg)
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
    from .checkpoint import ENCODER_FORMAT, check_architecture, read_safetensors

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
    encoder = _build_encoder(cfg)
    if ours:
        check_architecture(path, meta, encoder)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{path}: its tensors do not fit the encoder built from {source} ({_describe(cfg)}): "
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
    from .data import ImageFolder, build_dataset

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
    from .data import EmbeddedMNIST, ImageFolder

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


# -- probes


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    C: float | None = None,
    grid: Iterable[float] = C_GRID,
    max_iter: int = 1000,
    quiet: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Logistic regression on standardised features (see the module docstring for why).

    ``C=None`` picks the L2 strength from ``grid`` on a stratified fifth of the training
    features, then refits on all of them. Returns ``{top1, C, converged, grid_scores}``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    def fit(clf, x, y):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(x, y)
        return not any(issubclass(w.category, ConvergenceWarning) for w in caught)

    grid = tuple(sorted(grid))
    scores: dict[str, float] = {}
    # One BLAS thread: the problem is small, and on a shared or busy CPU a multi-threaded
    # BLAS inside L-BFGS's many tiny steps runs 10-50x slower than one thread.
    with threadpool_limits(limits=1):
        if C is None:
            counts = np.bincount(train_y)
            stratify = train_y if counts[counts > 0].min() >= 5 else None
            a_x, b_x, a_y, b_y = train_test_split(train_x, train_y, test_size=0.2, random_state=seed, stratify=stratify)
            sc = StandardScaler().fit(a_x)
            a_x, b_x = sc.transform(a_x), sc.transform(b_x)
            path = LogisticRegression(max_iter=max_iter, warm_start=True)  # weaker to stronger fits reuse the last solution
            for c in tqdm(grid, desc="linear probe: choosing C", disable=quiet, leave=False):
                fit(path.set_params(C=c), a_x, a_y)
                scores[repr(c)] = float((path.predict(b_x) == b_y).mean())
            C = max(grid, key=lambda c: (scores[repr(c)], -c))  # ties: the stronger penalty
        sc = StandardScaler().fit(train_x)
        clf = LogisticRegression(C=C, max_iter=max_iter)
        converged = fit(clf, sc.transform(train_x), train_y)
        top1 = float((clf.predict(sc.transform(val_x)) == val_y).mean())
    return {"top1": top1, "C": float(C), "converged": converged, "grid_scores": scores}


def knn_classify(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    val_x: np.ndarray | torch.Tensor,
    *,
    k: int = KNN_K,
    temperature: float = KNN_T,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN predictions (n_val,): cosine similarity, the ``k`` nearest training
    features vote for their label with weight ``exp(sim / temperature)``."""
    tx = torch.nn.functional.normalize(torch.as_tensor(train_x).float(), dim=1)  # (n_train, F)
    ty = torch.as_tensor(train_y).long()  # (n_train,)
    vx = torch.nn.functional.normalize(torch.as_tensor(val_x).float(), dim=1)  # (n_val, F)
    num_classes = int(num_classes or int(ty.max()) + 1)
    k = min(k, tx.size(0))
    preds = []
    for start in range(0, vx.size(0), chunk):
        sim = vx[start : start + chunk] @ tx.T  # (c, n_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (c, k)
        weights = (top_sim / temperature).exp()  # (c, k)
        votes = torch.zeros(sim.size(0), num_classes)  # (c, classes)
        votes.scatter_add_(1, ty[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def effective_rank(features) -> float:
    """exp(entropy) of the normalised singular values of the centred features (Roy &
    Vetterli, 2007): 1 when every image maps onto one line, ``min(n, dim)`` when all
    directions are used equally. A falling value over training is dimensional collapse —
    the pooled features spanning fewer directions — which the probe numbers only show later.
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features: expected (n >= 2, dim), got {tuple(x.shape)}")
    s = torch.linalg.svdvals(x - x.mean(dim=0))
    if float(s.sum()) == 0.0:
        return 0.0  # every image gives the same features: nothing spanned
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def knn_top1(train_x, train_y, val_x, val_y, **kwargs) -> float:
    pred = knn_classify(train_x, train_y, val_x, **kwargs)
    return float((pred == torch.as_tensor(val_y).long()).double().mean())


def evaluate_encoder(
    encoder: nn.Module,
    train: Dataset,
    val: Dataset,
    *,
    layers: int = 1,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    cache_dir: Path | None = None,
    C: float | None = None,
    quiet: bool = True,
    name: str = "model",
) -> dict[str, Any]:
    """Features (cached), linear probe and k-NN for one encoder."""
    t0 = time.perf_counter()
    digest = weights_fingerprint(encoder) if cache_dir is not None else None
    common = dict(layers=layers, cache_dir=cache_dir, weights_digest=digest, batch_size=batch_size, device=device, quiet=quiet)
    tx, ty, hit_a = cached_features(encoder, train, desc=f"{name}: train features", **common)
    vx, vy, hit_b = cached_features(encoder, val, desc=f"{name}: held-out features", **common)
    t1 = time.perf_counter()
    num_classes = int(max(ty.max(), vy.max())) + 1
    probe = linear_probe(tx, ty, vx, vy, C=C, quiet=quiet)
    knn = knn_top1(tx, ty, vx, vy, num_classes=num_classes)
    return {
        "linear_probe_top1": probe["top1"],
        "knn_top1": knn,
        "linear_probe_C": probe["C"],
        "linear_probe_converged": probe["converged"],
        "linear_probe_grid": probe["grid_scores"],
        "feature_dim": int(tx.shape[1]),
        "feature_effective_rank": effective_rank(vx),  # held-out images; see effective_rank()
        "features_cached": bool(hit_a and hit_b),
        "feature_time_s": round(t1 - t0, 3),
        "probe_time_s": round(time.perf_counter() - t1, 3),
    }


# -- reporting


def _score_lines(rows: list[tuple[str, dict[str, Any]]], width: int) -> list[str]:
    """A header and one line per encoder: linear probe, k-NN and (when known) effective rank."""
    lines = [f"{'':{width}}  linear probe   k-NN (k={KNN_K})   eff. rank"]
    for name, r in rows:
        erank = r.get("feature_effective_rank")
        erank = f"{erank:12.1f}" if erank is not None else f"{'':12}"
        lines.append(f"{name:{width}}  {100 * r['linear_probe_top1']:10.1f} %  {100 * r['knn_top1']:10.1f} %{erank}")
    return lines


def format_table(result: dict[str, Any], baseline: dict[str, Any] | None, label: str) -> str:
    rows = [(label, result)]
    if baseline is not None and baseline is not result:
        rows.append(("random init", baseline))
    width = max(len(r[0]) for r in rows + [("difference", None)])
    lines = _score_lines(rows, width)
    if len(rows) == 2:
        d_lin = 100 * (result["linear_probe_top1"] - baseline["linear_probe_top1"])
        d_knn = 100 * (result["knn_top1"] - baseline["knn_top1"])
        lines.append(f"{'difference':{width}}  {d_lin:+10.1f} pt {d_knn:+10.1f} pt")
    return "\n".join(lines)


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _model_summary(cfg: dict) -> dict[str, Any]:
    return {
        "model_name": cfg["meta"]["model_name"],
        "model_kwargs": cfg["meta"]["model_kwargs"],
        "patch_size": cfg["mask"]["patch_size"],
        "crop_size": cfg["data"]["crop_size"],
        "seed": cfg["meta"]["seed"],
    }


# -- quick probe at the end of training


def quick_probe(
    run_dir: str | os.PathLike, cfg: dict, *, quiet: bool | None = None, cache_dir: Path | None = None
) -> dict[str, Any]:
    """The end-of-training check on the embedded digits: the run's latest target encoder
    and its own random initialisation, linear probe and k-NN, trained on the first 1,000
    training digits and scored on the 1,000 held-out ones. Writes ``run_dir/eval.json``;
    returns the dict (with ``random_init`` inside). ``python -m fastjepa.eval`` uses all
    4,000 training digits and is the number to quote.

    About 10–20 s on a 2-core CPU for the default model; the random-init features are
    cached, so later runs of the same architecture and seed pay only for the trained ones.
    """
    run_dir = Path(run_dir)
    quiet = (not sys.stderr.isatty()) if quiet is None else quiet
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    ckpt_path = run_dir / f"{cfg['logging']['write_tag']}-latest.pth.tar"
    encoder = _build_encoder(cfg)
    ckpt = read_checkpoint(ckpt_path)
    if "target_encoder" not in ckpt:
        raise CheckpointError(f"checkpoint {ckpt_path} has no 'target_encoder'")
    try:
        encoder.load_state_dict(strip_module_prefix(ckpt["target_encoder"]), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {ckpt_path}: 'target_encoder' does not fit the config's model: {exc}") from None
    train, val, desc = eval_datasets(cfg, "embedded")
    train = _limit(train, QUICK_TRAIN)
    common = dict(layers=1, cache_dir=cache_dir, quiet=quiet)
    t0 = time.perf_counter()
    result = evaluate_encoder(encoder, train, val, name="trained", **common)
    baseline = evaluate_encoder(random_init_encoder(cfg), train, val, name="random init", **common)
    out = {
        **result,
        "random_init": baseline,
        "checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "evaluated": "checkpoint",
        "quick": True,
        "data": {"name": "embedded", "description": desc, "n_train": len(train), "n_val": len(val)},
        "model": _model_summary(cfg),
        "layers": 1,
        "knn": {"k": KNN_K, "temperature": KNN_T},
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    _write_json(run_dir / "eval.json", out)
    print(format_table(result, baseline, f"epoch {ckpt.get('epoch')}"), file=sys.stderr, flush=True)
    return out


# -- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastjepa.eval",
        description="Linear probe and k-NN on frozen target-encoder features, beside the random-init baseline.",
        epilog="example: python -m fastjepa.eval --checkpoint runs/a/jepa-latest.pth.tar --output runs/a/eval",
    )
    p.add_argument(
        "--checkpoint",
        help="a fastjepa checkpoint, a reference I-JEPA one (keys encoder/predictor/target_encoder), or an encoder "
        "exported to .safetensors (python -m fastjepa.checkpoint export); opened weights-only",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="open a checkpoint that needs more than a weights-only load (it can run code: only for files you trust)",
    )
    p.add_argument("--random-init", action="store_true", help="evaluate the random initialisation only (the baseline)")
    p.add_argument(
        "--encoder",
        choices=tuple(ENCODER_KEYS),
        default="target",
        help="which network of the checkpoint: the target encoder (default; the paper's protocol) or the context "
        "encoder (diagnostic: does the student collapse before the EMA target does?)",
    )
    p.add_argument(
        "--epochs",
        help="evaluate a run's per-epoch checkpoints (<tag>-ep<N>.pth.tar in --checkpoint's folder, or --checkpoint "
        "itself when it is a run folder): 'all' or a list like 1,2,5; one row per epoch, with the effective rank "
        "that shows collapse (train with logging.checkpoint_freq=1 to keep every epoch)",
    )
    p.add_argument("--output", help="folder for eval.json (default: the checkpoint's folder, else eval/)")
    p.add_argument(
        "--data", choices=("embedded", "imagefolder"), help="evaluation data (default: embedded, or the config's image folders)"
    )
    p.add_argument("--train-dir", help="imagefolder: training images, <class>/<image>")
    p.add_argument("--val-dir", help="imagefolder: held-out images, same class folders")
    p.add_argument("--config", help="YAML config for the architecture (needed for --random-init without a checkpoint)")
    p.add_argument(
        "--layers", type=int, choices=(1, 4), default=1, help="pooled tokens of the last layer, or the last 4 concatenated"
    )
    p.add_argument("--C", type=float, help=f"fix the probe's inverse L2 strength (default: picked from {list(C_GRID)})")
    p.add_argument("--batch-size", type=int, default=256, help="images per feature-extraction batch")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--limit-train", type=int, help="use only the first N training images")
    p.add_argument("--limit-val", type=int, help="use only the first N held-out images")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--cache-dir", help="feature cache folder (default: $FASTJEPA_CACHE/features or ~/.cache/fastjepa/features)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    p.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides (architecture of a reference checkpoint)"
    )
    return p.parse_intermixed_args(argv)  # options may come between the overrides


def _eval_setup(args: argparse.Namespace, cfg: dict, quiet: bool) -> tuple[Dataset, Dataset, str, dict[str, Any]]:
    """The command line's data (limited as asked) and the keyword arguments of :func:`evaluate_encoder`."""
    from .trainer import pick_device

    train, val, desc = eval_datasets(cfg, args.data, args.train_dir, args.val_dir)
    train, val = _limit(train, args.limit_train), _limit(val, args.limit_val)
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    common = dict(
        layers=args.layers,
        device=pick_device(args.device, "--device {}"),
        batch_size=args.batch_size,
        cache_dir=cache_dir,
        C=args.C,
        quiet=quiet,
    )
    return train, val, desc, common


def _encoder_note(args: argparse.Namespace) -> str:
    """What a table row adds to its label when the context encoder was asked for."""
    return ", context encoder" if args.encoder == "context" else ""


def _run_fields(args: argparse.Namespace, cfg: dict, desc: str, train: Dataset, val: Dataset, t0: float) -> dict[str, Any]:
    """The eval.json fields every command-line evaluation writes: data, model, settings, time."""
    return {
        "data": {"name": args.data or "auto", "description": desc, "n_train": len(train), "n_val": len(val)},
        "model": _model_summary(cfg),
        "layers": args.layers,
        "encoder": "random_init" if args.random_init else args.encoder,
        "knn": {"k": KNN_K, "temperature": KNN_T},
        "quick": False,
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }


_EPOCH_FILE = re.compile(r"^(?P<tag>.+)-ep(?P<epoch>\d+)\.pth\.tar$")


def epoch_checkpoints(where: str | os.PathLike, epochs: str) -> list[tuple[int, Path]]:
    """The per-epoch checkpoints of a run, ``[(epoch, path)]`` in epoch order.

    ``where``: the run folder, or any checkpoint inside it. ``epochs``: ``"all"`` or a
    comma-separated list of epoch numbers, each of which must have a checkpoint.
    """
    where = Path(where)
    folder = where if where.is_dir() else where.parent
    if not folder.is_dir():
        raise EvalError(f"--epochs: {where} is neither a run folder nor a checkpoint inside one")
    found: dict[int, Path] = {}
    for path in sorted(folder.glob("*-ep*.pth.tar")):
        m = _EPOCH_FILE.match(path.name)
        if m:
            found.setdefault(int(m["epoch"]), path)
    if not found:
        raise EvalError(
            f"--epochs: {folder} holds no <tag>-ep<N>.pth.tar checkpoints; a run keeps one every "
            "logging.checkpoint_freq epochs (train with logging.checkpoint_freq=1 to keep them all)"
        )
    if epochs.strip().lower() == "all":
        return sorted(found.items())
    try:
        wanted = sorted({int(e) for e in epochs.split(",") if e.strip()})
    except ValueError:
        raise EvalError(f"--epochs={epochs!r}: expected 'all' or epoch numbers like 1,2,5") from None
    missing = [e for e in wanted if e not in found]
    if missing or not wanted:
        raise EvalError(
            f"--epochs={epochs!r}: no checkpoint for epoch(s) {missing or wanted} in {folder}; it has {sorted(found)}"
        )
    return [(e, found[e]) for e in wanted]


def format_epochs(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One line per encoder (random init, then each epoch): linear probe, k-NN and effective rank."""
    return "\n".join(_score_lines(rows, max(len(name) for name, _ in rows)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet = args.quiet or not sys.stderr.isatty()
    if args.epochs is not None:
        return run_epochs(args, quiet)
    if args.checkpoint is not None and Path(args.checkpoint).is_dir():
        raise EvalError(
            f"--checkpoint {args.checkpoint} is a folder: pass one of its .pth.tar files, or add --epochs all "
            "to evaluate each epoch's checkpoint"
        )
    if args.checkpoint is None and not args.random_init:
        raise EvalError("no --checkpoint given: pass --checkpoint runs/<run>/jepa-latest.pth.tar, or --random-init --config FILE")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        hint = Path(args.checkpoint)
        near = sorted(hint.parent.glob("*.pth.tar")) if hint.parent.is_dir() else []
        also = f" ({hint.parent} holds: {', '.join(p.name for p in near[:5])})" if near else ""
        raise EvalError(
            f"checkpoint {args.checkpoint} does not exist{also}: pass the .pth.tar a training run wrote "
            "(e.g. runs/<run>/jepa-latest.pth.tar), or --random-init --config FILE for the baseline alone"
        )
    info: dict[str, Any] = {}
    if args.checkpoint is not None:
        encoder, cfg, info = load_target_encoder(args.checkpoint, args.config, args.overrides, args.encoder, trust=args.trust_checkpoint)
    else:
        cfg, encoder = load_config(args.config, args.overrides), None
    train, val, desc, common = _eval_setup(args, cfg, quiet)
    print(f"fastjepa.eval: {_describe(cfg)} on {desc}, {common['device']}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    baseline = None
    if args.random_init or not args.no_baseline:
        baseline = evaluate_encoder(random_init_encoder(cfg), train, val, name="random init", **common)
    if args.random_init:
        result, label = baseline, "random init"
    else:
        result = evaluate_encoder(encoder, train, val, name="checkpoint", **common)
        label = f"checkpoint (epoch {info.get('epoch')}{_encoder_note(args)})"
    out: dict[str, Any] = {
        **result,
        "random_init": baseline,
        "evaluated": "random_init" if args.random_init else "checkpoint",
        "checkpoint": info or None,
        **_run_fields(args, cfg, desc, train, val, t0),
    }
    output = Path(args.output) if args.output else (Path(args.checkpoint).parent if args.checkpoint else Path("eval"))
    _write_json(output / "eval.json", out)
    print(format_table(result, baseline, label), flush=True)
    print(f"fastjepa.eval: wrote {output / 'eval.json'}", file=sys.stderr, flush=True)
    return out


def run_epochs(args: argparse.Namespace, quiet: bool) -> dict[str, Any]:
    """``--epochs``: every chosen epoch's encoder (``--encoder``), and the random init, in one table."""
    if args.checkpoint is None or args.random_init:
        raise EvalError("--epochs needs --checkpoint RUN_FOLDER (or a checkpoint in it), and not --random-init")
    chosen = epoch_checkpoints(args.checkpoint, args.epochs)
    t0 = time.perf_counter()
    trust = args.trust_checkpoint
    encoder, cfg, info = load_target_encoder(chosen[0][1], args.config, args.overrides, args.encoder, trust=trust)  # its config: data, baseline
    train, val, desc, common = _eval_setup(args, cfg, quiet)
    print(
        f"fastjepa.eval: {_describe(cfg)} on {desc}, {common['device']}, epochs {[e for e, _ in chosen]}",
        file=sys.stderr,
        flush=True,
    )
    rows: list[tuple[str, dict[str, Any]]] = []
    if not args.no_baseline:
        rows.append(("random init", evaluate_encoder(random_init_encoder(cfg), train, val, name="random init", **common)))
    per_epoch: list[dict[str, Any]] = []
    for i, (epoch, path) in enumerate(chosen):
        if i:  # the first one is loaded above
            encoder, _, info = load_target_encoder(path, args.config, args.overrides, args.encoder, trust=trust)
        result = evaluate_encoder(encoder, train, val, name=f"epoch {epoch}", **common)
        rows.append((f"epoch {epoch}{_encoder_note(args)}", result))
        per_epoch.append({"epoch": epoch, **result, "checkpoint": info})
    baseline = rows[0][1] if not args.no_baseline else None
    out: dict[str, Any] = {
        **per_epoch[-1],  # the top-level numbers are the last chosen epoch's
        "epochs": per_epoch,
        "random_init": baseline,
        "evaluated": "epochs",
        **_run_fields(args, cfg, desc, train, val, t0),
    }
    folder = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    output = Path(args.output) if args.output else folder
    _write_json(output / "eval.json", out)
    print(format_epochs(rows), flush=True)
    print(f"fastjepa.eval: wrote {output / 'eval.json'}", file=sys.stderr, flush=True)
    return out


def _describe(cfg: dict) -> str:
    kw = cfg["meta"]["model_kwargs"]
    extra = f" {kw}" if kw else ""
    return f"{cfg['meta']['model_name']}{extra}, patch {cfg['mask']['patch_size']}, {cfg['data']['crop_size']} px"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (EvalError, CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"fastjepa.eval: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

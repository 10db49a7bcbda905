"""The evaluation images and their frozen features (definitions: docs/eval.md)."""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..encoder import EvalError

FEATURE_VERSION = 1  # bump when the feature definition changes (invalidates caches)


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


def limit(ds: Dataset, n: int | None) -> Dataset:
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

    ``layers=1``: the encoder's output (after its final LayerNorm), mean over tokens
    (``forward_head(forward_features(x), pre_logits=True)``).
    ``layers=4``: the last four blocks' outputs, each through the final LayerNorm, pooled
    and concatenated, last block last (``get_intermediate_layers(x, 4, norm=True)``).
    """
    depth = len(encoder.blocks)
    if layers not in (1, 4) or layers > depth:
        raise EvalError(f"--layers {layers}: expected 1 or 4 (at most the encoder depth, {depth})")
    encoder = encoder.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels = [], []
    t0, seen = time.perf_counter(), 0
    with _progress(len(dataset), desc, quiet) as bar:
        for imgs, y in loader:
            imgs = imgs.to(device, non_blocking=True)  # (B, C, H, W)
            if layers == 1:
                f = encoder.forward_head(encoder.forward_features(imgs), pre_logits=True)  # (B, D)
            else:
                f = torch.cat([h.mean(dim=1) for h in encoder.get_intermediate_layers(imgs, layers, norm=True)], dim=1)  # (B, layers·D)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).long())
            seen += imgs.size(0)
            bar.update(imgs.size(0))
            bar.set_postfix(img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
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



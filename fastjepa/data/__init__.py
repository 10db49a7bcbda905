"""Data sources: the embedded MNIST-5k default, ImageNet-style folders, synthetic."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from .decode import batch_to_device, resolve_decode
from .embedded import EmbeddedMNIST, load_mnist_arrays
from .folder import ImageFolder, NoReadableImage, SyntheticImages
from .transforms import RandomResizedCrop

DATASETS = ("embedded", "imagefolder", "synthetic")


def build_dataset(
    data_cfg: dict, *, split: str = "train", train_transform: bool = True, device: torch.device | str | None = None
) -> Dataset:
    """The dataset named by ``data.dataset`` (``embedded`` | ``imagefolder`` | ``synthetic``).

    For ``imagefolder`` the training images are ``root_path/image_folder`` (as the
    reference) and ``split="val"`` reads ``data.val_folder`` when set. ``data.fast_decode``
    picks the decoder (``fastjepa.data.decode``). With ``device`` (the trainer's), an
    image folder yields uint8 crops — or, for ``data.decode=gpu``/``auto`` where nvjpeg
    can run, encoded files — that ``batch_to_device`` finishes on that device; without
    it, normalised float crops. The embedded and synthetic datasets yield floats either way.
    """
    kind = data_cfg.get("dataset", "embedded")
    crop, scale = int(data_cfg["crop_size"]), tuple(data_cfg.get("crop_scale", (0.3, 1.0)))
    flip = bool(data_cfg.get("use_horizontal_flip", False))
    if kind == "embedded":
        return EmbeddedMNIST(split, crop_size=crop, crop_scale=scale, train_transform=train_transform, hflip=flip)
    if kind == "imagefolder":
        root = os.path.join(data_cfg.get("root_path") or "", data_cfg.get("image_folder") or "")
        if split == "val":
            if not data_cfg.get("val_folder"):
                raise ValueError("data.val_folder is not set: an imagefolder evaluation needs a held-out folder")
            root = os.path.join(data_cfg.get("root_path") or "", data_cfg["val_folder"])
        fast = bool(data_cfg.get("fast_decode", True))
        if device is None:
            return ImageFolder(root, crop_size=crop, crop_scale=scale, train_transform=train_transform, hflip=flip, fast_decode=fast)
        decode = resolve_decode(data_cfg.get("decode", "cpu"), device)
        return ImageFolder(
            root, crop_size=crop, crop_scale=scale, train_transform=train_transform, hflip=flip, fast_decode=fast, output="uint8", decode=decode
        )
    if kind == "synthetic":
        return SyntheticImages(int(data_cfg.get("synthetic_samples", 1024)), crop_size=crop, seed=0 if split == "train" else 1)
    raise ValueError(f"data.dataset={kind!r}: expected one of {', '.join(DATASETS)}")


def cores_per_process() -> int:
    """CPU cores this process may use: its affinity set (``os.sched_getaffinity``) shared
    among the ``LOCAL_WORLD_SIZE`` processes torchrun starts on the node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(local, 1))


def loader_options(data_cfg: dict, dataset: Dataset, device: torch.device | str) -> dict:
    """DataLoader settings from ``data.*`` and the machine.

    ``data.num_workers=auto``: 0 for the in-memory datasets (embedded, synthetic: a worker
    costs more than it saves), else one worker per core of this process but one, the main
    process's (at most 32). Pinned memory when ``data.pin_mem`` and the device is CUDA;
    ``prefetch_factor`` keeps at least 8 batches in flight. ``persistent_workers`` stays off:
    the trainer makes a loader per epoch and each epoch's crop and mask seeds reach the
    workers when they are forked (the fork costs milliseconds against a multi-minute epoch).
    """
    workers = data_cfg.get("num_workers", "auto")
    if workers == "auto":
        workers = 0 if isinstance(dataset, (EmbeddedMNIST, SyntheticImages)) else min(32, cores_per_process() - 1)
    workers = int(workers)
    opts = {"num_workers": workers, "pin_memory": bool(data_cfg.get("pin_mem", True)) and torch.device(device).type == "cuda"}
    if workers > 0:
        opts.update(prefetch_factor=max(2, -(-8 // workers)), persistent_workers=False)
    return opts


__all__ = ["DATASETS", "EmbeddedMNIST", "ImageFolder", "NoReadableImage", "RandomResizedCrop", "SyntheticImages", "batch_to_device", "build_dataset",
           "cores_per_process", "load_mnist_arrays", "loader_options", "resolve_decode"]  # fmt: skip

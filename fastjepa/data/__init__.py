"""Data sources: the embedded MNIST-5k default, ImageNet-style folders, synthetic."""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from .embedded import EmbeddedMNIST, load_mnist_arrays
from .folder import ImageFolder, SyntheticImages
from .transforms import RandomResizedCrop

DATASETS = ("embedded", "imagefolder", "synthetic")


def build_dataset(data_cfg: dict, *, split: str = "train", train_transform: bool = True) -> Dataset:
    """The dataset named by ``data.dataset`` (``embedded`` | ``imagefolder`` | ``synthetic``).

    For ``imagefolder`` the training images are ``root_path/image_folder`` (as the
    reference) and ``split="val"`` reads ``data.val_folder`` when set.
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
        return ImageFolder(root, crop_size=crop, crop_scale=scale, train_transform=train_transform, hflip=flip)
    if kind == "synthetic":
        return SyntheticImages(int(data_cfg.get("synthetic_samples", 1024)), crop_size=crop, seed=0 if split == "train" else 1)
    raise ValueError(f"data.dataset={kind!r}: expected one of {', '.join(DATASETS)}")


__all__ = ["DATASETS", "EmbeddedMNIST", "ImageFolder", "RandomResizedCrop", "SyntheticImages", "build_dataset", "load_mnist_arrays"]

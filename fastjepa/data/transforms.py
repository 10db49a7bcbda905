"""Image transforms without torchvision: RandomResizedCrop + normalisation.

The reference trains with ``RandomResizedCrop(crop_size, scale=crop_scale)`` (aspect
ratio 3/4–4/3, bilinear), ``ToTensor`` and ImageNet normalisation — nothing else in the
published configs. torchvision is not a dependency (its wheels pin a torch build), so
the crop-box sampling is written here, following the usual definition.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area at aspect ``ratio``.

    Ten tries at a random area and log-uniform aspect; then a centre crop clamped to the
    ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target_area = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[2] * (height - h + 1))
            left = int(u[3] * (width - w + 1))
            return min(top, height - h), min(left, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCrop:
    """Crop a random box and resize it to ``size``² (bilinear). Works on PIL images and
    on (C, H, W) float tensors."""

    def __init__(self, size: int, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

    def __call__(self, img, generator: torch.Generator | None = None):
        if isinstance(img, Image.Image):
            top, left, h, w = sample_crop_box(img.height, img.width, self.scale, self.ratio, generator)
            return img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        top, left, h, w = sample_crop_box(img.shape[-2], img.shape[-1], self.scale, self.ratio, generator)
        crop = img[..., top : top + h, left : left + w].unsqueeze(0)  # (1, C, h, w)
        return F.interpolate(crop, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)[0]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class SeededAugment:
    """Per-sample augmentation randomness that is a function of (seed, epoch, index), so
    crops do not depend on loader workers and a resumed run sees the same images."""

    aug_seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = int(epoch)
        if seed is not None:
            self.aug_seed = int(seed)

    def sample_generator(self, index: int) -> torch.Generator:
        from ..rng import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.aug_seed, self.epoch, index, 0xC809))


def maybe_flip(img: torch.Tensor, flip: bool, generator: torch.Generator) -> torch.Tensor:
    if flip and torch.rand(1, generator=generator).item() < 0.5:
        return img.flip(-1)
    return img


class Normalize:
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

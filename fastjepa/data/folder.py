"""ImageNet-layout image folders (``root/class_x/xxx.jpg``) read with Pillow.

A corrupt, truncated or non-image file is skipped: one warning names the file, a
counter shared with the loader workers counts it, the sample is replaced by the next
readable one, and the trainer reports the count at the end of each epoch.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .transforms import Normalize, RandomResizedCrop, SeededAugment, maybe_flip, to_tensor

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(SeededAugment, Dataset):
    """Images under ``root/<class>/``, labelled by sorted class-folder name."""

    def __init__(
        self, root: str | os.PathLike, crop_size: int = 224, crop_scale=(0.3, 1.0), train_transform: bool = True, hflip: bool = False
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (set data.root_path and data.image_folder)")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        samples: list[tuple[str, int]] = []
        if classes:
            for label, cls in enumerate(classes):
                for dirpath, _, files in sorted(os.walk(root / cls, followlinks=True)):
                    for f in sorted(files):
                        if f.lower().endswith(IMG_EXTENSIONS):
                            samples.append((os.path.join(dirpath, f), label))
        else:  # a flat folder of images: one class
            classes = [root.name]
            samples = [(str(p), 0) for p in sorted(root.iterdir()) if p.suffix.lower() in IMG_EXTENSIONS]
        if not samples:
            raise FileNotFoundError(
                f"image folder {root} holds no images (expected {root}/<class>/<image> with one of {', '.join(IMG_EXTENSIONS)})"
            )
        self.root, self.classes, self.samples = root, classes, samples
        self.crop = RandomResizedCrop(crop_size, scale=crop_scale) if train_transform else None
        self.crop_size = int(crop_size)
        self.normalize = Normalize()
        self.hflip = hflip and train_transform
        # one flag per sample in memory shared with the loader workers (forked each epoch), so
        # a bad file is warned about and counted once per run, whichever process meets it
        self._bad = multiprocessing.Value("i", 0)
        self._bad_flags = multiprocessing.Array("b", len(samples), lock=False)  # guarded by _bad's lock

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files met so far (across loader workers and epochs)."""
        return self._bad.value

    def _load(self, index: int) -> Image.Image | None:
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            with self._bad.get_lock():
                first = not self._bad_flags[index]
                if first:
                    self._bad_flags[index] = 1
                    self._bad.value += 1
            if first:
                warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
            return None

    def __getitem__(self, i: int):
        for step in range(len(self.samples)):
            index = (i + step) % len(self.samples)
            label = self.samples[index][1]
            img = self._load(index)
            if img is not None:
                break
        else:
            raise RuntimeError(f"no readable image in {self.root}")
        if self.crop is None:
            img = img.resize((self.crop_size, self.crop_size), Image.BILINEAR)
            return self.normalize(to_tensor(img)), label
        g = self.sample_generator(i)
        return self.normalize(maybe_flip(to_tensor(self.crop(img, g)), self.hflip, g)), label


class SyntheticImages(Dataset):
    """Random images of any size (for benchmarks); sample ``i`` is the same every epoch."""

    def __init__(self, num_samples: int, crop_size: int = 224, num_classes: int = 10, seed: int = 0):
        if num_samples < 1:
            raise ValueError(f"data.synthetic_samples={num_samples}: expected >= 1")
        self.num_samples, self.crop_size, self.num_classes, self.seed = int(num_samples), int(crop_size), num_classes, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        img = torch.randn(3, self.crop_size, self.crop_size, generator=g)
        return img, i % self.num_classes

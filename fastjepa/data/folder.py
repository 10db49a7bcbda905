"""ImageNet-layout image folders (``root/class_x/xxx.jpg``) read with Pillow.

A corrupt, truncated or non-image file is skipped: one warning names the file, a
counter shared with the loader workers counts it, the sample is replaced by the next
readable one, and the trainer reports the count at the end of each epoch. The same holds
on every decode path (reference, fast, GPU): a file is unreadable when Pillow cannot
read it.

``output="float"`` returns the normalised float crop (what evaluation and the tools use);
``output="uint8"`` returns ``(crop uint8 (3, S, S), label, flip)`` for the trainer, which
finishes the batch on its device (``batch_to_device``); ``decode="gpu"`` returns the
encoded file and its crop box instead (see ``fastjepa.data.decode``).
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .decode import RAW, is_plain_jpeg, normalize_uint8, read_crop
from .transforms import Normalize, RandomResizedCrop, SeededAugment, maybe_flip, sample_crop_box, to_tensor

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
OUTPUTS = ("float", "uint8")


class NoReadableImage(ValueError):
    """Every file of an image folder failed to read."""


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _Walk:
    """Image files under folders, following symbolic links but never into a real folder
    twice (a link to ``.`` or ``..`` would otherwise loop, and two links to each other
    branch without end) and never counting a real file twice; what it passes over is
    kept in ``skipped`` (paths of links to a folder already walked, a file already
    counted, or nothing)."""

    def __init__(self):
        self.seen_dirs: set[tuple[int, int]] = set()
        self.seen_files: set[tuple[int, int]] = set()
        self.skipped: list[str] = []

    def images(self, folder: Path, recurse: bool = True) -> list[str]:
        """The image files under ``folder`` in ``sorted(os.walk(...))`` order (by folder
        path, then file name)."""
        try:
            st = os.stat(folder)
        except OSError:
            self.skipped.append(str(folder))
            return []
        if _key(st) in self.seen_dirs:
            self.skipped.append(str(folder))
            return []
        self.seen_dirs.add(_key(st))
        listing: list[tuple[str, list[tuple[str, tuple[int, int]]]]] = []
        stack = [str(folder)]
        while stack:
            top = stack.pop()
            try:
                entries = sorted(os.scandir(top), key=lambda e: e.name)
            except OSError:
                continue
            files = []
            for e in entries:
                try:
                    st = e.stat()  # follows links
                except OSError:  # a link to nothing
                    if e.is_symlink():
                        self.skipped.append(e.path)
                    continue
                if e.is_dir():
                    if not recurse:
                        continue
                    if _key(st) in self.seen_dirs:
                        self.skipped.append(e.path)
                        continue
                    self.seen_dirs.add(_key(st))
                    stack.append(e.path)
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    files.append((e.path, _key(st)))
            listing.append((top, files))
        found: list[str] = []
        for _, files in sorted(listing):
            for path, key in files:
                if key in self.seen_files:
                    self.skipped.append(path)
                    continue
                self.seen_files.add(key)
                found.append(path)
        return found


class ImageFolder(SeededAugment, Dataset):
    """Images under ``root/<class>/``, labelled by sorted class-folder name."""

    def __init__(
        self,
        root: str | os.PathLike,
        crop_size: int = 224,
        crop_scale=(0.3, 1.0),
        train_transform: bool = True,
        hflip: bool = False,
        *,
        fast_decode: bool = True,
        output: str = "float",
        decode: str = "cpu",
    ):
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}: expected one of {', '.join(map(repr, OUTPUTS))}")
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode={decode!r}: expected 'cpu' or 'gpu' (resolve data.decode=auto with resolve_decode)")
        if decode == "gpu" and output != "uint8":
            raise ValueError("decode='gpu' ships encoded files to the device: it needs output='uint8'")
        self.fast_decode, self.output, self.decode = bool(fast_decode), output, decode
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (set data.root_path and data.image_folder)")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        samples: list[tuple[str, int]] = []
        walk = _Walk()
        if classes:
            walk.seen_dirs.add(_key(os.stat(root)))  # a link back to the root is a loop
            for label, cls in enumerate(classes):
                samples.extend((path, label) for path in walk.images(root / cls))
        else:  # a flat folder of images: one class
            classes = [root.name]
            samples = [(path, 0) for path in walk.images(root, recurse=False)]
        self.skipped_links = walk.skipped
        if walk.skipped:
            example = walk.skipped[0]
            warnings.warn(
                f"image folder {root}: skipped {len(walk.skipped)} link(s) to a folder already walked, a file already "
                f"counted or nothing (e.g. {example}); each real folder is walked once and each real file counted once",
                RuntimeWarning,
                stacklevel=2,
            )
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

    def _skip(self, index: int, exc: BaseException) -> None:
        """Count ``index`` as unreadable and warn about it, once per run across workers."""
        with self._bad.get_lock():
            first = not self._bad_flags[index]
            if first:
                self._bad_flags[index] = 1
                self._bad.value += 1
        if first:
            path = self.samples[index][0]
            warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)

    def _load(self, index: int) -> Image.Image | None:
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except UNREADABLE as exc:
            self._skip(index, exc)
            return None

    def _box_sampler(self, g: torch.Generator | None):
        if self.crop is None:  # evaluation: the whole image, resized
            return lambda height, width: (0, 0, height, width)
        return lambda height, width: sample_crop_box(height, width, self.crop.scale, self.crop.ratio, g)

    def _candidates(self, i: int):
        """Sample ``i``, then the next ones, until a readable file (each yielded with its label)."""
        for step in range(len(self.samples)):
            index = (i + step) % len(self.samples)
            yield index, self.samples[index]
        raise NoReadableImage(
            f"no readable image in {self.root}: all {len(self.samples)} image file(s) failed to open or decode "
            f"(first: {self.samples[0][0]})"
        )

    def cpu_crop(self, i: int) -> tuple[torch.Tensor, int, torch.Generator]:
        """(uint8 (3, S, S) crop, label, the sample's generator after its box draws) of sample
        ``i`` or the next readable one, decoded on the CPU (fast or reference path)."""
        for index, (path, label) in self._candidates(i):
            g = self.sample_generator(i)
            if not self.fast_decode:
                img = self._load(index)
                if img is None:
                    continue
                img = img.resize((self.crop_size, self.crop_size), Image.BILINEAR) if self.crop is None else self.crop(img, g)
                return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous(), label, g
            try:
                return read_crop(path, self._box_sampler(g), self.crop_size), label, g
            except UNREADABLE as exc:
                self._skip(index, exc)
        raise AssertionError("unreachable")

    def _flip(self, g: torch.Generator) -> bool:
        return self.hflip and torch.rand(1, generator=g).item() < 0.5

    def _gpu_item(self, i: int):
        """(encoded JPEG bytes, label, flip, box (4,) int64, i) for nvjpeg; a file it should not
        be given (not a plain JPEG, or truncated) is decoded here and shipped RAW-marked."""
        for index, (path, label) in self._candidates(i):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                self._skip(index, exc)
                continue
            hw = is_plain_jpeg(data)
            if hw is None:
                break  # decode on the CPU, from sample i (the bad files before it stay counted once)
            g = self.sample_generator(i)
            box = self._box_sampler(g)(*hw)
            return data, label, self._flip(g), torch.tensor(box, dtype=torch.int64), i
        img, label, g = self.cpu_crop(i)
        return RAW + img.numpy().tobytes(), label, self._flip(g), torch.zeros(4, dtype=torch.int64), i

    def __getitem__(self, i: int):
        if self.output == "float" and not self.fast_decode:  # the reference pipeline, unchanged
            for index, (_, label) in self._candidates(i):  # noqa: B007 (label is returned after the loop)
                img = self._load(index)
                if img is not None:
                    break
            if self.crop is None:
                img = img.resize((self.crop_size, self.crop_size), Image.BILINEAR)
                return self.normalize(to_tensor(img)), label
            g = self.sample_generator(i)
            return self.normalize(maybe_flip(to_tensor(self.crop(img, g)), self.hflip, g)), label
        if self.decode == "gpu":
            return self._gpu_item(i)
        img, label, g = self.cpu_crop(i)
        flip = self._flip(g)
        if self.output == "uint8":
            return img, label, flip
        return normalize_uint8(img[None], torch.tensor([flip]))[0], label


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

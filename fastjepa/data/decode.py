"""Decode only what the crop needs (``data.fast_decode``); finish batches on the device.

CPU fast path, per image (``read_crop``):

1. read the file's header only (its size) and sample the crop box on the full-size image
   with the same draws as the reference pipeline, so the box distribution — and the box
   for a given (seed, epoch, index) — is unchanged;
2. pick the DCT scale 1/s, s in {1, 2, 4, 8}: the largest with the box still at least the
   output size after the reduction (so s > 1 only when the box is >= 2x the output).
   libjpeg-turbo then runs its reduced inverse DCT and never makes the full-size pixels;
3. resample the box, mapped onto the reduced image (coordinates / s, fractional edges
   kept), to crop_size² with an antialiased bilinear filter, as uint8.

JPEGs are decoded with ``simplejpeg`` (libjpeg-turbo, bundled in its wheels) when it is
installed, otherwise with Pillow's ``draft`` (same libjpeg-turbo scaling); other formats
(and JPEGs simplejpeg refuses) go through Pillow. At s = 1 the result differs from the
reference only by the resampling code (torch's antialiased bilinear vs Pillow's: ~98% of
values identical, a few levels at most); at s > 1 the DCT-domain reduction does part of the
downscaling. The test bound
is PSNR >= 30 dB against the full-decode output (typically 40-60 dB).

Batches of uint8 crops reach the device as bytes (a quarter of float32's), and
``batch_to_device`` converts, flips and normalises them there. ``data.decode=gpu`` ships
the encoded files instead and decodes them with nvjpeg (``torchvision.io.decode_jpeg``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .transforms import IMAGENET_MEAN, IMAGENET_STD

DCT_SCALES = (1, 2, 4, 8)
RAW = b"FJRAW"  # marks a payload that is already a decoded (3, S, S) uint8 crop (GPU path fallback)

# what the GPU decode path did with the images it was given, in this process
_GPU_COUNTS = {"nvjpeg": 0, "cpu_fallback": 0, "raw": 0}


def gpu_decode_counts() -> dict[str, int]:
    """Images the GPU decode path has handled in this process: ``nvjpeg`` (decoded on the
    device), ``cpu_fallback`` (nvjpeg refused them: decoded on the CPU instead, one by one)
    and ``raw`` (not plain JPEGs: decoded by the loader worker, shipped as pixels). A
    benchmark or a run reads it twice and compares, to tell nvjpeg numbers from CPU ones."""
    return dict(_GPU_COUNTS)

_simplejpeg = None


def simplejpeg_module():
    """The ``simplejpeg`` module, or None when it is not installed (imported on first use)."""
    global _simplejpeg
    if _simplejpeg is None:
        try:
            import simplejpeg

            _simplejpeg = simplejpeg
        except ImportError:
            _simplejpeg = False
    return _simplejpeg or None


def dct_scale(h: int, w: int, size: int) -> int:
    """The largest s in (1, 2, 4, 8) with the (h, w) box still >= ``size`` at 1/s scale."""
    s = 1
    while s < 8 and min(h, w) >= 2 * s * size:
        s *= 2
    return s


class BoxOnce:
    """Sample the crop box once per image size: a decoder that fails after reading the
    header and hands the file to another decoder must not draw a second box."""

    def __init__(self, sample: Callable[[int, int], tuple[int, int, int, int]]):
        self.sample, self.key, self.box = sample, None, None

    def __call__(self, height: int, width: int) -> tuple[int, int, int, int]:
        if self.key != (height, width):
            self.key, self.box = (height, width), self.sample(height, width)
        return self.box


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 (read-only is fine) -> (3, H, W) uint8, one copy."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def resize_box(arr: np.ndarray, box: tuple[int, int, int, int], s: int, size: int) -> torch.Tensor:
    """(H/s, W/s, 3) uint8 image, full-size box (top, left, h, w) -> (3, size, size) uint8."""
    top, left, h, w = box
    if s == 1:  # integer box: torch's uint8 antialiased bilinear (the fastest resampler here)
        crop = torch.from_numpy(arr[top : top + h, left : left + w]).permute(2, 0, 1)[None]  # channels-last view
        out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return out[0].contiguous()
    # fractional box on the reduced image: Pillow resamples exactly that box
    img = Image.fromarray(arr)
    out = img.resize((size, size), Image.BILINEAR, box=(left / s, top / s, (left + w) / s, (top + h) / s))
    return _to_chw(np.asarray(out))


def _simplejpeg_crop(data: bytes, box: BoxOnce, size: int, reduce: bool) -> torch.Tensor | None:
    sj = simplejpeg_module()
    if sj is None or data[:2] != b"\xff\xd8":
        return None
    try:
        H, W, colorspace, _ = sj.decode_jpeg_header(data)
        if colorspace == "CMYK" or H * W > (Image.MAX_IMAGE_PIXELS or math.inf):
            return None  # Pillow's CMYK conversion and its decompression-bomb policy apply
        top, left, h, w = box(H, W)
        s = dct_scale(h, w, size) if reduce else 1
        arr = sj.decode_jpeg(data, colorspace="RGB", min_height=-(-H // s), min_width=-(-W // s), min_factor=s, strict=True)
    except ValueError:
        return None  # corrupt, truncated or unsupported: Pillow decides, as on the reference path
    if arr.shape[:2] != (-(-H // s), -(-W // s)):  # not the scale asked for: should not happen
        return None
    return resize_box(arr, (top, left, h, w), s, size)


def _pillow_crop(path: str, box: BoxOnce, size: int, reduce: bool) -> torch.Tensor:
    with Image.open(path) as img:
        W, H = img.size
        top, left, h, w = box(H, W)
        s = dct_scale(h, w, size) if reduce and img.format == "JPEG" else 1
        if s > 1:
            img.draft("RGB", (W // s, H // s))
            s = next((d for d in DCT_SCALES if img.size == (-(-W // d), -(-H // d))), None)
            if s is None:
                raise OSError(f"unexpected reduced JPEG size {img.size} from {W}x{H}")
        rgb = img.convert("RGB")
    out = rgb.resize((size, size), Image.BILINEAR, box=(left / s, top / s, (left + w) / s, (top + h) / s))
    return _to_chw(np.asarray(out))


def read_crop(path: str, sample_box: Callable[[int, int], tuple[int, int, int, int]], size: int, reduce: bool = True) -> torch.Tensor:
    """The (3, size, size) uint8 crop of the image at ``path``, its box drawn by
    ``sample_box(height, width)`` on the full-size image (once). Raises what Pillow raises
    for an unreadable file."""
    box = BoxOnce(sample_box)
    if path.lower().endswith((".jpg", ".jpeg")) and simplejpeg_module() is not None:
        with open(path, "rb") as f:
            data = f.read()
        out = _simplejpeg_crop(data, box, size, reduce)
        if out is not None:
            return out
    return _pillow_crop(path, box, size, reduce)


# -- the GPU decode path: workers ship the encoded file, the device decodes


def gpu_decode_unavailable(device: torch.device) -> str | None:
    """Why ``data.decode=gpu`` cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return f"the training device is {device}, not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401 — lazily: torchvision is optional
    except Exception as exc:  # ImportError, or a torchvision built for another torch failing to load
        return f"torchvision.io.decode_jpeg is not importable ({type(exc).__name__}: {exc})"
    return None


def resolve_decode(requested: str, device: torch.device | str | None) -> str:
    """``data.decode`` (cpu | gpu | auto) -> the path that will run ("cpu" or "gpu").
    Falling back from an explicit ``gpu`` prints the reason; so does ``auto`` on a CUDA
    device (a hint that installing torchvision would enable it)."""
    if requested not in ("cpu", "gpu", "auto"):
        raise ValueError(f"data.decode={requested!r}: expected 'cpu', 'gpu' or 'auto'")
    if requested == "cpu" or device is None:
        return "cpu"
    device = torch.device(device)
    reason = gpu_decode_unavailable(device)
    if reason is None:
        return "gpu"
    if (requested == "gpu" or device.type == "cuda") and int(os.environ.get("RANK", "0")) == 0:
        print(f"fastjepa: data.decode={requested}: decoding on the CPU: {reason}", file=sys.stderr, flush=True)
    return "cpu"


def is_plain_jpeg(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a baseline/progressive YCbCr or grey JPEG that ends with its EOI
    marker — what the GPU decoder is given; None for anything else (those are decoded on
    the CPU in the worker, where a truncated file is caught as on the CPU path)."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return None
    sj = simplejpeg_module()
    try:
        if sj is not None:
            H, W, colorspace, _ = sj.decode_jpeg_header(data)
            return (H, W) if colorspace in ("YCbCr", "Gray") else None
        import io

        with Image.open(io.BytesIO(data)) as img:
            return (img.height, img.width) if img.format == "JPEG" and img.mode in ("RGB", "L") else None
    except (ValueError, OSError, SyntaxError):
        return None


_STATS: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device.type, device.index)
    if key not in _STATS:
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, -1, 1, 1)
        _STATS[key] = (mean, std)
    return _STATS[key]


def normalize_uint8(imgs: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) uint8 (or float in 0..255) on its device -> float32 ``(x/255 - mean) / std``
    with the ImageNet statistics, rows with ``flips`` mirrored. The same float ops as the
    reference's to-tensor + normalise, so the values are bit-identical on the CPU."""
    x = imgs.float().div_(255.0) if imgs.dtype == torch.uint8 else imgs.float() / 255.0
    if flips is not None:
        x = torch.where(flips.view(-1, 1, 1, 1).to(torch.bool), x.flip(-1), x)
    mean, std = _stats(x.device)
    return (x - mean) / std


def _gpu_decode(payloads, boxes, indices, device, dataset) -> torch.Tensor:
    """Encoded JPEGs (and RAW-marked CPU crops) -> (B, 3, S, S) float in 0..255 on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    S = dataset.crop_size
    out = torch.empty(len(payloads), 3, S, S, device=device)
    enc = [i for i, p in enumerate(payloads) if not p.startswith(RAW)]
    for i in sorted(set(range(len(payloads))) - set(enc)):
        raw = torch.frombuffer(bytearray(payloads[i][len(RAW) :]), dtype=torch.uint8).view(3, S, S)
        out[i] = raw.to(device)
    _GPU_COUNTS["raw"] += len(payloads) - len(enc)
    tensors = [torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i in enc]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device) if tensors else []
    except (RuntimeError, TypeError, ValueError):  # a bad file fails the batch (or no batched API): one by one
        decoded = []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    for i, img in zip(enc, decoded):
        if img is None:  # the CPU path: skipped, warned and counted if unreadable there too
            _GPU_COUNTS["cpu_fallback"] += 1
            out[i] = dataset.cpu_crop(int(indices[i]))[0].to(device)
            continue
        _GPU_COUNTS["nvjpeg"] += 1
        top, left, h, w = (int(v) for v in boxes[i])
        crop = img[:, top : top + h, left : left + w].float()[None]
        out[i] = F.interpolate(crop, size=(S, S), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.round_().clamp_(0, 255)


def batch_to_device(udata, device: torch.device | str, dataset=None) -> torch.Tensor:
    """The collated images of ``udata`` (what the collator returns first) on ``device`` as
    the model's float32 (B, 3, H, W) input.

    Float batches (the embedded and synthetic datasets) are moved as they are. uint8
    batches (``imagefolder``: ``[imgs, labels, flips]``) are copied as bytes — pinned and
    non-blocking when the loader pins — then converted, flipped and normalised on the
    device. GPU-decode batches (``[payloads, labels, flips, boxes, indices]``) are decoded
    there; ``dataset`` (the ImageFolder) decodes on the CPU whatever nvjpeg refuses.
    """
    device = torch.device(device)
    imgs = udata[0] if isinstance(udata, (list, tuple)) else udata
    if isinstance(imgs, (list, tuple)):  # encoded payloads: the GPU decode path
        if dataset is None:
            raise ValueError("batch_to_device: a GPU-decode batch needs the dataset (for its crop size and CPU fallback)")
        _, _, flips, boxes, indices = udata
        return normalize_uint8(_gpu_decode(imgs, boxes, indices, device, dataset), flips.to(device, non_blocking=True))
    if imgs.dtype != torch.uint8:
        return imgs.to(device, non_blocking=True)
    flips = udata[2] if isinstance(udata, (list, tuple)) and len(udata) > 2 else None
    x = imgs.to(device, non_blocking=True)
    return normalize_uint8(x, None if flips is None else flips.to(device, non_blocking=True))

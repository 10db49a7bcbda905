"""``python -m fastjepa.masks --show [--config FILE] [--output PNG] [section.key=value ...]``

Draws one batch as training sees it — the config's dataset, crops and ``MaskCollator`` —
with the context block tinted blue and each target block in its own colour, in a grid
PNG. Blocks are outlined patch by patch, so the truncation of every mask to the
batch-wide shortest one (docs/design.md §4) shows as a block with a few patches missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

CONTEXT_COLOR = (40, 110, 240)
TARGET_COLORS = ((235, 60, 50), (250, 185, 10), (40, 170, 80), (170, 70, 190), (0, 180, 190), (240, 120, 30))
PAD = 8
LEGEND_H = 26


def panel_scale(img_size: int) -> int:
    """Integer upscaling so small images (MNIST's 32 px) are drawn at ~192 px."""
    return max(1, round(192 / img_size))


def grid_size(n: int, cols: int, img_size: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for ``n`` images of ``img_size`` in ``cols`` columns."""
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    panel = img_size * panel_scale(img_size)
    return cols * panel + (cols + 1) * PAD, LEGEND_H + rows * panel + (rows + 1) * PAD


def _to_rgb(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) normalised tensor -> (H, W, 3) float in [0, 1], min-max per image."""
    x = img.detach().float()
    x = x.expand(3, -1, -1) if x.size(0) == 1 else x[:3]
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / max(hi - lo, 1e-8)
    return x.permute(1, 2, 0).numpy()


def render_masks(
    images: torch.Tensor,
    masks_enc: Sequence[torch.Tensor],
    masks_pred: Sequence[torch.Tensor],
    patch_size: int,
    *,
    cols: int = 4,
    alpha: float = 0.45,
) -> Image.Image:
    """Grid of ``images`` (B, C, H, W) with context masks (nenc × (B, Kc)) and target masks
    (npred × (B, Kt)) drawn over them. Size: :func:`grid_size`."""
    B, _, H, W = images.shape
    if H != W:
        raise ValueError(f"images: expected square images, got {H}x{W}")
    gw = W // patch_size
    s = panel_scale(H)
    panel, cell = H * s, patch_size * s
    cols = max(1, min(cols, B))
    width, height = grid_size(B, cols, H)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def cells(idx: torch.Tensor):
        for i in idx.tolist():
            r, c = divmod(int(i), gw)
            yield r * cell, c * cell

    for b in range(B):
        rgb = np.kron(_to_rgb(images[b]), np.ones((s, s, 1)))  # (panel, panel, 3)
        for m in masks_enc:
            for y, x in cells(m[b]):
                rgb[y : y + cell, x : x + cell] = (1 - alpha) * rgb[y : y + cell, x : x + cell] + alpha * np.array(
                    CONTEXT_COLOR
                ) / 255
        for j, m in enumerate(masks_pred):
            color = np.array(TARGET_COLORS[j % len(TARGET_COLORS)]) / 255
            for y, x in cells(m[b]):
                rgb[y : y + cell, x : x + cell] = (1 - alpha) * rgb[y : y + cell, x : x + cell] + alpha * color
        tile = Image.fromarray((rgb * 255).round().clip(0, 255).astype(np.uint8))
        ox = PAD + (b % cols) * (panel + PAD)
        oy = LEGEND_H + PAD + (b // cols) * (panel + PAD)
        canvas.paste(tile, (ox, oy))
        for j, m in enumerate(masks_pred):  # outline every target patch so overlaps stay readable
            color = TARGET_COLORS[j % len(TARGET_COLORS)]
            for y, x in cells(m[b]):
                draw.rectangle((ox + x, oy + y, ox + x + cell - 1, oy + y + cell - 1), outline=color)

    # legend
    x = PAD
    kc, kt = masks_enc[0].size(1), masks_pred[0].size(1)
    entries = [(CONTEXT_COLOR, f"context ({kc})")] + [
        (TARGET_COLORS[j % len(TARGET_COLORS)], f"target {j + 1}") for j in range(len(masks_pred))
    ]
    for color, text in entries:
        draw.rectangle((x, 8, x + 12, 20), fill=color)
        draw.text((x + 16, 8), text, fill=(0, 0, 0))
        x += 16 + int(draw.textlength(text)) + 12
    draw.text((x, 8), f"({kt} patches each, {gw}x{gw} grid)", fill=(90, 90, 90))
    return canvas


def sample_batch(cfg: dict, num: int, batch_index: int = 0):
    """``num`` training images (with the training crops) and their masks, as the trainer draws them."""
    from ..data import build_dataset
    from .multiblock import MaskCollator

    data, meta = cfg["data"], cfg["meta"]
    dataset = build_dataset(data, split="train")
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0, seed=meta["seed"])
    collator = MaskCollator.from_config(cfg)
    collator.set_epoch(0, start_batch=batch_index)
    start = batch_index * num
    samples = [dataset[(start + i) % len(dataset)] for i in range(num)]
    udata, masks_enc, masks_pred = collator(samples)
    imgs = udata[0] if isinstance(udata, (list, tuple)) else udata
    return imgs, masks_enc, masks_pred


def main(argv=None) -> int:
    from ..config import ConfigError, load_config

    p = argparse.ArgumentParser(
        prog="python -m fastjepa.masks",
        description="Draw a batch's context (blue) and target blocks (other colours) over the images.",
        epilog="example: python -m fastjepa.masks --show --output masks.png mask.pred_mask_scale=[0.1,0.15]",
    )
    p.add_argument("--show", action="store_true", help="draw one batch to a PNG")
    p.add_argument("--config", help="YAML config (default: the packaged CPU config)")
    p.add_argument("--output", default="masks.png", help="PNG to write (default: masks.png)")
    p.add_argument("--num", type=int, default=8, help="images in the batch (the masks are sampled for this batch size)")
    p.add_argument("--cols", type=int, default=4, help="images per row")
    p.add_argument("--batch-index", type=int, default=0, help="which batch of epoch 0 to draw")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides, e.g. mask.num_pred_masks=2")
    args = p.parse_intermixed_args(argv)  # options may come between the overrides
    if not args.show:
        p.print_help()
        return 0
    if args.num < 1 or args.cols < 1:
        print(f"fastjepa.masks: --num {args.num} / --cols {args.cols}: expected positive integers", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        imgs, masks_enc, masks_pred = sample_batch(cfg, args.num, args.batch_index)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"fastjepa.masks: {exc}", file=sys.stderr)
        return 2
    image = render_masks(imgs, masks_enc, masks_pred, cfg["mask"]["patch_size"], cols=args.cols)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"{out} ({image.width}x{image.height}): {args.num} images, context {masks_enc[0].size(1)} patches, "
          f"{len(masks_pred)} targets of {masks_pred[0].size(1)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shape trace: one I-JEPA step, tensor by tensor (``python -m fastjepa.train --trace-shapes``).

It builds the model and one masked batch from the config, then walks the step of
docs/design.md §5 with the same ops the models use (``fastjepa.ops``, ``apply_masks``,
``repeat_interleave_batch``), printing each tensor's shape beside its symbolic form —
the walk-through people use to learn how I-JEPA's batched predictor lays out its rows.
At the end the traced prediction and loss are checked against the model's own forward.

Images are random (shapes do not depend on pixels); the batch is the config's
``data.batch_size``, capped at 8 on the CPU so that the trace of a large model stays quick.
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch
import torch.nn.functional as F

from . import ops
from .masks import MaskCollator, apply_masks, repeat_interleave_batch

CPU_BATCH_CAP = 8


class _Printer:
    def __init__(self, file: TextIO):
        self.file = file
        self.shapes: dict[str, tuple[int, ...]] = {}

    def section(self, title: str) -> None:
        print(f"\n-- {title}", file=self.file)

    def __call__(self, name: str, t: torch.Tensor, symbolic: str, note: str = "") -> torch.Tensor:
        shape = tuple(t.shape)
        self.shapes[name] = shape
        text = "(" + ", ".join(str(s) for s in shape) + ")"
        print(f"  {name:<38} {text:<20} {symbolic:<28} {note}".rstrip(), file=self.file)
        return t

    def line(self, text: str) -> None:
        print(f"  {text}", file=self.file)


def trace_shapes_from_config(cfg: dict, *, file: TextIO | None = None, batch_size: int | None = None) -> dict:
    """Run one step of the configured model on one masked batch and print the shapes.

    Returns ``{"shapes": {name: shape}, "loss": float, "max_abs_diff": float}`` and raises
    ``AssertionError`` if the traced computation differs from the model's forward.
    """
    from .build import build_model, pick_device

    out = _Printer(file or sys.stdout)
    data, mask, meta = cfg["data"], cfg["mask"], cfg["meta"]
    device = pick_device(meta["device"])
    B = batch_size or data["batch_size"]
    capped = batch_size is None and device.type == "cpu" and B > CPU_BATCH_CAP
    B = min(B, CPU_BATCH_CAP) if capped else B
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(meta["seed"])
        model = build_model(cfg).to(device)
        imgs = torch.randn(B, 3, data["crop_size"], data["crop_size"])
    collator = MaskCollator.from_config(cfg, compat="fastjepa", backend="python", generator=torch.Generator().manual_seed(meta["seed"]))
    (imgs, _), masks_enc, masks_pred = collator([(img, 0) for img in imgs])
    imgs = imgs.to(device)
    masks_enc = [m.to(device) for m in masks_enc]
    masks_pred = [m.to(device) for m in masks_pred]
    enc, pred, target = model.encoder, model.predictor, model.target_encoder
    nenc, npred = len(masks_enc), len(masks_pred)
    grid = enc.patch_embed.grid_size
    N, D, P = enc.patch_embed.num_patches, enc.embed_dim, pred.predictor_embed_dim
    Kc, Kt = masks_enc[0].size(1), masks_pred[0].size(1)

    print(
        f"I-JEPA shape trace: {meta['model_name']} (D={D}, depth {len(enc.blocks)}, {enc.num_heads} heads), "
        f"predictor P={P} depth {len(pred.predictor_blocks)}, patch {mask['patch_size']} on {data['crop_size']} px "
        f"-> {grid}x{grid} = N={N} patches",
        file=out.file,
    )
    cap_note = f" (data.batch_size={data['batch_size']}, capped at {CPU_BATCH_CAP} for the trace on the CPU)" if capped else ""
    print(f"B={B}{cap_note}, nenc={nenc} context mask(s) of Kc={Kc}, npred={npred} target masks of Kt={Kt}", file=out.file)

    out.section("batch")
    out("images", imgs, "(B, C, H, W)")
    for i, m in enumerate(masks_enc):
        out(f"masks_enc[{i}]", m, "(B, Kc)", "context patch indices (raster order)")
    for j, m in enumerate(masks_pred):
        out(f"masks_pred[{j}]", m, "(B, Kt)", "target patch indices")

    with torch.no_grad():
        out.section("target encoder (no grad, all N patches)")
        h = out("target_encoder(images)", target(imgs), "(B, N, D)")
        h = out("layer_norm(h)", F.layer_norm(h, (D,)), "(B, N, D)", "no affine, eps 1e-5")
        h = out("apply_masks(h, masks_pred)", apply_masks(h, masks_pred), "(npred·B, Kt, D)", "mask-major")
        h = out(
            "repeat_interleave_batch(h, B, nenc)", repeat_interleave_batch(h, B, repeat=nenc), "(npred·nenc·B, Kt, D)", "targets"
        )

    out.section("context encoder")
    x = out("patch_embed(images)", enc.patch_embed(imgs), "(B, N, D)", "Conv2d stride = patch, flattened")
    pos = out("pos_embed", enc.pos_embed.to(x.dtype), "(1, N, D)", "fixed 2-D sin-cos")
    x = out("gather(x + pos, masks_enc)", ops.gather_tokens(x, masks_enc, pos), "(nenc·B, Kc, D)", "after masking")
    for blk in enc.blocks:
        x = blk(x)
    out(f"after {len(enc.blocks)} blocks", x, "(nenc·B, Kc, D)")
    x = out("norm", enc.norm(x), "(nenc·B, Kc, D)", "context features")

    out.section("predictor")
    z0 = out("predictor_embed(x)", pred.predictor_embed(x), "(nenc·B, Kc, P)")
    ppos = pred.predictor_pos_embed.to(z0.dtype).repeat(B, 1, 1)  # (B, N, P)
    out("predictor_pos_embed, per image", ppos, "(B, N, P)")
    z = out("+ apply_masks(pos, masks_enc)", z0 + apply_masks(ppos, masks_enc), "(nenc·B, Kc, P)", "context at its positions")
    ctx = out("repeat(npred, 1, 1)", z.repeat(npred, 1, 1), "(npred·nenc·B, Kc, P)", "one copy per target block")
    pos_t = out("apply_masks(pos, masks_pred)", apply_masks(ppos, masks_pred), "(npred·B, Kt, P)")
    pos_t = out("repeat_interleave_batch(.., B, nenc)", repeat_interleave_batch(pos_t, B, repeat=nenc), "(npred·nenc·B, Kt, P)")
    mask_token = pred.mask_token.to(z.dtype)
    out("mask_token", mask_token, "(1, 1, P)", "one learned vector")
    tokens = out(
        "mask tokens = mask_token + pos", mask_token.repeat(pos_t.size(0), pos_t.size(1), 1) + pos_t, "(npred·nenc·B, Kt, P)"
    )
    seq = out("cat([context, mask tokens], 1)", torch.cat([ctx, tokens], dim=1), "(npred·nenc·B, Kc+Kt, P)", "row (j·nenc+i)·B+b")
    # the op the model calls builds this whole sequence in one pass: it must agree
    fused = ops.predictor_tokens(z0, masks_enc, masks_pred, pred.predictor_pos_embed.to(z0.dtype), mask_token)
    fused_diff = float((fused - seq).detach().abs().max())
    for blk in pred.predictor_blocks:
        seq = blk(seq)
    out(f"after {len(pred.predictor_blocks)} predictor blocks", seq, "(npred·nenc·B, Kc+Kt, P)")
    seq = pred.predictor_norm(seq)
    y = out("[:, Kc:] (pull the mask tokens)", seq[:, Kc:], "(npred·nenc·B, Kt, P)")
    y = out("predictor_proj", pred.predictor_proj(y), "(npred·nenc·B, Kt, D)", "predictions")

    out.section("loss")
    loss = ops.smooth_l1_loss(y, h)
    out("smooth_l1_loss(pred, targets)", loss, "()", f"= {loss.item():.6f}")
    loss.backward()
    loss = loss.detach()
    g = enc.patch_embed.proj.weight.grad
    out("grad of patch_embed.proj.weight", g, "(D, C, p, p)", "backward ran")

    # the same step through the model's own forward
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref_pred = model.forward_context(imgs, masks_enc, masks_pred)
        ref_loss = model(imgs, masks_enc, masks_pred)
    y = y.detach()
    diff = max(float((ref_pred - y).abs().max()), fused_diff)
    ok = (
        torch.allclose(ref_pred, y, rtol=1e-4, atol=1e-5)
        and fused_diff <= 1e-5
        and abs(float(ref_loss) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss)))
    )
    print(
        f"\ncheck: traced predictions and loss {'equal' if ok else 'DIFFER FROM'} the model's forward "
        f"(max |difference| {diff:.2e}; loss {float(loss):.6f} vs {float(ref_loss):.6f})",
        file=out.file,
    )
    if not ok:
        raise AssertionError(f"shape trace: the traced step differs from the model's forward by up to {diff:.3e}")
    return {"shapes": out.shapes, "loss": float(loss), "max_abs_diff": diff}

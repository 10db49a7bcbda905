"""Each codebase's own training step, original against ``fastjepa.integrations.<name>.apply()``.

::

    python benchmarks/bench_integrations.py --ijepa-root ~/ijepa --vjepa2-root ~/vjepa2 --mae-root ~/mae --quick
    python benchmarks/bench_integrations.py --vjepa2-root ~/vjepa2 --gpu          # the published shapes, bf16

The codebases are not part of fastjepa: pass the root of a checkout of each
(facebookresearch/ijepa, /vjepa2, /mae); one without a root, or whose imports fail
(MAE and V-JEPA 2 need ``timm``; V-JEPA 2 also ``einops``), is skipped with the reason.
Each codebase runs in its own subprocess (I-JEPA and V-JEPA 2 are both the package
``src``). In it, one step (forward + backward of encoder, predictor / decoder and loss; no
optimizer) runs on the same inputs and weights without and with ``apply()``, first checked
— loss and every gradient, the relative max difference printed — then timed, alternating
the two (``revert()`` / ``apply()``) so both see the same machine state.

CPU (default): tiny models that run in seconds. ``--gpu``: V-JEPA 2 ViT-L/16 at 256 px,
16 frames, tubelet 2 (2,048 tokens), predictor 384 wide, 12 heads, depth 12, batch 24,
masks of 8 blocks at 15 % and 2 blocks at 70 % of the frame; I-JEPA ViT-H/14 at 224 px,
predictor 384 / depth 12, batch 32; MAE ViT-L/16, batch 64; bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CODEBASES = ("ijepa", "vjepa2", "mae")


# -- one codebase, in its own process ----------------------------------------------------


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _grads(*models):
    return {f"{i}.{n}": p.grad.detach().float().clone() for i, m in enumerate(models) for n, p in m.named_parameters() if p.grad is not None}


def _compare(ref, new):
    (loss_a, g_a), (loss_b, g_b) = ref, new
    assert g_a.keys() == g_b.keys(), "the two steps have gradients for different parameters"
    worst_abs, worst_rel, worst_name = 0.0, 0.0, ""
    for k in g_a:
        d = (g_a[k] - g_b[k]).abs().max().item()
        scale = g_a[k].abs().max().item() or 1.0
        if d / scale > worst_rel:
            worst_abs, worst_rel, worst_name = d, d / scale, k
    return {
        "loss_original": loss_a, "loss_patched": loss_b, "loss_abs_diff": abs(loss_a - loss_b),
        "grad_max_abs_diff": worst_abs, "grad_max_rel_diff": worst_rel, "grad_worst_param": worst_name,
        "n_grads": len(g_a),
    }


def _setup_ijepa(torch, device, gpu, quick):
    import src.masks.multiblock as mb
    import src.masks.utils as mu
    import src.models.vision_transformer as vit
    import src.utils.tensors as tu
    import torch.nn.functional as F

    if gpu:
        img, patch, B, enc_kw = 224, 14, 32, dict(embed_dim=1280, depth=32, num_heads=16)
        pred_kw = dict(predictor_embed_dim=384, depth=12, num_heads=16)
        mask_kw = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), min_keep=10)
    else:
        img, patch, B, enc_kw = 96, 16, 4 if quick else 8, dict(embed_dim=96, depth=2 if quick else 4, num_heads=3)
        pred_kw = dict(predictor_embed_dim=48, depth=2, num_heads=3)
        mask_kw = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), min_keep=2)
    n = (img // patch) ** 2
    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    enc = vit.VisionTransformer(img_size=[img], patch_size=patch, mlp_ratio=4, qkv_bias=True, norm_layer=norm, **enc_kw).to(device)
    tgt = vit.VisionTransformer(img_size=[img], patch_size=patch, mlp_ratio=4, qkv_bias=True, norm_layer=norm, **enc_kw).to(device)
    tgt.load_state_dict(enc.state_dict())
    pred = vit.VisionTransformerPredictor(num_patches=n, embed_dim=enc_kw["embed_dim"], norm_layer=norm, **pred_kw).to(device)
    coll = mb.MaskCollator(input_size=(img, img), patch_size=patch, aspect_ratio=(0.75, 1.5), nenc=1, npred=4, allow_overlap=False, **mask_kw)
    _, masks_enc, masks_pred = coll([torch.zeros(1)] * B)  # drawn once, unpatched, shared by both steps
    masks_enc = [m.to(device) for m in masks_enc]
    masks_pred = [m.to(device) for m in masks_pred]
    imgs = torch.randn(B, 3, img, img, device=device)

    def step():
        for m in (enc, pred):
            m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            with torch.no_grad():
                h = F.layer_norm(tgt(imgs), (enc_kw["embed_dim"],))
                h = tu.repeat_interleave_batch(mu.apply_masks(h, masks_pred), B, repeat=len(masks_enc))
            z = pred(enc(imgs, masks_enc), masks_enc, masks_pred)
            loss = F.smooth_l1_loss(z, h)
        loss.backward()
        return loss.item(), _grads(enc, pred)

    def collate():
        return coll([torch.zeros(1)] * B)

    return step, {"batch": B, "tokens": n, "collate": collate}


def _setup_vjepa2(torch, device, gpu, quick):
    import src.masks.multiseq_multiblock3d as mm
    import src.masks.utils as mu
    import src.models.predictor as vp
    import src.models.vision_transformer as vit
    import torch.nn.functional as F

    use_rope = True
    if gpu:
        crop, patch, frames, B = 256, 16, 16, 24
        enc_kw = dict(embed_dim=1024, depth=24, num_heads=16)
        pred_kw = dict(predictor_embed_dim=384, depth=12, num_heads=12)
    else:
        crop, patch, frames, B = 64, 8, 4, 2 if quick else 4
        enc_kw = dict(embed_dim=96, depth=2 if quick else 4, num_heads=4)
        pred_kw = dict(predictor_embed_dim=64, depth=2, num_heads=4)
    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    common = dict(img_size=(crop, crop), patch_size=patch, num_frames=frames, tubelet_size=2, use_rope=use_rope)
    enc = vit.VisionTransformer(mlp_ratio=4, qkv_bias=True, norm_layer=norm, use_sdpa=True, **common, **enc_kw).to(device)
    tgt = vit.VisionTransformer(mlp_ratio=4, qkv_bias=True, norm_layer=norm, use_sdpa=True, **common, **enc_kw).to(device)
    tgt.load_state_dict(enc.state_dict())
    pred = vp.VisionTransformerPredictor(
        embed_dim=enc_kw["embed_dim"], use_mask_tokens=True, num_mask_tokens=2, norm_layer=norm, use_sdpa=True, **common, **pred_kw
    ).to(device)
    gens = [
        mm._MaskGenerator(crop_size=(crop, crop), num_frames=frames, spatial_patch_size=(patch, patch), temporal_patch_size=2,
                          spatial_pred_mask_scale=(s, s), temporal_pred_mask_scale=(1.0, 1.0), aspect_ratio=(0.75, 1.5), npred=nb)
        for s, nb in ((0.15, 8), (0.7, 2))
    ]
    masks = [g(B) for g in gens]  # (enc (B, Kc), pred (B, Kt)) per generator
    masks_enc = [m[0].to(device) for m in masks]
    masks_pred = [m[1].to(device) for m in masks]
    clips = torch.randn(B, 3, frames, crop, crop, device=device)

    def step():
        for m in (enc, pred):
            m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            with torch.no_grad():
                h = tgt(clips)
                h = F.layer_norm(h, (h.size(-1),))
            hs = mu.apply_masks(h, masks_pred, concat=False)  # the loss's call form
            loss = 0
            for i, (me, mp) in enumerate(zip(masks_enc, masks_pred)):
                z = pred(enc(clips, me), me, mp, mask_index=i)
                loss = loss + torch.mean(torch.abs(z - hs[i]))
            loss = loss / len(masks_enc)
        loss.backward()
        return loss.item(), _grads(enc, pred)

    return step, {"batch": B, "tokens": (frames // 2) * (crop // patch) ** 2, "rope": use_rope}


def _setup_mae(torch, device, gpu, quick):
    import models_mae

    if gpu:
        model, B, img = models_mae.mae_vit_large_patch16_dec512d8b(), 64, 224
    else:
        B, img = (4 if quick else 8), 64
        model = models_mae.MaskedAutoencoderViT(
            img_size=img, patch_size=8, embed_dim=96, depth=2 if quick else 4, num_heads=4, decoder_embed_dim=64,
            decoder_depth=1, decoder_num_heads=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        )
    model = model.to(device)
    imgs = torch.randn(B, 3, img, img, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1234)  # the masking noise: the same draw for both
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss, _, _ = model(imgs, mask_ratio=0.75)
        loss.backward()
        return loss.item(), _grads(model)

    return step, {"batch": B, "tokens": (img // (16 if gpu else 8)) ** 2}


def worker(name: str, root: str, gpu: bool, quick: bool, steps: int) -> dict:
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.abspath(root))
    import torch

    from fastjepa.integrations import ijepa, mae, vjepa2

    integration = {"ijepa": ijepa, "vjepa2": vjepa2, "mae": mae}[name]
    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    try:
        step, info = {"ijepa": _setup_ijepa, "vjepa2": _setup_vjepa2, "mae": _setup_mae}[name](torch, device, gpu, quick)
    except ImportError as exc:
        return {"codebase": name, "skipped": f"cannot import it from {root}: {exc}"}
    collate = info.pop("collate", None)

    ref = step()
    patched = integration.apply()
    new = step()
    result = {"codebase": name, "device": str(device), "dtype": "bf16 autocast" if gpu else "float32", "patched": patched, **info}
    result.update(_compare(ref, new))

    times = {"original": [], "patched": []}
    for _ in range(steps):
        for mode in ("original", "patched"):
            integration.revert() if mode == "original" else integration.apply()
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[mode].append(time.perf_counter() - t0)
    for mode, ts in times.items():
        result[f"{mode}_ms"] = 1e3 * statistics.median(ts[1:] if len(ts) > 1 else ts)  # the first is warm-up
    result["speedup"] = result["original_ms"] / result["patched_ms"]
    if collate is not None:  # I-JEPA's MaskCollator, original vs patched
        for mode in ("original", "patched"):
            integration.revert() if mode == "original" else integration.apply()
            t0 = time.perf_counter()
            for _ in range(5 * steps):
                collate()
            result[f"collate_{mode}_ms"] = 1e3 * (time.perf_counter() - t0) / (5 * steps)
    integration.revert()
    return result


# -- driver -------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in CODEBASES:
        p.add_argument(f"--{name}-root", default=None, help=f"root of a {name} checkout (skipped without it)")
    p.add_argument("--gpu", action="store_true", help="the published shapes on CUDA, bf16 autocast")
    p.add_argument("--quick", action="store_true", help="smallest models, 3 timed steps: seconds on a CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 3 quick, 10 otherwise)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_root", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)

    if args._worker:
        print(json.dumps(worker(args._worker, args._root, args.gpu, args.quick, steps)))
        return 0

    results = []
    for name in CODEBASES:
        root = getattr(args, f"{name.replace('-', '_')}_root")
        if root is None:
            results.append({"codebase": name, "skipped": f"no --{name}-root given"})
            continue
        if not os.path.isdir(root):
            results.append({"codebase": name, "skipped": f"--{name}-root {root} is not a directory"})
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", name, "--_root", root, "--steps", str(steps)]
        cmd += ["--gpu"] * args.gpu + ["--quick"] * args.quick
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
        if proc.returncode != 0:
            results.append({"codebase": name, "failed": proc.stderr.strip().splitlines()[-1:] or ["(no output)"]})
            print(proc.stderr, file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    for r in results:
        if "skipped" in r or "failed" in r:
            print(f"{r['codebase']:7s} {r.get('skipped') or r.get('failed')}")
            continue
        print(
            f"{r['codebase']:7s} {r['device']} {r['dtype']}: original {r['original_ms']:.1f} ms, patched {r['patched_ms']:.1f} ms, "
            f"x{r['speedup']:.2f}; loss {r['loss_original']:.8f} vs {r['loss_patched']:.8f} (|d| {r['loss_abs_diff']:.2e}), "
            f"grads max rel diff {r['grad_max_rel_diff']:.2e} over {r['n_grads']} tensors"
        )
        if "collate_original_ms" in r:
            print(f"        MaskCollator: original {r['collate_original_ms']:.2f} ms, patched {r['collate_patched_ms']:.2f} ms per batch")
        print(f"        patched: {', '.join(r['patched'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

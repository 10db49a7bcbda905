"""Stand-in for a user's training script, run as ``python train_script.py CODEBASE ORDER``.

Run as a script it is ``__main__``, and once ``multiprocessing`` is imported (torch does)
Python also lists it as ``__mp_main__``: the module-level ``apply_masks`` /
``repeat_interleave_batch`` below are the copies the reference's own ``src/train.py`` takes
with ``from … import``, reachable through two names of one module.

ORDER ``after``: the codebase is imported first (as the training script does), then
``fastjepa.integrations.CODEBASE.apply()``. ``before``: apply() sees only the model and mask
modules; the training module and this script's copies are imported after it. Either way
the step is compared with the unpatched one (before apply() or after revert()), and every
site, this script's included, must hold the original after ``revert()``. Prints one JSON line.
"""

import importlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CODEBASE, ORDER = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(HERE, CODEBASE))

import torch  # noqa: E402 — imports multiprocessing: this module is now also __mp_main__

integration = importlib.import_module(f"fastjepa.integrations.{CODEBASE}")
MODELS = {"ijepa": ("src.masks.utils", "src.models.vision_transformer"),
          "vjepa2": ("src.masks.utils", "src.models.vision_transformer", "src.models.predictor")}[CODEBASE]
TRAIN = {"ijepa": "src.train", "vjepa2": "app.vjepa.train"}[CODEBASE]


def import_training():
    global apply_masks, repeat_interleave_batch, train
    from src.masks.utils import apply_masks  # noqa: F401 — the copy src/train.py takes
    from src.utils.tensors import repeat_interleave_batch  # noqa: F401

    train = importlib.import_module(TRAIN)


def models():
    torch.manual_seed(0)
    vit = importlib.import_module("src.models.vision_transformer")
    if CODEBASE == "ijepa":
        kw = dict(img_size=[32], patch_size=8, embed_dim=24, depth=2, num_heads=2)
        enc, tgt = vit.VisionTransformer(**kw), vit.VisionTransformer(**kw)
        pred = vit.VisionTransformerPredictor(num_patches=16, embed_dim=24, predictor_embed_dim=20, depth=2, num_heads=2)
    else:
        predictor = importlib.import_module("src.models.predictor")
        kw = dict(img_size=(32, 32), patch_size=8, num_frames=4, tubelet_size=2, embed_dim=24, depth=2, num_heads=2, use_rope=True)
        enc, tgt = vit.VisionTransformer(**kw), vit.VisionTransformer(**kw)
        pred = predictor.VisionTransformerPredictor(num_patches=32, embed_dim=24, predictor_embed_dim=24, depth=2, num_heads=2, use_rope=True)
    tgt.load_state_dict(enc.state_dict())
    return enc, tgt, pred


def step(enc, tgt, pred):
    torch.manual_seed(1)
    if CODEBASE == "ijepa":
        B, N, x = 3, 16, torch.randn(3, 3, 32, 32)
        perm = torch.argsort(torch.rand(B, N), dim=1)
        ctx, targets = perm[:, :5].sort(1).values, [perm[:, 5 + 3 * i : 8 + 3 * i].sort(1).values for i in range(3)]
        masks_enc, masks_pred = [ctx], targets
    else:
        B, N, x = 2, 32, torch.randn(2, 3, 4, 32, 32)
        perm = torch.argsort(torch.rand(B, N), dim=1)
        masks_enc, masks_pred = [perm[:, :11].sort(1).values], [perm[:, 11:].sort(1).values]
    for m in (enc, pred):
        m.zero_grad(set_to_none=True)
    loss = train.loss_of(enc, tgt, pred, x, masks_enc, masks_pred)
    loss.backward()
    return loss.item(), [p.grad.clone() for m in (enc, pred) for p in m.parameters() if p.grad is not None]


def sites():
    """Every (module, name) holding one of the two functions, this script included."""
    import src.masks.utils as mu
    import src.utils.tensors as tu

    originals = {"apply_masks": getattr(mu.apply_masks, "__fastjepa_original__", mu.apply_masks),
                 "repeat_interleave_batch": getattr(tu.repeat_interleave_batch, "__fastjepa_original__", tu.repeat_interleave_batch)}
    mods = [sys.modules[n] for n in ("__main__", "src.masks.utils", "src.utils.tensors", TRAIN, *MODELS)]
    return originals, [(m, a) for m in mods for a in originals if a in vars(m)]


def main():
    for name in MODELS:
        importlib.import_module(name)
    if ORDER == "after":
        import_training()
        enc, tgt, pred = models()
        ref = step(enc, tgt, pred)
        patched = integration.apply()
        new = step(enc, tgt, pred)
    else:
        patched = integration.apply()
        import_training()
        enc, tgt, pred = models()
        new = step(enc, tgt, pred)
    main_patched = hasattr(sys.modules["__main__"].apply_masks, "__fastjepa_original__")
    restored = integration.revert()
    originals, held = sites()
    not_restored = [f"{m.__name__}.{a}" for m, a in held if vars(m)[a] is not originals[a]]
    if ORDER == "before":
        ref = step(enc, tgt, pred)
    same = ref[0] == new[0] and len(ref[1]) == len(new[1]) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ref[1], new[1]))
    aliases = [n for n, m in sys.modules.items() if m is sys.modules["__main__"]]
    print(json.dumps({"patched": patched, "restored": restored, "main_patched": main_patched, "not_restored": not_restored,
                      "same_step": bool(same), "loss": [ref[0], new[0]], "main_aliases": aliases}))


if __name__ == "__main__":
    main()

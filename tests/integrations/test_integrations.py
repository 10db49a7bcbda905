"""fastjepa.integrations.{ijepa,vjepa2,mae}: apply() / revert() on stand-in codebases.

The stand-ins (tests/integrations/fake_codebases/) reproduce the module paths, names and call forms of
the pieces the integrations patch. Each test puts one on sys.path in a fixture and takes
it off afterwards. Checked: a float32 CPU training step gives the same loss and gradients
with and without apply() (models built before and after it), the list of what was
patched, that revert() restores the very same objects, idempotence, the flags, and the
refusal when the imported ``src`` is another codebase.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastjepa.integrations import ijepa as fj_ijepa
from fastjepa.integrations import mae as fj_mae
from fastjepa.integrations import vjepa2 as fj_vjepa2
from fastjepa.integrations._patching import CodebaseMismatch, PatchSet, function_patches, replaces
from fastjepa.ops import available


def _sized_sampler() -> bool:
    if not available()["cpp"]:
        return False
    from fastjepa import _C  # noqa: F401

    return hasattr(torch.ops.fastjepa, "sample_masks_sized")


HAS_SAMPLER = _sized_sampler()
FAKES = Path(__file__).parent / "fake_codebases"
TOPS = ("src", "app", "models_mae")


@contextlib.contextmanager
def codebase(name: str, *modules: str):
    """Import ``modules`` of the stand-in ``name``; restore sys.path / sys.modules after."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in TOPS}
    for k in saved:
        del sys.modules[k]
    path = str(FAKES / name)
    sys.path.insert(0, path)
    try:
        yield [importlib.import_module(m) for m in modules]
    finally:
        for integration in (fj_ijepa, fj_vjepa2, fj_mae):
            integration.revert()
        sys.path.remove(path)
        for k in [k for k in sys.modules if k.split(".")[0] in TOPS]:
            del sys.modules[k]
        sys.modules.update(saved)


def grads_of(*models):
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(models) for n, p in m.named_parameters() if p.grad is not None}


def assert_same_step(ref, new):
    (loss_ref, g_ref), (loss_new, g_new) = ref, new
    torch.testing.assert_close(loss_new, loss_ref)
    assert g_ref.keys() == g_new.keys() and g_ref
    for k in g_ref:
        torch.testing.assert_close(g_new[k], g_ref[k], msg=lambda m, k=k: f"{k}: {m}")


def disjoint_masks(B, N, sizes):
    """Per row, disjoint sorted index sets of the given sizes (context and targets)."""
    perm = torch.argsort(torch.rand(B, N), dim=1)
    out, start = [], 0
    for k in sizes:
        out.append(perm[:, start : start + k].sort(dim=1).values)
        start += k
    return out


# -- I-JEPA --------------------------------------------------------------------------------

IJEPA_MODULES = ("src.masks.utils", "src.utils.tensors", "src.models.vision_transformer", "src.masks.multiblock", "src.train")


def ijepa_models(vit):
    torch.manual_seed(0)
    enc = vit.VisionTransformer(img_size=[32], patch_size=8, embed_dim=24, depth=2, num_heads=2)
    tgt = vit.VisionTransformer(img_size=[32], patch_size=8, embed_dim=24, depth=2, num_heads=2)
    tgt.load_state_dict(enc.state_dict())
    pred = vit.VisionTransformerPredictor(num_patches=16, embed_dim=24, predictor_embed_dim=20, depth=2, num_heads=2)
    return enc, tgt, pred


def ijepa_step(train, enc, tgt, pred, imgs, masks_enc, masks_pred):
    for m in (enc, pred):
        m.zero_grad(set_to_none=True)
    loss = train.loss_of(enc, tgt, pred, imgs, masks_enc, masks_pred)
    loss.backward()
    return loss.detach(), grads_of(enc, pred)


def test_ijepa_step_matches_and_patched_list():
    with codebase("ijepa", *IJEPA_MODULES) as (utils, tensors, vit, multiblock, train):
        enc, tgt, pred = ijepa_models(vit)
        B = 3
        imgs = torch.randn(B, 3, 32, 32)
        ctx, *targets = disjoint_masks(B, 16, [5, 3, 3, 3])  # three target masks (npred = 3)
        masks_enc = [ctx, ctx.flip(1).sort(1).values[:, :5]]  # two context masks (nenc = 2)
        ref = ijepa_step(train, enc, tgt, pred, imgs, masks_enc, targets)
        x_probe = torch.randn(2, 5, 24)
        scores_ref = enc.blocks[0](x_probe, return_attention=True)

        patched = fj_ijepa.apply()
        assert patched == [
            "src.masks.utils.apply_masks",
            "src.models.vision_transformer.apply_masks",
            "src.train.apply_masks",
            "src.utils.tensors.repeat_interleave_batch",
            "src.models.vision_transformer.repeat_interleave_batch",
            "src.train.repeat_interleave_batch",
            "src.models.vision_transformer.VisionTransformer.forward",
            "src.models.vision_transformer.VisionTransformerPredictor.forward",
            "src.models.vision_transformer.Attention.forward",
            "src.models.vision_transformer.Block.forward",
        ] + (["src.masks.multiblock.MaskCollator.__call__"] if HAS_SAMPLER else [])
        assert vit.apply_masks is utils.apply_masks and hasattr(vit.apply_masks, "__fastjepa_original__")
        # built before apply(): the class was patched in place
        assert type(enc).forward.__fastjepa_original__ is not None
        assert_same_step(ref, ijepa_step(train, enc, tgt, pred, imgs, masks_enc, targets))
        # built after apply()
        enc2, tgt2, pred2 = ijepa_models(vit)
        assert_same_step(ref, ijepa_step(train, enc2, tgt2, pred2, imgs, masks_enc, targets))
        # return_attention still gives the scores
        torch.testing.assert_close(enc.blocks[0](x_probe, return_attention=True), scores_ref)


def test_ijepa_revert_restores_the_same_objects_and_apply_twice():
    with codebase("ijepa", *IJEPA_MODULES) as (utils, tensors, vit, multiblock, train):
        pairs = [(utils, "apply_masks"), (vit, "apply_masks"), (train, "apply_masks"),
                 (tensors, "repeat_interleave_batch"), (vit, "repeat_interleave_batch"),
                 (vit.VisionTransformer, "forward"), (vit.VisionTransformerPredictor, "forward"),
                 (vit.Attention, "forward"), (vit.Block, "forward"), (multiblock.MaskCollator, "__call__")]
        before = {(o, a): vars(o)[a] for o, a in pairs}
        first = fj_ijepa.apply()
        second = fj_ijepa.apply()  # reverts, then patches again: one call's state
        assert first == second == fj_ijepa.patched()
        assert vars(utils)["apply_masks"].__fastjepa_original__ is before[(utils, "apply_masks")]
        assert fj_ijepa.revert() == second
        for (o, a), obj in before.items():
            assert vars(o)[a] is obj, a
        assert fj_ijepa.patched() == [] and fj_ijepa.revert() == []


def test_ijepa_flags_patch_only_their_piece():
    with codebase("ijepa", *IJEPA_MODULES) as (utils, tensors, vit, multiblock, train):
        original_fwd = vars(vit.VisionTransformer)["forward"]
        got = fj_ijepa.apply(apply_masks=False, repeat_interleave_batch=False, predictor=False, attention=False, mask_collator=False)
        assert got == ["src.models.vision_transformer.VisionTransformer.forward"]
        assert vars(vit.VisionTransformer)["forward"] is not original_fwd
        assert not hasattr(utils.apply_masks, "__fastjepa_original__")


def test_ijepa_falls_back_outside_the_fast_path():
    """A bare tensor mask (the original iterates its rows) goes to the original."""
    with codebase("ijepa", "src.masks.utils") as (utils,):
        x, m = torch.randn(2, 6, 4), torch.randint(0, 6, (2, 3))
        expected = utils.apply_masks(x, m)
        fj_ijepa.apply()
        torch.testing.assert_close(utils.apply_masks(x, m), expected)


def test_ijepa_refuses_vjepa2_and_nothing_imported():
    with codebase("vjepa2", "src.masks.utils", "src.models.vision_transformer"):
        with pytest.raises(CodebaseMismatch, match=r"not the I-JEPA reference code \(facebookresearch/ijepa\): src.masks.utils: expected apply_masks\(x, masks\), found apply_masks\(x, masks, concat\)"):
            fj_ijepa.apply()
    with codebase("vjepa2"):
        with pytest.raises(CodebaseMismatch, match=r"nothing of the I-JEPA reference code \(facebookresearch/ijepa\) is imported: expected at least one of src.masks.utils.*found no module named .src. imported"):
            fj_ijepa.apply()


@pytest.mark.skipif(not HAS_SAMPLER, reason="needs fastjepa._C with sample_masks_sized")
def test_ijepa_mask_collator_has_the_reference_distribution():
    """Patched collator (C++) vs fastjepa's Python reference procedure (compat='reference').

    Same counter -> the same block sizes batch for batch (target length h·w equal); target
    corners (a target's first index) pooled over batches: two-sample chi-square; context
    lengths: means within 5 standard errors (the batch as the unit); no block ever reaches
    the last row or column (the reference's exclusive corner range)."""
    from fastjepa.masks import MaskCollator as FJCollator

    cfg = dict(input_size=(64, 64), patch_size=8, enc_mask_scale=(0.5, 0.7), pred_mask_scale=(0.1, 0.25),
               aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=2, allow_overlap=False)
    H = W = 8
    n_batches, B = 120, 8
    with codebase("ijepa", "src.masks.multiblock") as (multiblock,):
        fj_ijepa.apply(apply_masks=False, repeat_interleave_batch=False, encoder=False, predictor=False, attention=False)
        patched = multiblock.MaskCollator(**cfg)
        reference = FJCollator(**cfg, compat="reference", backend="python")
        corners = {"patched": torch.zeros(H * W), "reference": torch.zeros(H * W)}
        ctx_len = {"patched": [], "reference": []}
        pred_len = {"patched": [], "reference": []}
        for _ in range(n_batches):
            for name, coll in (("patched", patched), ("reference", reference)):
                _, enc, pred = coll([torch.zeros(1)] * B)
                assert len(enc) == 1 and len(pred) == 4 and all(m.dtype == torch.int64 and m.shape[0] == B for m in enc + pred)
                for m in enc + pred:
                    assert int(((m // W) == H - 1).sum()) == 0 and int(((m % W) == W - 1).sum()) == 0
                for m in pred:
                    corners[name] += torch.bincount(m[:, 0], minlength=H * W).float()
                ctx_len[name].append(enc[0].size(1))
                pred_len[name].append(pred[0].size(1))
        assert pred_len["patched"] == pred_len["reference"]  # the same h x w, batch for batch
        a, b = corners["patched"], corners["reference"]
        keep = (a + b) >= 10
        stat = (((a - b) ** 2) / (a + b))[keep].sum().item()  # equal totals: two-sample chi-square
        dof = int(keep.sum()) - 1
        assert stat < dof + 7 * (2 * dof) ** 0.5, (stat, dof)
        la, lb = torch.tensor(ctx_len["patched"], dtype=torch.float64), torch.tensor(ctx_len["reference"], dtype=torch.float64)
        se = ((la.var() + lb.var()) / n_batches).sqrt().item()
        assert abs(la.mean().item() - lb.mean().item()) <= 5 * se + 1e-9, (la.mean(), lb.mean(), se)


# -- V-JEPA 2 -----------------------------------------------------------------------------

VJEPA_MODULES = ("src.masks.utils", "src.utils.tensors", "src.models.vision_transformer", "src.models.predictor", "app.vjepa.train")


def vjepa_models(vit, predictor, use_rope):
    torch.manual_seed(0)
    kw = dict(img_size=(32, 32), patch_size=8, num_frames=4, tubelet_size=2, embed_dim=24, depth=2, num_heads=2, use_rope=use_rope)
    enc, tgt = vit.VisionTransformer(**kw), vit.VisionTransformer(**kw)
    tgt.load_state_dict(enc.state_dict())
    pred = predictor.VisionTransformerPredictor(num_patches=32, embed_dim=24, predictor_embed_dim=24, depth=2, num_heads=2, use_rope=use_rope)
    return enc, tgt, pred


def vjepa_step(train, enc, tgt, pred, clips, masks_enc, masks_pred):
    for m in (enc, pred):
        m.zero_grad(set_to_none=True)
    loss = train.loss_of(enc, tgt, pred, clips, masks_enc, masks_pred)
    loss.backward()
    return loss.detach(), grads_of(enc, pred)


@pytest.mark.parametrize("use_rope", [False, True])
def test_vjepa2_step_matches_and_patched_list(use_rope):
    with codebase("vjepa2", *VJEPA_MODULES) as (utils, tensors, vit, predictor, train):
        enc, tgt, pred = vjepa_models(vit, predictor, use_rope)
        B, N = 2, 32
        clips = torch.randn(B, 3, 4, 32, 32)
        e1, p1 = disjoint_masks(B, N, [11, 7])  # generator 1
        e2, p2 = disjoint_masks(B, N, [5, 13])  # generator 2: other lengths (concat=False must allow it)
        masks_enc, masks_pred = [e1, e2], [p1, p2]
        ref = vjepa_step(train, enc, tgt, pred, clips, masks_enc, masks_pred)

        patched = fj_vjepa2.apply()
        assert patched == [
            "src.masks.utils.apply_masks",
            "app.vjepa.train.apply_masks",
            "src.models.predictor.apply_masks",
            "src.models.vision_transformer.apply_masks",
            "src.utils.tensors.repeat_interleave_batch",
            "src.models.predictor.repeat_interleave_batch",
            "src.models.vision_transformer.VisionTransformer.forward",
            "src.models.utils.modules.RoPEAttention.forward",
            "src.models.utils.modules.rotate_queries_or_keys",
            "src.models.predictor.VisionTransformerPredictor.forward",
        ]
        assert_same_step(ref, vjepa_step(train, enc, tgt, pred, clips, masks_enc, masks_pred))
        enc2, tgt2, pred2 = vjepa_models(vit, predictor, use_rope)
        assert_same_step(ref, vjepa_step(train, enc2, tgt2, pred2, clips, masks_enc, masks_pred))


def test_vjepa2_apply_masks_both_forms_and_revert_identity():
    with codebase("vjepa2", "src.masks.utils", "src.models.vision_transformer") as (utils, vit):
        x = torch.randn(3, 10, 8)
        ms = [torch.randint(0, 10, (3, k)) for k in (4, 6)]
        same = [torch.randint(0, 10, (3, 4)) for _ in range(2)]
        ref_list, ref_cat = utils.apply_masks(x, ms, concat=False), utils.apply_masks(x, same)
        before = {(o, a): vars(o)[a] for o, a in [(utils, "apply_masks"), (vit, "apply_masks"), (vit.VisionTransformer, "forward")]}
        fj_vjepa2.apply()
        got = utils.apply_masks(x, ms, concat=False)
        assert isinstance(got, list) and [g.shape for g in got] == [r.shape for r in ref_list]
        for g, r in zip(got, ref_list):
            torch.testing.assert_close(g, r)
        torch.testing.assert_close(vit.apply_masks(x, same), ref_cat)
        fj_vjepa2.revert()
        for (o, a), obj in before.items():
            assert vars(o)[a] is obj, a


def test_vjepa2_refuses_ijepa():
    with codebase("ijepa", "src.masks.utils", "src.models.vision_transformer"):
        with pytest.raises(CodebaseMismatch, match=r"is not V-JEPA 2 .*expected apply_masks\(x, masks, concat=True\), found apply_masks\(x, masks\).*VisionTransformerPredictor beside the encoder"):
            fj_vjepa2.apply()
        assert fj_vjepa2.patched() == []


# -- MAE ----------------------------------------------------------------------------------


def mae_step(model, imgs, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the masking noise comes from the global RNG
    loss, _, mask = model(imgs, mask_ratio=0.75)
    loss.backward()
    return (loss.detach(), grads_of(model)), mask


def test_mae_step_matches_same_mask_and_revert():
    with codebase("mae", "models_mae") as (mm,):
        torch.manual_seed(1)
        model = mm.MaskedAutoencoderViT()
        imgs = torch.randn(3, 3, 32, 32)
        ref, mask_ref = mae_step(model, imgs, 7)
        torch.manual_seed(7)
        enc_ref = model.forward_encoder(imgs, 0.75)
        before = {a: vars(mm.MaskedAutoencoderViT)[a] for a in ("random_masking", "forward_encoder")}

        assert fj_mae.apply() == ["models_mae.MaskedAutoencoderViT.random_masking", "models_mae.MaskedAutoencoderViT.forward_encoder"]
        new, mask_new = mae_step(model, imgs, 7)
        assert_same_step(ref, new)
        assert torch.equal(mask_new, mask_ref)
        torch.manual_seed(7)
        enc_new = model.forward_encoder(imgs, 0.75)
        torch.testing.assert_close(enc_new[0], enc_ref[0])
        assert torch.equal(enc_new[1], enc_ref[1]) and torch.equal(enc_new[2], enc_ref[2])  # mask, ids_restore
        torch.manual_seed(7)
        x = torch.randn(3, 16, 24)
        torch.manual_seed(8)
        got = model.random_masking(x, 0.5)
        fj_mae.revert()
        for a, obj in before.items():
            assert vars(mm.MaskedAutoencoderViT)[a] is obj
        torch.manual_seed(8)
        expected = model.random_masking(x, 0.5)
        for g, e in zip(got, expected):
            assert torch.equal(g, e)


def test_mae_subclass_with_its_own_masking_keeps_it():
    with codebase("mae", "models_mae") as (mm,):
        calls = []

        class Mine(mm.MaskedAutoencoderViT):
            def random_masking(self, x, mask_ratio):
                calls.append(mask_ratio)
                return super().random_masking(x, mask_ratio)

        fj_mae.apply()
        Mine()(torch.randn(1, 3, 32, 32), mask_ratio=0.5)
        assert calls == [0.5]


def test_mae_refuses_another_models_mae_and_nothing_imported():
    with codebase("mae"):
        with pytest.raises(CodebaseMismatch, match="nothing of MAE .* is imported: expected at least one of models_mae"):
            fj_mae.apply()
        sys.modules["models_mae"] = types.ModuleType("models_mae")
        with pytest.raises(CodebaseMismatch, match="not MAE .*models_mae: expected MaskedAutoencoderViT, missing MaskedAutoencoderViT"):
            fj_mae.apply()


# -- the machinery ------------------------------------------------------------------------


def test_patchset_round_trips_descriptors_and_inherited_attributes():
    class Base:
        def f(self):
            return "base"

    class Owner(Base):
        s = staticmethod(lambda: 1)
        c = classmethod(lambda cls: 2)

    before_s, before_c = vars(Owner)["s"], vars(Owner)["c"]
    ps = PatchSet("t")
    assert ps.apply([(Owner, "s", staticmethod(lambda: 10)), (Owner, "c", classmethod(lambda cls: 20)), (Owner, "f", lambda self: "new")]) == [
        f"{__name__}.test_patchset_round_trips_descriptors_and_inherited_attributes.<locals>.Owner.{a}" for a in ("s", "c", "f")
    ]
    assert (Owner.s(), Owner.c(), Owner().f()) == (10, 20, "new")
    ps.revert()
    assert vars(Owner)["s"] is before_s and vars(Owner)["c"] is before_c and "f" not in vars(Owner)
    assert (Owner.s(), Owner.c(), Owner().f()) == (1, 2, "base")


def test_patchset_rolls_back_a_failed_apply():
    mod = types.ModuleType("m")
    mod.a = 1

    other = types.ModuleType("fastjepa_test_other")
    other.b = 2  # the same (cached) int object as the replacement value below
    sys.modules[other.__name__] = other
    try:
        ps = PatchSet("t")
        with pytest.raises(TypeError):
            ps.apply([(mod, "a", 2), (int, "x", 3)])  # a built-in type refuses new attributes
        assert mod.a == 1 and not ps.active
        assert other.b == 2  # the rollback restores the site it patched, not every module holding a 2
    finally:
        del sys.modules[other.__name__]


# -- any order: apply() before or after the training script's own imports -----------------


@pytest.mark.parametrize("name", ["ijepa", "vjepa2"])
@pytest.mark.parametrize("order", ["after", pytest.param("before", marks=pytest.mark.slow)])  # `before` in-process: below
def test_apply_in_either_order_of_a_training_scripts_imports(name, order):
    """The stand-in training script runs as ``__main__`` (also listed as ``__mp_main__``) and
    holds ``from src.masks.utils import apply_masks`` copies, as the reference's train.py does:
    apply() after those imports patches each site once; apply() before them leaves the late
    copies patched; either way the step equals the unpatched one and revert() restores all."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(FAKES / "train_script.py"), name, order], capture_output=True, text=True,
                          env=env, cwd=str(FAKES), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["main_aliases"] == ["__main__", "__mp_main__"]  # the case the fix is for: one module, two names
    assert got["main_patched"] and got["same_step"] and got["not_restored"] == [], got
    assert got["restored"] == got["patched"]
    assert len(set(got["patched"])) == len(got["patched"])
    if order == "after":
        assert "__main__.apply_masks" in got["patched"] and "__main__.repeat_interleave_batch" in got["patched"]


def test_patchset_patches_a_site_offered_twice_once_and_refuses_two_replacements():
    mod = types.ModuleType("fake_holder")

    def f():
        return "original"

    mod.f = mod.g = f

    @replaces(f)
    def new():
        return "new"

    @replaces(f)
    def other_route():  # another provider's replacement of the same original
        return "new"

    sys.modules["fake_holder"], sys.modules["fake_holder_alias"] = mod, mod  # one module under two names
    try:
        patches = function_patches(f, new)
        assert [(o, a) for o, a, _ in patches] == [(mod, "f"), (mod, "g")]
        ps = PatchSet("t")
        assert ps.apply(patches + [(mod, "f", other_route)]) == ["fake_holder.f", "fake_holder.g"]
        assert mod.f is new and mod.g is new
        ps.revert()
        assert mod.f is f and mod.g is f
        with pytest.raises(ValueError, match=r"fake_holder.f is given two different replacements"):
            ps.apply([(mod, "f", new), (mod, "f", lambda: "unrelated")])
        assert mod.f is f and not ps.active
    finally:
        del sys.modules["fake_holder"], sys.modules["fake_holder_alias"]


def test_revert_restores_a_copy_taken_after_apply():
    with codebase("ijepa", "src.masks.utils") as (utils,):
        original = utils.apply_masks
        fj_ijepa.apply()
        late = importlib.import_module("src.train")  # its `from src.masks.utils import apply_masks` copies the replacement
        assert late.apply_masks is utils.apply_masks and late.apply_masks is not original
        fj_ijepa.revert()
        assert utils.apply_masks is original and late.apply_masks is original

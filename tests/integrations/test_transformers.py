"""fastjepa.integrations.transformers: Hugging Face's VJEPA2Model / IJepaModel, patched vs not.

Tiny random-weight models built from VJEPA2Config / IJepaConfig (no download). Checked: a
V-JEPA 2 step (forward + backward of encoder and predictor) gives the same loss, gradients,
hidden states and attention maps with and without apply(), for models built before and
after it; feature extraction (no grad) the same features; each flag patches only its
piece; revert() restores the very same objects; the refusals name what was expected and
found; ``import fastjepa`` does not import transformers.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _import_transformers():
    """transformers, or a skip where it is not installed."""
    return pytest.importorskip("transformers")


transformers = _import_transformers()

from fastjepa.integrations import transformers as fjt  # noqa: E402
from fastjepa.integrations._patching import CodebaseMismatch  # noqa: E402

VJ = "transformers.models.vjepa2.modeling_vjepa2"
IJ = "transformers.models.ijepa.modeling_ijepa"
ALL = [
    f"{VJ}.apply_masks",
    f"{VJ}.VJEPA2RopeAttention.forward",
    f"{VJ}.VJEPA2Predictor.forward",
    f"{VJ}.VJEPA2PatchEmbeddings3D.forward",
    f"{IJ}.IJepaPatchEmbeddings.forward",
    f"{VJ}.VJEPA2MLP.forward",
    f"{IJ}.IJepaMLP.forward",
]


@pytest.fixture(autouse=True)
def _reverted():
    fjt.revert()
    yield
    fjt.revert()


def vjepa2_model(attn="sdpa", hidden=48, heads=2):
    torch.manual_seed(0)
    cfg = transformers.VJEPA2Config(
        crop_size=32, frames_per_clip=4, patch_size=8, tubelet_size=2, hidden_size=hidden, num_attention_heads=heads,
        num_hidden_layers=2, pred_hidden_size=36, pred_num_attention_heads=2, pred_num_hidden_layers=2,
        pred_num_mask_tokens=3, pred_zero_init_mask_tokens=False,
    )  # fmt: skip
    cfg._attn_implementation = attn
    return transformers.VJEPA2Model(cfg).float()


def clips_and_masks(B=3, N=32, kc=11):
    g = torch.Generator().manual_seed(1)
    clips = torch.randn(B, 4, 3, 32, 32, generator=g)
    perm = torch.argsort(torch.rand(B, N, generator=g), dim=1)
    return clips, perm[:, :kc].sort(1).values, perm[:, kc:].sort(1).values


def vjepa2_step(model, clips, cm, tm, **kw):
    model.zero_grad(set_to_none=True)
    out = model(clips, context_mask=None if cm is None else [cm], target_mask=None if tm is None else [tm], **kw)
    p = out.predictor_output
    loss = (p.last_hidden_state - p.target_hidden_state.detach()).abs().mean() + out.masked_hidden_state.square().mean()
    loss.backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    return loss.detach(), grads, out


def assert_same(ref, new):
    torch.testing.assert_close(new[0], ref[0])
    assert ref[1].keys() == new[1].keys() and ref[1]
    for k in ref[1]:
        torch.testing.assert_close(new[1][k], ref[1][k], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("with_mask", [False, True])
def test_transformers_rope_is_rope_qk_vjepa2_layout(with_mask):
    """transformers' own rotation (get_position_ids + apply_rotary_embeddings) equals
    rope_qk's ``layout="vjepa2"`` reference on the grid (frames unbounded, grid_size, grid_size),
    in float64 (where the two agree to the last bits), leftover channels included (head dim 26)."""
    from fastjepa.ops import rope_qk_reference

    mv = importlib.import_module(VJ)
    cfg = transformers.VJEPA2Config(crop_size=32, patch_size=8, frames_per_clip=4, hidden_size=52, num_attention_heads=2)
    attn = mv.VJEPA2RopeAttention(cfg, 52, 2)
    B, N = 3, 20
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, B, 2, N, 26, dtype=torch.float64, generator=g)
    ids = torch.argsort(torch.rand(B, 40, generator=g), dim=1)[:, :N].sort(1).values if with_mask else None
    pos = attn.get_position_ids(torch.zeros(B, N, 52), masks=ids)
    want_q, want_k = attn.apply_rotary_embeddings(q, pos), attn.apply_rotary_embeddings(k, pos)
    got_q, got_k = rope_qk_reference(q, k, ids, (None, attn.grid_size, attn.grid_size), layout="vjepa2")
    torch.testing.assert_close(got_q, want_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_k, want_k, rtol=1e-12, atol=1e-12)
    other, _ = rope_qk_reference(q, k, ids, (None, attn.grid_size, attn.grid_size), layout="interleaved")
    assert not torch.allclose(other, want_q)  # the layouts differ: the check can fail


def test_import_fastjepa_does_not_import_transformers():
    code = ("import sys, fastjepa, fastjepa.integrations, fastjepa.integrations.transformers; "
            "print(sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vjepa2_step_matches_before_and_after_apply(attn):
    clips, cm, tm = clips_and_masks()
    model = vjepa2_model(attn)
    kw = dict(output_hidden_states=True, output_attentions=attn == "eager")
    ref = vjepa2_step(model, clips, cm, tm, **kw)

    assert fjt.apply() == ALL == fjt.patched()
    new = vjepa2_step(model, clips, cm, tm, **kw)  # built before apply(): classes are patched in place
    assert_same(ref, new)
    for a, b in zip(ref[2].hidden_states, new[2].hidden_states, strict=True):
        torch.testing.assert_close(b, a)
    if attn == "eager":  # the attention maps still come back (from the same attention function)
        assert len(ref[2].attentions) == len(new[2].attentions) == 2
        for a, b in zip(ref[2].attentions, new[2].attentions):
            torch.testing.assert_close(b, a)
    assert_same(ref, vjepa2_step(vjepa2_model(attn), clips, cm, tm, **kw))  # built after apply()


def test_vjepa2_features_and_default_masks_match():
    clips, _, _ = clips_and_masks()
    model = vjepa2_model()
    with torch.no_grad():
        feats = model.get_vision_features(clips)
    ref = vjepa2_step(model, clips, None, None)  # the model's default masks: every token context and target (ties)
    fjt.apply()
    with torch.no_grad():
        torch.testing.assert_close(model.get_vision_features(clips), feats)
    assert_same(ref, vjepa2_step(model, clips, None, None))


def test_vjepa2_predictor_int32_masks_and_mixed_lengths():
    clips, cm, tm = clips_and_masks(B=2, kc=5)
    model = vjepa2_model()
    ref = vjepa2_step(model, clips, cm.int(), tm)
    fjt.apply()
    assert_same(ref, vjepa2_step(model, clips, cm.int(), tm))


def test_outside_the_fast_path_the_original_runs():
    """Two mask pairs per call (the original pairs them its own way), a bare tensor mask,
    masks on another device than the tokens' are not taken by the fused path."""
    mv = importlib.import_module(VJ)
    clips, cm, tm = clips_and_masks(B=2)
    model = vjepa2_model()
    x = torch.randn(2, 32, 48)
    with torch.no_grad():
        enc = model.get_vision_features(clips)
        ref_bare = mv.apply_masks(x, cm)
    fjt.apply()
    assert mv.apply_masks.__fastjepa_original__ is not None
    torch.testing.assert_close(mv.apply_masks(x, cm), ref_bare)  # a (B, K) tensor: the original iterates its rows
    pred = model.predictor
    two = ([cm, cm], [tm, tm])
    try:
        fjt.revert()
        expected = pred(enc, *two).last_hidden_state
    except Exception as exc:  # noqa: BLE001 — whatever the original does, the patched one does the same
        fjt.apply()
        with pytest.raises(type(exc)):
            pred(enc, *two)
    else:
        fjt.apply()
        torch.testing.assert_close(pred(enc, *two).last_hidden_state, expected)


def test_flags_patch_only_their_piece():
    mv = importlib.import_module(VJ)
    before = {a: vars(mv.VJEPA2Predictor)["forward"] for a in ("predictor",)}
    assert fjt.apply(apply_masks=False, predictor=False, patch_embed=False, mlp=False) == [f"{VJ}.VJEPA2RopeAttention.forward"]
    assert vars(mv.VJEPA2Predictor)["forward"] is before["predictor"]
    assert not hasattr(mv.apply_masks, "__fastjepa_original__")
    assert fjt.apply(apply_masks=False, rope=False, predictor=False, patch_embed=False) == [f"{VJ}.VJEPA2MLP.forward", f"{IJ}.IJepaMLP.forward"]
    assert fjt.apply(apply_masks=False, rope=False, predictor=False, mlp=False) == [f"{VJ}.VJEPA2PatchEmbeddings3D.forward", f"{IJ}.IJepaPatchEmbeddings.forward"]
    assert fjt.apply(apply_masks=False, rope=False, predictor=False, patch_embed=False, mlp=False) == []


def test_revert_restores_the_same_objects_and_apply_twice():
    mv, mi = importlib.import_module(VJ), importlib.import_module(IJ)
    pairs = [(mv, "apply_masks"), (mv.VJEPA2RopeAttention, "forward"), (mv.VJEPA2Predictor, "forward"),
             (mv.VJEPA2MLP, "forward"), (mi.IJepaMLP, "forward"), (mv.VJEPA2PatchEmbeddings3D, "forward"),
             (mi.IJepaPatchEmbeddings, "forward")]  # fmt: skip
    before = {(o, a): vars(o)[a] for o, a in pairs}
    first = fjt.apply()
    assert fjt.apply() == first == fjt.patched()
    for (o, a), obj in before.items():
        assert vars(o)[a] is not obj and vars(o)[a].__fastjepa_original__ is obj, a
    assert fjt.revert() == first
    for (o, a), obj in before.items():
        assert vars(o)[a] is obj, a
    assert fjt.patched() == [] and fjt.revert() == []


def test_ijepa_features_match_and_training_falls_back():
    torch.manual_seed(0)
    cfg = transformers.IJepaConfig(image_size=32, patch_size=8, hidden_size=48, num_attention_heads=2, num_hidden_layers=2,
                                   intermediate_size=96)  # fmt: skip
    model = transformers.IJepaModel(cfg).float()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    model.zero_grad(set_to_none=True)
    model(x).last_hidden_state.square().mean().backward()
    ref_g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    fjt.apply()
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, ref)
    model.zero_grad(set_to_none=True)
    model(x).last_hidden_state.square().mean().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_g[n], msg=lambda m, n=n: f"{n}: {m}")


def test_patch_embeddings_fall_back_outside_a_plain_patchify():
    """A clip whose frames do not divide by the tubelet (the convolution drops the rest) and
    an image with the wrong channel count (the original's own error) run the original."""
    model = vjepa2_model()
    pe = model.encoder.embeddings.patch_embeddings
    odd = torch.randn(2, 3, 5, 32, 32)  # (B, C, T, H, W): 5 frames, tubelet 2
    with torch.no_grad():
        ref = pe(odd)
        fjt.apply()
        torch.testing.assert_close(pe(odd), ref)
    cfg = transformers.IJepaConfig(image_size=32, patch_size=8, hidden_size=48, num_attention_heads=2, num_hidden_layers=1,
                                   intermediate_size=96)  # fmt: skip
    ipe = transformers.IJepaModel(cfg).embeddings.patch_embeddings
    with pytest.raises(ValueError, match="Expected 3 but got 1"):
        ipe(torch.randn(1, 1, 32, 32))


def test_refuses_another_transformers_version(monkeypatch):
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "4.57.1")
    with pytest.raises(CodebaseMismatch, match=r"expected transformers >= 5\.0, < 6 \(tested with 5\.25\), found transformers 4\.57\.1 at "):
        fjt.apply()
    assert fjt.patched() == []


def test_refuses_classes_of_other_signatures(monkeypatch):
    mv = importlib.import_module(VJ)
    monkeypatch.setattr(mv.VJEPA2Predictor, "forward", lambda self, hidden_states, masks: None)
    with pytest.raises(CodebaseMismatch, match=r"VJEPA2Predictor.forward: expected \(self, encoder_hidden_states, context_mask, target_mask, kwargs\), found \(self, hidden_states, masks\)"):
        fjt.apply()
    assert fjt.patched() == []


@pytest.mark.slow
def test_benchmark_runs_and_checks(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/bench_transformers.py", "--reps", "2", "--threads", "1", "--json", str(out)],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    result = json.loads(out.read_text())
    assert [row["row"] for row in result["rows"]] == ["vjepa2 step", "vjepa2 features", "ijepa features"]
    for row in result["rows"]:
        assert row["max_rel_diff"] < 1e-4 and row["original_ms"] > 0 and row["patched_ms"] > 0, row
    assert result["patched"] == ALL

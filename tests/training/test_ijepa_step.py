"""One training step: the loss of docs/design.md §5, encoder & predictor change, target = EMA."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastjepa import IJEPA
from fastjepa.masks import MaskCollator, apply_masks, repeat_interleave_batch
from fastjepa.models import set_reference_numerics, vit_predictor, vit_tiny
from fastjepa.ops import use_attention, use_backend
from fastjepa.training.optim import make_optimizer, param_groups


def tiny(nenc=1, npred=4):
    enc = vit_tiny(patch_size=4, img_size=16, depth=2, embed_dim=32, num_heads=2)
    pred = vit_predictor(num_patches=16, embed_dim=32, predictor_embed_dim=16, depth=2, num_heads=2)
    col = MaskCollator(input_size=16, patch_size=4, enc_mask_scale=(0.6, 0.9), pred_mask_scale=(0.15, 0.3), aspect_ratio=(0.75, 1.5), nenc=nenc, npred=npred, min_keep=0, generator=torch.Generator().manual_seed(0))
    return IJEPA(enc, pred), col


def test_target_is_frozen_copy():
    model, _ = tiny()
    for (n, a), b in zip(model.encoder.state_dict().items(), model.target_encoder.state_dict().values()):
        assert torch.equal(a, b), n
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    assert model.target_encoder is not model.encoder


@pytest.mark.parametrize("nenc", [1, 2])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_loss_matches_spec_written_out(nenc, backend):
    model, col = tiny(nenc=nenc)
    with torch.no_grad():  # a target that is not the encoder (as after EMA steps): the targets must come from it
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    imgs, menc, mpred = col([torch.randn(3, 16, 16) for _ in range(3)])
    with use_backend(backend), use_attention("math"):
        loss = model(imgs, menc, mpred)
        with torch.no_grad():
            h = model.target_encoder(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = repeat_interleave_batch(apply_masks(h, mpred), 3, repeat=nenc)
        z = model.predictor(model.encoder(imgs, menc), menc, mpred)
        expected = F.smooth_l1_loss(z, h)
        with torch.no_grad():  # what a model that took its targets from the encoder would compute
            h_enc = repeat_interleave_batch(apply_masks(F.layer_norm(model.encoder(imgs), (32,)), mpred), 3, repeat=nenc)
    torch.testing.assert_close(loss, expected)
    assert (F.smooth_l1_loss(z, h_enc) - expected).abs() > 1e-4  # the check above can tell the two apart


def test_one_step_changes_encoder_predictor_and_target_moves_by_ema():
    model, col = tiny()
    opt = make_optimizer(model, torch.device("cpu"), reference_step=False)
    imgs, menc, mpred = col([torch.randn(3, 16, 16) for _ in range(4)])
    enc0 = copy.deepcopy(model.encoder.state_dict())
    pred0 = copy.deepcopy(model.predictor.state_dict())
    tgt0 = copy.deepcopy(model.target_encoder.state_dict())
    loss = model(imgs, menc, mpred)
    loss.backward()
    opt.step()
    opt.zero_grad()
    m = 0.9  # a visible EMA step
    model.update_target(m)
    enc1, pred1, tgt1 = model.encoder.state_dict(), model.predictor.state_dict(), model.target_encoder.state_dict()
    assert any(not torch.equal(enc0[k], enc1[k]) for k in enc0 if k != "pos_embed")
    assert any(not torch.equal(pred0[k], pred1[k]) for k in pred0 if k != "predictor_pos_embed")
    for k in tgt0:
        torch.testing.assert_close(tgt1[k], m * tgt0[k] + (1 - m) * enc1[k], rtol=1e-6, atol=1e-7)  # to rounding


def test_ema_modes_agree():
    a, _ = tiny()
    with torch.no_grad():
        for p in a.encoder.parameters():
            p.add_(torch.randn_like(p))
    b = copy.deepcopy(a)
    a.update_target(0.996, mode="foreach")
    b.update_target(0.996, mode="reference")
    for x, y in zip(a.target_encoder.parameters(), b.target_encoder.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        a.update_target(1.5)


def test_param_groups_exclude_bias_and_1d_from_wd():
    model, _ = tiny()
    groups = param_groups(model)
    assert len(groups) == 4
    assert all(p.ndim > 1 for g in groups[:2] for p in g["params"])
    assert all(g["WD_exclude"] and g["weight_decay"] == 0 for g in groups[2:])
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == sum(1 for p in model.parameters() if p.requires_grad)
    # mask_token (3-D) is decayed as in the reference; the fixed pos tables are not trained
    assert any(p is model.predictor.mask_token for p in groups[1]["params"])


def test_bf16_autocast_reference_loss_keeps_fp32_targets():
    """Under bf16 autocast the reference computes smooth_l1(z, h) with bf16 predictions and
    fp32 targets (the layer norm's output): IJEPA's reference path must not round h to bf16
    first. On the CPU the reference numerics keep the residual stream, hence h, in fp32."""
    model, col = tiny()
    set_reference_numerics(model)
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    imgs, menc, mpred = col([torch.randn(3, 16, 16) for _ in range(4)])
    with use_backend("reference"), use_attention("math"), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(imgs, menc, mpred)
        with torch.no_grad():
            h = model.target_encoder(imgs)
            h = repeat_interleave_batch(apply_masks(F.layer_norm(h, (h.size(-1),)), mpred), 4, repeat=1)
            z = model.predictor(model.encoder(imgs, menc), menc, mpred)
    assert z.dtype == torch.bfloat16 and h.dtype == torch.float32
    expected = F.smooth_l1_loss(z.float(), h)
    rounded = F.smooth_l1_loss(z.float(), h.to(torch.bfloat16).float())
    # the same kernels on the same values: equal to the bit (rounding h moves the loss by
    # ~1e-4 relative, sometimes by only 1e-6: a tolerance could not tell the two apart)
    torch.testing.assert_close(loss.float(), expected, rtol=0, atol=0)
    assert rounded.item() != expected.item()


def test_numerics_are_the_models_not_the_backends():
    """Under bf16 autocast the residual stream is bf16 unless the model was set to the
    reference numerics (fp32 pos-embed and mask token promote it to fp32), whichever ops
    backend runs."""
    model, col = tiny()
    imgs, menc, mpred = col([torch.randn(3, 16, 16) for _ in range(2)])
    seen = {}
    for name, blk in (("encoder", model.encoder.blocks[0]), ("predictor", model.predictor.predictor_blocks[0])):
        blk.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out.dtype))

    def stream(backend):
        with use_backend(backend), use_attention("math"), torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            model(imgs, menc, mpred)
        return dict(seen)

    both = lambda dtype: {"encoder": dtype, "predictor": dtype}  # noqa: E731
    assert stream("reference") == stream("auto") == both(torch.bfloat16)
    assert set_reference_numerics(model) is model
    assert model.target_encoder.reference_numerics and model.predictor.reference_numerics
    assert stream("reference") == stream("auto") == both(torch.float32)
    set_reference_numerics(model, False)
    assert stream("reference") == both(torch.bfloat16)


@pytest.mark.parametrize("mode", ["foreach", "reference"])
def test_ema_skip_flag_decided_on_the_device(mode):
    """update_target(m, skip=flag): flag 0 is the plain update to the bit, flag 1 leaves the
    target exactly as it was (the trainer's nan_policy=skip, without a host read)."""
    a, _ = tiny()
    with torch.no_grad():
        for p in a.encoder.parameters():
            p.add_(torch.randn_like(p))
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    before = [p.clone() for p in a.target_encoder.parameters()]
    a.update_target(0.9, mode=mode)
    b.update_target(0.9, mode=mode, skip=torch.zeros(()))
    c.update_target(0.9, mode=mode, skip=torch.ones(1))
    for x, y, z, p0 in zip(a.target_encoder.parameters(), b.target_encoder.parameters(), c.target_encoder.parameters(), before):
        assert torch.equal(x, y) and torch.equal(z, p0) and not torch.equal(x, p0)
    with pytest.raises(ValueError, match="skip has 2 elements, expected one"):
        a.update_target(0.9, skip=torch.zeros(2))

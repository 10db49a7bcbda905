"""The whole I-JEPA loss and its gradients: Triton path (interpreter) == reference path."""

import pytest
import torch

from fastjepa import IJEPA
from fastjepa.masks import MaskCollator
from fastjepa.models import vit_predictor, vit_tiny
from fastjepa.ops import use_attention, use_backend


def loss_and_grads(model, backend, imgs, masks_enc, masks_pred):
    model.zero_grad(set_to_none=True)
    with use_backend(backend), use_attention("math"):
        loss = model(imgs, masks_enc, masks_pred)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("nenc, npred", [(1, 4), (2, 4)])
def test_triton_step_equals_reference_step(nenc, npred):
    enc = vit_tiny(patch_size=4, img_size=16, depth=1, embed_dim=40, num_heads=2)
    pred = vit_predictor(num_patches=16, embed_dim=40, predictor_embed_dim=24, depth=1, num_heads=2)
    model = IJEPA(enc, pred)
    with torch.no_grad():  # a target encoder that differs from the encoder, as after EMA steps
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    collate = MaskCollator(
        input_size=16, patch_size=4, enc_mask_scale=(0.6, 0.9), pred_mask_scale=(0.15, 0.3), aspect_ratio=(0.75, 1.5),
        nenc=nenc, npred=npred, min_keep=0, generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))),
    )
    imgs, masks_enc, masks_pred = collate([torch.randn(3, 16, 16) for _ in range(3)])
    loss, grads = loss_and_grads(model, "triton", imgs, masks_enc, masks_pred)
    loss_ref, grads_ref = loss_and_grads(model, "reference", imgs, masks_enc, masks_pred)
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    assert "predictor.mask_token" in grads and "encoder.patch_embed.proj.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_model_runs_the_fused_kernels_and_the_reference_none(monkeypatch):
    """The equality above proves nothing if the model stopped calling the fused ops (it
    would compare the reference with itself): count the kernel launches of one step."""
    from fastjepa.ops import _dispatch

    kernels = _dispatch.kernels()
    launched = []
    names = [n for n in dir(kernels) if n.endswith(("_fwd", "_bwd")) and callable(getattr(kernels, n))]
    for name in names:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: launched.append(_name) or _real(*a, **k))
    enc = vit_tiny(patch_size=4, img_size=16, depth=1, embed_dim=40, num_heads=2)
    pred = vit_predictor(num_patches=16, embed_dim=40, predictor_embed_dim=24, depth=1, num_heads=2)
    model = IJEPA(enc, pred)
    collate = MaskCollator(input_size=16, patch_size=4, enc_mask_scale=(0.6, 0.9), pred_mask_scale=(0.15, 0.3),
                           aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=0)  # fmt: skip
    imgs, masks_enc, masks_pred = collate([torch.randn(3, 16, 16) for _ in range(2)])
    loss_and_grads(model, "reference", imgs, masks_enc, masks_pred)
    assert launched == []
    loss_and_grads(model, "triton", imgs, masks_enc, masks_pred)
    assert {"gather_tokens_fwd", "predictor_tokens_fwd", "target_tokens_fwd", "gather_tokens_bwd", "predictor_tokens_bwd"} <= set(launched), launched

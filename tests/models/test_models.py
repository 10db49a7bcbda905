"""Models: positional embeddings, shapes of every factory, parameter names, dtypes."""

import math

import pytest
import torch

from fastjepa import models
from fastjepa.models import VisionTransformer, VisionTransformerPredictor, vit_predictor
from fastjepa.models.pos_embed import get_2d_sincos_pos_embed


@pytest.mark.parametrize("D,G", [(8, 3), (16, 4), (192, 8)])
def test_pos_embed_values_and_layout(D, G):
    table = get_2d_sincos_pos_embed(D, G)
    assert table.shape == (G * G, D)
    q = D // 4
    for n in [0, 1, G - 1, G, G * G - 1, (G // 2) * G + 1]:
        row, col = divmod(n, G)  # raster order: n = row·G + col
        for k in range(q):
            w = 1.0 / 10000 ** (k / q)
            assert table[n, k] == pytest.approx(math.sin(col * w), abs=1e-12)
            assert table[n, q + k] == pytest.approx(math.cos(col * w), abs=1e-12)
            assert table[n, 2 * q + k] == pytest.approx(math.sin(row * w), abs=1e-12)
            assert table[n, 3 * q + k] == pytest.approx(math.cos(row * w), abs=1e-12)


def test_pos_embed_is_fixed_fp32_parameter():
    enc = models.vit_tiny(patch_size=8, img_size=32, depth=1)
    assert isinstance(enc.pos_embed, torch.nn.Parameter) and not enc.pos_embed.requires_grad
    assert enc.pos_embed.dtype == torch.float32 and enc.pos_embed.shape == (1, 16, 192)
    ref = torch.from_numpy(get_2d_sincos_pos_embed(192, 4)).float()
    assert torch.equal(enc.pos_embed[0], ref)


FACTORIES = [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12), ("vit_large", 1024, 16), ("vit_huge", 1280, 16), ("vit_giant", 1408, 16)]


@pytest.mark.parametrize("name,D,H", FACTORIES)
def test_factory_shapes_tiny_depth(name, D, H):
    enc = getattr(models, name)(patch_size=16, img_size=[32], depth=1)  # img_size as the reference passes it
    assert enc.embed_dim == D and enc.num_heads == H and enc.patch_embed.num_patches == 4
    x = torch.randn(2, 3, 32, 32)
    assert enc(x).shape == (2, 4, D)
    masks = [torch.tensor([[0, 3], [1, 2]])]
    assert enc(x, masks).shape == (2, 2, D)
    pred = vit_predictor(num_patches=4, embed_dim=D, predictor_embed_dim=32, depth=1, num_heads=4)
    out = pred(enc(x, masks), masks, [torch.tensor([[1], [0]]), torch.tensor([[2], [3]])])
    assert out.shape == (4, 1, D)


def test_giant_mlp_ratio():
    enc = models.vit_giant(patch_size=14, img_size=28, depth=1)
    assert enc.blocks[0].mlp.fc1.out_features == int(1408 * 48 / 11)


def test_factory_overrides():
    enc = models.vit_tiny(patch_size=4, img_size=16, depth=2, embed_dim=64, num_heads=2)
    assert len(enc.blocks) == 2 and enc.embed_dim == 64


def _reference_encoder_names(depth):
    names = ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"]
    return names + ["norm.weight", "norm.bias"]


def test_state_dict_names_match_reference():
    enc = models.vit_small(patch_size=16, img_size=32, depth=3)
    assert list(enc.state_dict()) == _reference_encoder_names(3)
    pred = vit_predictor(num_patches=4, embed_dim=384, predictor_embed_dim=64, depth=2, num_heads=4)
    expected = {"mask_token", "predictor_pos_embed", "predictor_embed.weight", "predictor_embed.bias",
                "predictor_norm.weight", "predictor_norm.bias", "predictor_proj.weight", "predictor_proj.bias"}  # fmt: skip
    for i in range(2):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"predictor_blocks.{i}.{sub}.weight", f"predictor_blocks.{i}.{sub}.bias"}
    assert set(pred.state_dict()) == expected
    assert pred.mask_token.shape == (1, 1, 64) and pred.predictor_pos_embed.shape == (1, 4, 64)


def test_strict_load_both_ways_and_prefixed():
    """A state dict under the reference's names with DDP's ``module.`` prefix (as published
    checkpoints hold) loads strictly once stripped; ours, written back out, has exactly the
    reference's names, so the reference code can load it strictly too."""
    from fastjepa.checkpoint import strip_module_prefix

    a = models.vit_tiny(patch_size=8, img_size=16, depth=2)
    b = models.vit_tiny(patch_size=8, img_size=16, depth=2)
    names = _reference_encoder_names(2)
    published = {f"module.{n}": torch.randn_like(a.state_dict()[n]) for n in names}  # the reference's names, prefixed
    b.load_state_dict(strip_module_prefix(published), strict=True)
    for n in names:
        assert torch.equal(b.state_dict()[n], published[f"module.{n}"])
    assert list(b.state_dict()) == names  # and back: a file the reference loads strictly
    with pytest.raises(RuntimeError, match="Unexpected key"):
        b.load_state_dict(published, strict=True)  # the prefix must go, not be silently ignored


@pytest.mark.parametrize("which", ["encoder", "predictor"])
def test_init_net_effect(which):
    torch.manual_seed(0)
    if which == "encoder":
        enc = models.vit_base(patch_size=16, img_size=224, depth=4)
    else:
        enc = vit_predictor(num_patches=196, embed_dim=768, predictor_embed_dim=384, depth=4, num_heads=12)
        assert abs(enc.mask_token.std().item() - 0.02) < 0.004  # trunc-normal 0.02 (384 values)
    for name, p in enc.named_parameters():
        if name in ("pos_embed", "predictor_pos_embed", "mask_token"):
            continue
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif ".norm" in name or name.startswith(("norm", "predictor_norm")):
            assert torch.all(p == 1), name
        elif p.ndim >= 2:
            # trunc-normal 0.02 everywhere, no depth rescaling of attn.proj / fc2
            assert abs(p.std().item() - 0.02) < 0.002, (name, p.std().item())


def test_predictor_batch_order_element_by_element():
    """Row (j·nenc + i)·B + b = [ctx(i, b) + pos ; mask_token + pos(masks[j][b])]."""
    torch.manual_seed(1)
    B, N, D, P, nenc, npred, Kc, Kt = 3, 16, 8, 12, 2, 3, 5, 4
    pred = VisionTransformerPredictor(num_patches=N, embed_dim=D, predictor_embed_dim=P, depth=0, num_heads=2)
    masks_x = [torch.stack([torch.randperm(N)[:Kc] for _ in range(B)]) for _ in range(nenc)]
    masks = [torch.stack([torch.randperm(N)[:Kt] for _ in range(B)]) for _ in range(npred)]
    ctx = torch.randn(nenc * B, Kc, P)
    from fastjepa.ops import predictor_tokens_reference

    x = predictor_tokens_reference(ctx, masks_x, masks, pred.predictor_pos_embed, pred.mask_token)
    pos = pred.predictor_pos_embed[0]
    assert x.shape == (npred * nenc * B, Kc + Kt, P)
    for j in range(npred):
        for i in range(nenc):
            for b in range(B):
                row = x[(j * nenc + i) * B + b]
                for k in range(Kc):
                    torch.testing.assert_close(row[k], ctx[i * B + b, k] + pos[masks_x[i][b, k]])
                for k in range(Kt):
                    torch.testing.assert_close(row[Kc + k], pred.mask_token[0, 0] + pos[masks[j][b, k]])


def test_float64_modules_compute_in_float64():
    enc = models.vit_tiny(patch_size=8, img_size=16, depth=1).double()
    out = enc(torch.randn(2, 3, 16, 16, dtype=torch.float64), [torch.tensor([[0, 1], [2, 3]])])
    assert out.dtype == torch.float64


def test_bad_image_size_raises():
    enc = models.vit_tiny(patch_size=8, img_size=16, depth=1)
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        enc(torch.randn(1, 3, 32, 36))  # 36 is not a multiple of the patch
    with pytest.raises(ValueError, match="expected"):
        enc(torch.randn(3, 32, 32))  # no batch dimension
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(img_size=30, patch_size=8)


def _block_by_hand(x, blk, heads):
    """docs/design.md §1's block written out: pre-norm (LayerNorm eps 1e-6), softmax attention scaled
    by head_dim**-0.5, exact (erf) GELU, two residual adds."""
    F = torch.nn.functional
    B, N, C = x.shape
    hd = C // heads
    y = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
    q, k, v = (y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).view(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) * hd**-0.5, dim=-1) @ v
    x = x + (a.transpose(1, 2).reshape(B, N, C) @ blk.attn.proj.weight.T + blk.attn.proj.bias)
    y = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
    h = y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + (h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)


def test_encoder_and_predictor_equal_the_spec_written_out():
    """Not backend against backend: the modules against an independent float64 computation
    (eps, GELU variant, norm placement and scale all matter here)."""
    F = torch.nn.functional
    enc = models.vit_tiny(patch_size=4, img_size=16, depth=2, embed_dim=24, num_heads=2).double()
    pred = vit_predictor(num_patches=16, embed_dim=24, predictor_embed_dim=12, depth=2, num_heads=3).double()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong eps or placement shows
        for m in (enc, pred):
            for name, p in m.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.3 * torch.randn_like(p))
    imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    x = F.conv2d(imgs, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=4).flatten(2).transpose(1, 2)
    # the table is built in fp32 (docs/design.md §1.1), so after .double() its values are fp32-rounded sin-cos
    torch.testing.assert_close(enc.pos_embed[0].double(), torch.from_numpy(get_2d_sincos_pos_embed(24, 4)), rtol=0, atol=1e-7)
    x = x + enc.pos_embed.double()
    for blk in enc.blocks:
        x = _block_by_hand(x, blk, 2)
    want = F.layer_norm(x, (24,), enc.norm.weight, enc.norm.bias, eps=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(enc(imgs), want, rtol=1e-10, atol=1e-10)
    # predictor: embed the context, append mask tokens + their positions, blocks, norm, proj, keep the targets
    masks_x, masks = [torch.tensor([[0, 1, 5, 6], [2, 3, 7, 8]])], [torch.tensor([[10, 11], [14, 15]])]
    ctx = torch.randn(2, 4, 24, dtype=torch.float64)
    pos = pred.predictor_pos_embed[0].double()  # (16, 12)
    c = ctx @ pred.predictor_embed.weight.T + pred.predictor_embed.bias + pos[masks_x[0]]
    t = pred.mask_token.expand(2, 2, 12) + pos[masks[0]]
    y = torch.cat([c, t], dim=1)
    for blk in pred.predictor_blocks:
        y = _block_by_hand(y, blk, 3)
    y = F.layer_norm(y, (12,), pred.predictor_norm.weight, pred.predictor_norm.bias, eps=1e-6)[:, 4:]
    want = y @ pred.predictor_proj.weight.T + pred.predictor_proj.bias
    with torch.no_grad():
        torch.testing.assert_close(pred(ctx, masks_x, masks), want, rtol=1e-10, atol=1e-10)


def test_drop_path_drops_whole_residual_branches_in_training_only():
    """docs/design.md §1: drop-path is supported (off in every published config): in training, a
    sample's residual branch is dropped whole or kept scaled by 1/(1-p); eval is identity."""
    from fastjepa.models.vision_transformer import drop_path

    x = torch.randn(4000, 3, 8, dtype=torch.float64)
    y = drop_path(x, 0.25, True)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert bool((kept | dropped).all())  # per sample, all or nothing
    assert 0.2 < dropped.double().mean().item() < 0.3
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert torch.equal(drop_path(x, 0.25, False), x) and torch.equal(drop_path(x, 0.0, True), x)
    enc = models.vit_tiny(patch_size=4, img_size=16, depth=2, embed_dim=24, num_heads=2, drop_path_rate=0.5).double()
    imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    enc.eval()
    with torch.no_grad():
        a, b = enc(imgs), enc(imgs)
        enc.train()
        outs = [enc(imgs) for _ in range(8)]
    assert torch.equal(a, b) and any(not torch.allclose(o, a) for o in outs)


@pytest.mark.parametrize("build, message", [
    (lambda: models.vit_tiny(patch_size=4, img_size=16, depth=1, embed_dim=40, num_heads=3), r"dim=40 is not divisible by num_heads=3"),
    (lambda: models.vit_tiny(patch_size=4, img_size=16, depth=1)(torch.randn(2, 3, 20, 18)),
     r"images: expected \(B, C, H, W\) with H and W multiples of the patch size 4 \(built for 16\), got \(2, 3, 20, 18\)"),
    (lambda: models.vit_tiny(patch_size=4, img_size=16, depth=1, embed_dim=30, num_heads=3),
     r"embed_dim=30: a 2-D sin-cos embedding needs a width divisible by 4"),
    (lambda: models.vit_tiny(patch_size=4, img_size=(16, 20), depth=1), r"img_size=\[16, 20\]: expected an int or a one-element list"),
    (lambda: vit_predictor(num_patches=16, embed_dim=16, predictor_embed_dim=8, depth=1, num_heads=2)(torch.randn(2, 3, 16), None, None),
     r"VisionTransformerPredictor: masks_x and masks are required"),
])  # fmt: skip
def test_model_mistakes_say_what_is_wrong(build, message):
    with pytest.raises(ValueError, match=message):
        build()

"""The V-JEPA 2 predictor patch against a stand-in predictor written here from V-JEPA 2's semantics.

The stand-in has the attributes V-JEPA 2's ``VisionTransformerPredictor`` has and a forward
that builds its input the way V-JEPA 2's does (repeat, gather, repeat-interleave, cat, an
argsort and a loop over rows, the un-sort by the argsort of the argsort). Its blocks see
the positions they are given (like RoPE) and mix tokens, so a wrong sort, wrong positions
or a wrong un-sort change the output.
"""

import types

import pytest
import torch
import torch.nn as nn

from fastjepa.integrations._vjepa2_predictor import predictor_forward, predictor_patches
from fastjepa.ops import available, use_backend

HAVE_CPP = bool(available()["cpp"])
BACKENDS = ["reference", "triton", pytest.param("cpp", marks=pytest.mark.skipif(not HAVE_CPP, reason="fastjepa._C is not built"))]


def apply_masks(x, masks):
    """(B, N, D), list of (B, K) -> (len·B, K, D), mask-major."""
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, x.size(-1))) for m in masks], dim=0)


def repeat_interleave_batch(x, B, repeat):
    chunks = [x[i * B : (i + 1) * B] for i in range(len(x) // B)]
    return torch.cat([c for c in chunks for _ in range(repeat)], dim=0)


class PositionBlock(nn.Module):
    """Rotates each token by its position (the last mask.size(1) tokens, as a class token has
    none), then a residual MLP and a token mean (permutation-equivariant mixing)."""

    def __init__(self, P):
        super().__init__()
        self.fc = nn.Linear(P, P)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, P))

    def forward(self, x, mask=None, attn_mask=None):
        assert attn_mask is None
        if mask is not None:
            K = mask.size(1)
            angle = mask.to(x.dtype).unsqueeze(-1) * self.freq  # (B, K, P)
            x = torch.cat([x[:, : x.size(1) - K], x[:, x.size(1) - K :] * torch.cos(angle) + torch.sin(angle)], dim=1)
        x = x + torch.tanh(self.fc(x))
        return x + x.mean(dim=1, keepdim=True)


class StandInPredictor(nn.Module):
    def __init__(self, D=12, P=16, N=24, depth=2, use_rope=False, num_mask_tokens=2, chop_last_n_tokens=0,
                 return_all_tokens=False, use_activation_checkpointing=False):  # fmt: skip
        super().__init__()
        self.predictor_embed = nn.Linear(D, P)
        self.num_mask_tokens = num_mask_tokens
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.randn(1, 1, P)) for _ in range(num_mask_tokens)])
        self.num_patches = N
        self.use_rope = use_rope
        self.predictor_pos_embed = None if use_rope else nn.Parameter(torch.randn(1, N, P), requires_grad=False)
        self.predictor_blocks = nn.ModuleList([PositionBlock(P) for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(P)
        self.predictor_proj = nn.Linear(P, D)
        self.chop_last_n_tokens = chop_last_n_tokens
        self.return_all_tokens = return_all_tokens
        self.use_activation_checkpointing = use_activation_checkpointing

    def forward(self, x, masks_x, masks_y, mask_index=1, has_cls=False):
        if not isinstance(masks_x, list):
            masks_x = [masks_x]
        if not isinstance(masks_y, list):
            masks_y = [masks_y]
        B = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        if has_cls:
            x_cls, x = x[:, :1, :], x[:, 1:, :]
        n_ctxt = x.size(1)
        if not self.use_rope:
            x = x + apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), masks_x)
        tokens = self.mask_tokens[mask_index % self.num_mask_tokens].repeat(B, self.num_patches, 1)
        tokens = apply_masks(tokens, masks_y)
        if not self.use_rope:
            tokens = tokens + repeat_interleave_batch(apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), masks_y), B, len(masks_x))
        x = torch.cat([x.repeat(len(masks_x), 1, 1), tokens], dim=1)
        masks = torch.cat([torch.cat(masks_x, dim=0), torch.cat(masks_y, dim=0)], dim=1)
        argsort = torch.argsort(masks, dim=1)
        masks = torch.stack([masks[i, row] for i, row in enumerate(argsort)])
        x = torch.stack([x[i, row, :] for i, row in enumerate(argsort)])
        if self.chop_last_n_tokens > 0:
            x, masks = x[:, : -self.chop_last_n_tokens], masks[:, : -self.chop_last_n_tokens]
        if has_cls:
            x = torch.cat([x_cls, x], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x, mask=masks, attn_mask=None)
        x = self.predictor_norm(x)
        if has_cls:
            x = x[:, 1:, :]
        if not self.return_all_tokens:
            reverse = torch.argsort(argsort, dim=1)
            x = torch.stack([x[i, row, :] for i, row in enumerate(reverse)])[:, n_ctxt:]
        return self.predictor_proj(x)


def disjoint_masks(B, N, Kc, Kt, dtype=torch.int64):
    """Sorted context and target masks with no position in common, as V-JEPA 2 samples them."""
    perm = torch.rand(B, N).argsort(dim=1)
    return perm[:, :Kc].sort(dim=1).values.to(dtype), perm[:, Kc : Kc + Kt].sort(dim=1).values.to(dtype)


def outputs_and_grads(model, forward, x, masks_x, masks_y, **kw):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = forward(model, x, masks_x, masks_y, **kw)
    grad = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)  # fixed, dense upstream gradient
    out.backward(grad)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config, call",
    [
        (dict(), dict()),
        (dict(use_rope=True), dict(mask_index=0)),
        (dict(), dict(has_cls=True, mask_index=3)),
        (dict(use_rope=True), dict(has_cls=True)),
        (dict(use_activation_checkpointing=True), dict()),
        (dict(return_all_tokens=True, chop_last_n_tokens=3), dict()),
        (dict(use_rope=True, return_all_tokens=True, chop_last_n_tokens=2), dict(has_cls=True)),
    ],
    ids=["pos", "rope", "pos-cls", "rope-cls", "checkpointing", "all-tokens-chop", "rope-all-tokens-chop-cls"],
)
def test_patched_forward_equals_the_original(backend, config, call):
    model = StandInPredictor(**config)
    B, N, Kc, Kt = 3, 24, 7, 11
    masks_x, masks_y = disjoint_masks(B, N, Kc, Kt, torch.int32 if config.get("use_rope") else torch.int64)
    x = torch.randn(B, int(call.get("has_cls", False)) + Kc, 12)
    want = outputs_and_grads(model, StandInPredictor.forward, x, masks_x, masks_y, **call)
    with use_backend(backend):
        got = outputs_and_grads(model, predictor_forward, x, masks_x, masks_y, **call)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_several_pairs_give_each_pair_its_own_rows():
    """M pairs in one call: rows m·B + b equal the original's output for pair m alone."""
    model = StandInPredictor()
    B, M = 2, 3
    pairs = [disjoint_masks(B, 24, 5, 6) for _ in range(M)]
    x = torch.randn(M * B, 5, 12)
    with torch.no_grad():
        got = predictor_forward(model, x, [p[0] for p in pairs], [p[1] for p in pairs])
        want = torch.cat([model(x[m * B : (m + 1) * B], pairs[m][0], pairs[m][1]) for m in range(M)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chop_without_all_tokens_names_the_setting():
    model = StandInPredictor(chop_last_n_tokens=2)
    masks_x, masks_y = disjoint_masks(2, 24, 5, 6)
    with pytest.raises(ValueError, match=r"built with chop_last_n=2"):
        predictor_forward(model, torch.randn(2, 5, 12), masks_x, masks_y)


def test_patches_the_class_so_existing_instances_take_it():
    module = types.ModuleType("src.models.predictor")
    module.VisionTransformerPredictor = type("VisionTransformerPredictor", (StandInPredictor,), {"forward": StandInPredictor.forward})
    model = module.VisionTransformerPredictor(use_rope=True)  # built before the patch
    ((owner, name, new),) = predictor_patches({"src.models.predictor": module, "src.masks.utils": types.ModuleType("x")})
    assert (owner, name, new) == (module.VisionTransformerPredictor, "forward", predictor_forward)
    masks_x, masks_y = disjoint_masks(2, 24, 5, 6)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        want = model(x, masks_x, masks_y)
        original = owner.forward
        setattr(owner, name, new)
        try:
            calls = []
            with use_backend("reference"):
                import fastjepa.integrations._vjepa2_predictor as patch

                real = patch.sorted_predictor_tokens
                patch.sorted_predictor_tokens = lambda *a, **k: calls.append(1) or real(*a, **k)
                try:
                    got = model(x, masks_x, masks_y)
                finally:
                    patch.sorted_predictor_tokens = real
        finally:
            setattr(owner, name, original)
    assert calls == [1]  # the patched forward ran on the instance built before the patch
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patches_nothing_without_the_module():
    assert predictor_patches({"src.masks.utils": types.ModuleType("src.masks.utils")}) == []


def test_refuses_a_module_that_is_not_vjepa2s():
    no_class = types.ModuleType("src.models.predictor")
    with pytest.raises(ValueError, match=r"src.models.predictor: expected V-JEPA 2's class VisionTransformerPredictor with a forward, found nothing"):
        predictor_patches({"src.models.predictor": no_class})
    other = types.ModuleType("src.models.predictor")
    other.VisionTransformerPredictor = type("VisionTransformerPredictor", (nn.Module,), {"forward": lambda self, x, masks_x, masks: x})
    with pytest.raises(ValueError, match=r"forward takes \(self, x, masks_x, masks\), expected V-JEPA 2's \(self, x, masks_x, masks_y, mask_index, has_cls\)"):
        predictor_patches({"src.models.predictor": other})

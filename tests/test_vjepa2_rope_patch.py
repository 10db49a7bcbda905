"""The V-JEPA 2 RoPE patch (fastjepa.integrations._vjepa2_rope) against a stand-in of
V-JEPA 2's RoPEAttention written here from its semantics: the patched forward gives the
same output and gradients in float32 (masks or none, grid from T/H/W or grid_size, SDPA
or the explicit softmax, attn_mask, causal, dropout with the same RNG stream)."""

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastjepa.integrations._vjepa2_rope import rope_attention_forward, rope_patches, rotate_queries_or_keys
from fastjepa.ops import use_backend


def chain_rotate(x, pos):
    """Rotate all of x's last dim by pos: a (.., D/2) table repeated whole, pairs swapped by stack."""
    D = x.size(-1)
    omega = 1.0 / 10000 ** (torch.arange(D // 2, dtype=x.dtype, device=x.device) / (D / 2.0))
    freq = pos[..., None] * omega
    sin, cos = freq.sin(), freq.cos()
    sin, cos = torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + swapped * sin


class StandInRoPEAttention(nn.Module):
    """What V-JEPA 2's RoPEAttention computes, restated (its attribute names, its forward's rules)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0, use_sdpa=True,
                 grid_size=14, is_causal=False):  # fmt: skip
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop_prob = proj_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.use_sdpa = use_sdpa
        self.d_dim = self.h_dim = self.w_dim = 2 * ((self.head_dim // 3) // 2)
        self.grid_size = grid_size
        self.is_causal = is_causal

    def separate_positions(self, ids, H_patches=None, W_patches=None):
        if H_patches is None or W_patches is None:
            per_frame, per_row = self.grid_size**2, self.grid_size
        else:
            per_frame, per_row = H_patches * W_patches, W_patches
        return ids // per_frame, (ids % per_frame) // per_row, ids % per_row

    def forward(self, x, mask=None, attn_mask=None, T=None, H_patches=None, W_patches=None):
        B, N, C = x.shape
        depth = N // self.grid_size**2
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if mask is not None:
            pos = self.separate_positions(mask[:, None, :].expand(-1, self.num_heads, -1), H_patches, W_patches)
        else:
            count = depth * self.grid_size**2 if None in (T, H_patches, W_patches) else T * H_patches * W_patches
            pos = self.separate_positions(torch.arange(count), H_patches, W_patches)
        d = self.d_dim
        q = torch.cat([chain_rotate(q[..., i * d : (i + 1) * d], p) for i, p in enumerate(pos)] + [q[..., 3 * d :]], -1)
        k = torch.cat([chain_rotate(k[..., i * d : (i + 1) * d], p) for i, p in enumerate(pos)] + [k[..., 3 * d :]], -1)
        if attn_mask is not None or self.use_sdpa:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.proj_drop_prob, is_causal=self.is_causal,
                                               attn_mask=attn_mask)  # fmt: skip
        else:
            x = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


def stand_in_module():
    m = types.ModuleType("stand_in_modules")
    m.RoPEAttention, m.rotate_queries_or_keys = StandInRoPEAttention, chain_rotate
    return m


def patched(monkeypatch, module):
    for owner, name, new in rope_patches({module.__name__: module}):
        monkeypatch.setattr(owner, name, new)


# (dim, heads, grid_size, B, call kwargs builder, module kwargs): head_dim 64 (leftover 4), 32, 22
CASES = {
    "mask": (128, 2, 4, 2, lambda B, N: dict(mask=torch.rand(B, 3 * 16).argsort(1)[:, :N].sort(1).values), {}),
    "mask_hw": (96, 3, 4, 2, lambda B, N: dict(mask=torch.rand(B, 2 * 15).argsort(1)[:, :N].sort(1).values,
                                               H_patches=3, W_patches=5), {}),  # fmt: skip
    "arange_grid": (96, 3, 2, 1, lambda B, N: {}, {}),
    "arange_thw": (66, 3, 5, 2, lambda B, N: dict(T=N // 6, H_patches=2, W_patches=3), {}),
    "no_sdpa": (128, 2, 4, 2, lambda B, N: dict(mask=torch.randint(0, 48, (B, N))), dict(use_sdpa=False, qk_scale=0.3)),
    "attn_mask_causal": (96, 3, 2, 2, lambda B, N: dict(attn_mask=torch.rand(N, N) > 0.3), dict(use_sdpa=False)),
    "causal": (96, 3, 2, 2, lambda B, N: {}, dict(is_causal=True)),
}


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_patched_forward_equals_the_original(case, backend, monkeypatch):
    dim, heads, gs, B, call, kw = CASES[case]
    N = 12
    if case == "arange_grid":
        N = 2 * gs * gs
    module = stand_in_module()
    attn = StandInRoPEAttention(dim, num_heads=heads, grid_size=gs, **kw)
    kwargs = call(B, N)
    x = torch.randn(B, N, dim)
    grad = torch.randn(B, N, dim)

    def run(a):
        xl = x.clone().requires_grad_()
        out = a(xl, **kwargs)
        grads = torch.autograd.grad(out, (xl, *a.parameters()), grad)
        return out.detach(), grads

    out, grads = run(attn)
    patched(monkeypatch, module)
    assert StandInRoPEAttention.forward is rope_attention_forward
    with use_backend(backend):
        out_p, grads_p = run(attn)
    torch.testing.assert_close(out_p, out)
    for g, e in zip(grads_p, grads, strict=True):
        torch.testing.assert_close(g, e)


def test_dropout_follows_the_same_rng_stream_in_eval_mode_too(monkeypatch):
    """V-JEPA 2 passes dropout_p=proj_drop to SDPA whether training or not; so does the patch."""
    module = stand_in_module()
    attn = StandInRoPEAttention(96, num_heads=3, grid_size=2, proj_drop=0.4).eval()
    x = torch.randn(2, 8, 96)
    torch.manual_seed(5)
    out = attn(x)
    patched(monkeypatch, module)
    torch.manual_seed(5)
    out_p = attn(x)
    torch.testing.assert_close(out_p, out)
    torch.manual_seed(6)
    assert not torch.allclose(attn(x), out_p)  # another seed, another dropout mask: dropout is on in eval


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos_kind", ["int_shared", "int_batched", "float"])
def test_rotate_queries_or_keys_drop_in(dtype, pos_kind):
    """Same numbers and the same result dtype as the chain (float positions promote bf16 x)."""
    x = torch.randn(2, 3, 7, 20, dtype=dtype)
    pos = {"int_shared": torch.arange(7), "int_batched": torch.randint(0, 9, (2, 3, 7)),
           "float": torch.rand(2, 3, 7) * 5}[pos_kind]  # fmt: skip
    got, expected = rotate_queries_or_keys(x, pos), chain_rotate(x, pos)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0 if pos_kind != "float" else 1e-6, atol=0 if pos_kind != "float" else 1e-6)


def test_patch_list_once_per_class_and_refuses_another_rope_attention():
    module = stand_in_module()
    other = types.ModuleType("other")
    other.RoPEAttention = StandInRoPEAttention  # imported with `from ... import`
    other.rotate_queries_or_keys = chain_rotate
    patches = rope_patches({"a": module, "b": other})
    assert [(o, n) for o, n, _ in patches] == [(StandInRoPEAttention, "forward"), (module, "rotate_queries_or_keys"),
                                                (other, "rotate_queries_or_keys")]  # fmt: skip
    bad = types.ModuleType("bad")
    bad.RoPEAttention = type("RoPEAttention", (nn.Module,), {})
    with pytest.raises(TypeError, match="has no separate_positions: expected V-JEPA 2's RoPEAttention"):
        rope_patches({"bad": bad})


def test_tokens_not_matching_the_grid_name_both_counts(monkeypatch):
    patched(monkeypatch, stand_in_module())
    attn = StandInRoPEAttention(96, num_heads=3, grid_size=2)
    with pytest.raises(ValueError, match=r"positions are arange\(8\) .* expected one per token \(10\)"):
        attn(torch.randn(1, 10, 96))


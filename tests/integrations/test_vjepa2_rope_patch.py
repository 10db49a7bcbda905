"""The V-JEPA 2 RoPE patch (fastjepa.integrations._vjepa2_rope) against a stand-in of
V-JEPA 2's RoPEAttention written here from its semantics: the patched forward gives the
same output and gradients in float32 (masks or none, grid from T/H/W or grid_size, SDPA
or the explicit softmax, attn_mask, causal, dropout with the same RNG stream)."""

import importlib.util
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastjepa.integrations._vjepa2_rope import rope_attention_forward, rope_patches, rotate_queries_or_keys
from fastjepa.ops import use_backend


def _load_stand_in():
    """The stand-in's RoPEAttention and rotation, from the fake V-JEPA 2 the integration tests
    import (loaded from its file, so no ``src`` package is put in sys.modules here)."""
    path = Path(__file__).parent / "fake_codebases" / "vjepa2" / "src" / "models" / "utils" / "modules.py"
    spec = importlib.util.spec_from_file_location("fake_vjepa2_modules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RoPEAttention, module.rotate_queries_or_keys


StandInRoPEAttention, chain_rotate = _load_stand_in()


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


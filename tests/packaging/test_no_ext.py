"""The package imports and trains without the C++ extension (``FASTJEPA_NO_EXT=1``).

Runs in a subprocess so that the environment variable is seen before anything loads
``fastjepa._C``; the extension may or may not be built here, the result must not depend
on it.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import fastjepa
    from fastjepa import IJEPA
    from fastjepa.masks import MaskCollator
    from fastjepa.models import vit_predictor, vit_tiny
    from fastjepa.ops import available, gather_tokens

    cpp = available()["cpp"]
    assert not cpp and "FASTJEPA_NO_EXT" in cpp.reason, cpp
    col = MaskCollator(input_size=16, patch_size=4, enc_mask_scale=(0.6, 0.9), pred_mask_scale=(0.15, 0.3),
                       aspect_ratio=(0.75, 1.5), nenc=1, npred=2, min_keep=0, seed=1)
    assert col.backend == "python", col.backend
    try:
        MaskCollator(input_size=16, patch_size=4, min_keep=0, backend="cpp")
        raise AssertionError("backend='cpp' accepted without the extension")
    except ValueError as exc:
        assert "FASTJEPA_NO_EXT" in str(exc), exc

    enc = vit_tiny(patch_size=4, img_size=16, depth=1, embed_dim=32, num_heads=2)
    pred = vit_predictor(num_patches=16, embed_dim=32, predictor_embed_dim=16, depth=1, num_heads=2)
    model = IJEPA(enc, pred)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    imgs, menc, mpred = col([torch.randn(3, 16, 16) for _ in range(4)])
    before = [p.detach().clone() for p in model.encoder.parameters()]
    loss = model(imgs, menc, mpred)
    loss.backward()
    opt.step()
    model.update_target(0.99)
    assert torch.isfinite(loss), loss
    assert any(not torch.equal(a, p) for a, p in zip(before, model.encoder.parameters()))
    assert "fastjepa._C" not in sys.modules, "the extension was loaded despite FASTJEPA_NO_EXT=1"
    print("ok", float(loss))
    """
)


def test_package_trains_without_extension():
    env = dict(os.environ, FASTJEPA_NO_EXT="1", FASTJEPA_BACKEND="auto")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")


def test_info_table_names_the_extension_state():
    for no_ext in ("0", "1"):
        env = dict(os.environ, FASTJEPA_NO_EXT=no_ext)
        r = subprocess.run([sys.executable, "-m", "fastjepa.info"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        for name in ("torch", "cuda", "triton", "triton interpreter", "fastjepa._C", "flash-attn", "xformers",
                     "cpu bf16 matmul", "cpu fused linear+GELU"):  # fmt: skip
            assert f"\n{name} " in r.stdout, (name, r.stdout)
        ext = next(ln for ln in r.stdout.splitlines() if ln.startswith("fastjepa._C "))
        if no_ext == "1":
            assert "disabled by FASTJEPA_NO_EXT=1" in ext
        else:
            assert ("compiler" in ext) or ("not built" in ext) or ("does not load" in ext), ext

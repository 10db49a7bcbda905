"""The shape trace walks one step with the model's ops and agrees with the model's forward."""

import io

import pytest

from fastjepa.config import load_config
from fastjepa.trace import trace_shapes_from_config
from fastjepa.train import main as train_main

TINY = [
    "data.crop_size=16", "mask.patch_size=4", "mask.min_keep=0", "meta.model_name=vit_tiny",
    "meta.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "meta.pred_depth=1", "meta.pred_emb_dim=16",
]  # fmt: skip


@pytest.mark.parametrize("nenc,npred", [(1, 4), (2, 3)])
def test_trace_shapes_follow_the_batched_predictor(nenc, npred):
    cfg = load_config(None, [*TINY, f"mask.num_enc_masks={nenc}", f"mask.num_pred_masks={npred}", "mask.allow_overlap=true"])
    buf = io.StringIO()
    res = trace_shapes_from_config(cfg, file=buf, batch_size=3)
    s, B, N, D, P = res["shapes"], 3, 16, 32, 16
    Kc, Kt = s["masks_enc[0]"][1], s["masks_pred[0]"][1]
    assert s["images"] == (B, 3, 16, 16)
    assert all(s[f"masks_enc[{i}]"] == (B, Kc) for i in range(nenc))
    assert all(s[f"masks_pred[{j}]"] == (B, Kt) for j in range(npred))
    assert s["patch_embed(images)"] == (B, N, D) and s["pos_embed"] == (1, N, D)
    assert s["gather(x + pos, masks_enc)"] == (nenc * B, Kc, D)
    assert s["repeat(npred, 1, 1)"] == (npred * nenc * B, Kc, P)
    assert s["mask tokens = mask_token + pos"] == (npred * nenc * B, Kt, P)
    assert s["cat([context, mask tokens], 1)"] == (npred * nenc * B, Kc + Kt, P)
    assert s["[:, Kc:] (pull the mask tokens)"] == (npred * nenc * B, Kt, P)
    assert s["predictor_proj"] == (npred * nenc * B, Kt, D)
    assert s["repeat_interleave_batch(h, B, nenc)"] == (npred * nenc * B, Kt, D)
    assert res["max_abs_diff"] <= 1e-5
    text = buf.getvalue()
    assert "equal the model's forward" in text and "(npred·nenc·B, Kc+Kt, P)" in text and "after the" not in text


def test_train_cli_trace_shapes(capsys):
    assert train_main(["--trace-shapes", *TINY, "data.batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "B=8 (data.batch_size=16, capped at 8" in out and "equal the model's forward" in out

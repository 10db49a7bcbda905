"""Evaluation: probe and k-NN, checkpoint formats, eval.json, CLI errors, non-TTY progress."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from fastjepa import encoder as encoders
from fastjepa import eval as ev
from fastjepa.architecture import arch_from_state, config_names
from fastjepa.build import build_model
from fastjepa.checkpoint import CheckpointError, save_checkpoint
from fastjepa.config import load_config
from fastjepa.evaluation import classifiers as clf
from fastjepa.evaluation import features as feat
from fastjepa.evaluation import probe
from fastjepa.masks import MaskCollator

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data.crop_size=16",
    "mask.patch_size=4",
    "mask.min_keep=0",
    "meta.model_name=vit_tiny",
    "meta.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
    "meta.pred_depth=1",
    "meta.pred_emb_dim=32",
]


def tiny_cfg(*extra):
    return load_config(None, [*TINY, *extra])


# -- a tiny learnable task: two kinds of shape at random places, in noise


class Shapes(Dataset):
    """Class 0: a hollow 7x7 square; class 1: a 'T' with a cross bar (7x7); pixel noise 0.4."""

    def __init__(self, n: int, seed: int, size: int = 16):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.zeros(n, 3, size, size)  # (n, 3, S, S)
        self.y = torch.arange(n) % 2  # (n,)
        L, c = 7, 3
        for i in range(n):
            top, left = torch.randint(0, size - L + 1, (2,), generator=g).tolist()
            img = self.x[i]
            if self.y[i] == 0:
                img[:, top, left : left + L] = img[:, top + L - 1, left : left + L] = 1
                img[:, top : top + L, left] = img[:, top : top + L, left + L - 1] = 1
            else:
                img[:, top + c, left : left + L] = img[:, top : top + L, left + c] = img[:, top, left : left + L] = 1
        self.x += 0.4 * torch.randn(self.x.shape, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_probe_beats_random_init_after_a_few_steps():
    """60 I-JEPA steps on the shapes: the target encoder's linear probe beats its own init.

    Seeds are fixed (model, data, masks) so the margin (~4 points here) is reproducible.
    """
    cfg = tiny_cfg()
    train, val = Shapes(400, seed=1), Shapes(400, seed=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    init = copy.deepcopy(model.target_encoder)
    collator = MaskCollator(
        input_size=16, patch_size=4, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5),
        nenc=1, npred=4, min_keep=0, backend="python", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.04)
    for _ in range(60):
        idx = torch.randint(0, len(train), (32,))
        (imgs, _), masks_enc, masks_pred = collator([train[i] for i in idx])
        loss = model(imgs, masks_enc, masks_pred)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target(0.99)
    before = clf.evaluate_encoder(init, train, val)
    after = clf.evaluate_encoder(model.target_encoder, train, val)
    assert 0.55 < before["linear_probe_top1"] < 0.9, before  # learnable, not solved by random features
    assert after["linear_probe_top1"] > before["linear_probe_top1"], (before, after)


# -- probes


def test_linear_probe_separable_and_chance():
    g = np.random.default_rng(0)
    x = g.normal(size=(400, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    res = clf.linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert res["top1"] > 0.95 and res["C"] in clf.C_GRID
    noise = clf.linear_probe(x[:300], g.integers(0, 2, 300), x[300:], g.integers(0, 2, 100), C=1.0)
    assert noise["top1"] < 0.75 and noise["C"] == 1.0


def test_knn_temperature_weighted_vote():
    # two close neighbours of class 1 outvote three far ones of class 0 at low temperature
    train = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.1, 1.0], [-0.2, 1.0]])
    labels = torch.tensor([1, 1, 0, 0, 0])
    q = torch.tensor([[1.0, 0.05]])
    assert clf.knn_classify(train, labels, q, k=5, temperature=0.07).tolist() == [1]
    assert clf.knn_classify(train, labels, q, k=5, temperature=1e4).tolist() == [0]  # ~ unweighted majority
    assert clf.knn_top1(train, labels, train, labels, k=1) == 1.0


def test_effective_rank_known_cases():
    g = np.random.default_rng()
    n, d = 2000, 16
    iso = g.normal(size=(n, d))
    assert d - 1.0 < clf.effective_rank(iso) <= d  # all directions used ~equally
    line = g.normal(size=(n, 1)) * g.normal(size=(1, d)) + g.normal(size=(1, d))  # one direction + a constant
    assert clf.effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    # two equal directions, the rest nearly empty; the offset and the scale do not matter
    two = np.concatenate([g.normal(size=(n, 2)), 1e-9 * g.normal(size=(n, d - 2))], axis=1)
    assert clf.effective_rank(two) == pytest.approx(2.0, abs=0.1)
    assert clf.effective_rank(5.0 * two + 3.0) == pytest.approx(clf.effective_rank(two), rel=1e-9)
    assert clf.effective_rank(np.ones((10, d))) == 0.0
    with pytest.raises(ValueError, match="features"):
        clf.effective_rank(np.ones((1, d)))


def test_four_layer_features_end_with_the_last_layer():
    enc = build_model(tiny_cfg("meta.model_kwargs={depth: 4, embed_dim: 32, num_heads: 2}")).target_encoder
    data = Shapes(20, seed=3)
    f1, y1 = feat.extract_features(enc, data, batch_size=8)
    f4, y4 = feat.extract_features(enc, data, layers=4, batch_size=8)
    assert f1.shape == (20, 32) and f4.shape == (20, 128)
    np.testing.assert_allclose(f4[:, -32:], f1, rtol=1e-5, atol=1e-6)
    assert (y1 == y4).all() and len(enc.blocks[-1]._forward_hooks) == 0
    with pytest.raises(encoders.EvalError, match="--layers"):
        feat.extract_features(enc, data, layers=2)


def test_feature_cache_hits_and_depends_on_weights(tmp_path):
    cfg = tiny_cfg()
    enc = build_model(cfg).target_encoder
    train, _, _ = feat.eval_datasets(cfg, "embedded")
    train = feat.limit(train, 64)
    a = feat.cached_features(enc, train, layers=1, cache_dir=tmp_path)
    b = feat.cached_features(enc, train, layers=1, cache_dir=tmp_path)
    assert not a[2] and b[2] and np.array_equal(a[0], b[0])
    with torch.no_grad():
        enc.norm.bias.add_(1.0)
    c = feat.cached_features(enc, train, layers=1, cache_dir=tmp_path)
    assert not c[2] and not np.allclose(a[0], c[0])


# -- checkpoints


@pytest.mark.parametrize("prefix", ["", "module."])
def test_reference_checkpoint_loads(tmp_path, prefix):
    """A dict in the reference's format (no config inside), with or without ``module.``."""
    cfg = tiny_cfg()
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))

    def sd(m):
        return {prefix + k: v for k, v in m.state_dict().items()}

    path = tmp_path / "IN1K-tiny.pth.tar"
    torch.save(
        {"encoder": sd(model.encoder), "predictor": sd(model.predictor), "target_encoder": sd(model.target_encoder),
         "opt": None, "scaler": None, "epoch": 7, "loss": 0.1, "batch_size": 8, "world_size": 1, "lr": 1e-3},
        path,
    )  # fmt: skip
    expected = model.target_encoder.state_dict()
    # architecture from overrides
    enc, _, info = encoders.load_run_encoder(path, overrides=TINY)
    assert info["format"] == "reference" and info["epoch"] == 7
    for k, v in enc.state_dict().items():
        assert torch.equal(v, expected[k]), k
    # architecture read off the weights
    enc2, cfg2, info2 = encoders.load_run_encoder(path)
    assert info2["architecture_from"] == "the checkpoint's weight shapes"
    assert (cfg2["data"]["crop_size"], cfg2["mask"]["patch_size"]) == (16, 4)
    assert all(torch.equal(v, expected[k]) for k, v in enc2.state_dict().items())
    # the context encoder instead (it differs from the perturbed target)
    ctx, _, info3 = encoders.load_run_encoder(path, overrides=TINY, which="context")
    assert info3["encoder"] == "context" and info["encoder"] == "target"
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in ctx.state_dict().items())
    assert any(not torch.equal(v, expected[k]) for k, v in ctx.state_dict().items())
    with pytest.raises(ValueError, match="which='student'"):
        encoders.load_run_encoder(path, overrides=TINY, which="student")
    # a wrong architecture says what to do
    with pytest.raises(CheckpointError, match="--config"):
        encoders.load_run_encoder(path, overrides=[*TINY, "meta.model_kwargs={depth: 3, embed_dim: 32, num_heads: 2}"])


def test_infer_architecture_of_standard_sizes():
    state = build_model(
        load_config(
            None,
            ["meta.model_name=vit_small", "meta.model_kwargs={}", "data.crop_size=64", "mask.patch_size=16", "mask.min_keep=0"],
        )
    )
    arch = config_names(arch_from_state(state.target_encoder.state_dict()))
    assert arch == {"model_name": "vit_small", "model_kwargs": {}, "patch_size": 16, "crop_size": 64}


def _fastjepa_checkpoint(tmp_path, cfg):
    torch.manual_seed(cfg["meta"]["seed"])  # as the trainer: this is the run's step-0 model
    model = build_model(cfg)
    path = tmp_path / "run" / "jepa-latest.pth.tar"
    save_checkpoint(path, model, epoch=1, loss=0.5, batch_size=8, lr=1e-3, extra={"config": cfg})
    return path


def test_cli_writes_eval_json(tmp_path, capsys):
    cfg = tiny_cfg()
    ckpt = _fastjepa_checkpoint(tmp_path, cfg)
    out = tmp_path / "eval"
    args = [
        "--checkpoint",
        str(ckpt),
        "--output",
        str(out),
        "--limit-train",
        "200",
        "--limit-val",
        "100",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert ev.main(args) == 0
    res = json.loads((out / "eval.json").read_text())
    for r in (res, res["random_init"]):
        assert 0.0 <= r["linear_probe_top1"] <= 1.0 and 0.0 <= r["knn_top1"] <= 1.0
        assert 1.0 <= r["feature_effective_rank"] <= r["feature_dim"]
    assert res["evaluated"] == "checkpoint" and res["checkpoint"]["architecture_from"] == "the checkpoint's config"
    assert res["data"]["n_train"] == 200 and res["data"]["n_val"] == 100 and res["knn"] == {"k": 20, "temperature": 0.07}
    # the checkpoint is the untrained init with the same seed: identical to the baseline
    assert res["linear_probe_top1"] == res["random_init"]["linear_probe_top1"]
    table = capsys.readouterr().out
    assert "random init" in table and "linear probe" in table and "difference" in table and "eff. rank" in table


def test_cli_context_encoder(tmp_path, capsys):
    """``--encoder context`` probes the checkpoint's context encoder, says so in the table
    and in eval.json, and gives other numbers than the target encoder when they differ."""
    cfg = tiny_cfg()
    torch.manual_seed(cfg["meta"]["seed"])
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = tmp_path / "run" / "jepa-latest.pth.tar"
    save_checkpoint(path, model, epoch=3, loss=0.5, batch_size=8, lr=1e-3, extra={"config": cfg})
    common = ["--checkpoint", str(path), "--limit-train", "100", "--limit-val", "60", "--no-cache", "--no-baseline"]
    assert ev.main([*common, "--output", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    assert ev.main([*common, "--output", str(tmp_path / "c"), "--encoder", "context"]) == 0
    assert "context encoder" in capsys.readouterr().out
    t = json.loads((tmp_path / "t" / "eval.json").read_text())
    c = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert (t["encoder"], c["encoder"]) == ("target", "context") and c["checkpoint"]["encoder"] == "context"
    assert c["feature_effective_rank"] != t["feature_effective_rank"]
    # --epochs says so on each row too
    save_checkpoint(path.parent / "jepa-ep3.pth.tar", model, epoch=3, loss=0.5, batch_size=8, lr=1e-3, extra={"config": cfg})
    assert ev.main([*common, "--output", str(tmp_path / "e"), "--encoder", "context", "--epochs", "all"]) == 0
    assert "epoch 3, context encoder" in capsys.readouterr().out
    e = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert e["encoder"] == "context" and e["feature_effective_rank"] == c["feature_effective_rank"]


def test_cli_epochs_evaluates_each_epoch_checkpoint(tmp_path, capsys):
    cfg = tiny_cfg()
    run = tmp_path / "run"
    torch.manual_seed(cfg["meta"]["seed"])
    model = build_model(cfg)
    for epoch in (1, 2, 10):  # the weights differ per epoch
        if epoch > 1:
            with torch.no_grad():
                for p in model.target_encoder.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        save_checkpoint(
            run / f"jepa-ep{epoch}.pth.tar", model, epoch=epoch, loss=0.5, batch_size=8, lr=1e-3, extra={"config": cfg}
        )
    (run / "jepa-latest.pth.tar").write_bytes((run / "jepa-ep10.pth.tar").read_bytes())
    common = ["--limit-train", "120", "--limit-val", "60", "--cache-dir", str(tmp_path / "c")]
    assert ev.main(["--checkpoint", str(run), "--epochs", "all", *common]) == 0
    res = json.loads((run / "eval.json").read_text())
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 10]  # numeric order, not 1, 10, 2
    assert res["evaluated"] == "epochs" and res["linear_probe_top1"] == res["epochs"][-1]["linear_probe_top1"]
    for r in [*res["epochs"], res["random_init"]]:
        assert 0.0 <= r["linear_probe_top1"] <= 1.0 and 1.0 <= r["feature_effective_rank"] <= r["feature_dim"]
    assert res["epochs"][0]["checkpoint"]["path"].endswith("jepa-ep1.pth.tar")
    # epoch 1 is the seed's init, the baseline; later epochs are other weights
    assert res["epochs"][0]["feature_effective_rank"] == pytest.approx(res["random_init"]["feature_effective_rank"])
    assert res["epochs"][2]["feature_effective_rank"] != pytest.approx(res["random_init"]["feature_effective_rank"])
    table = capsys.readouterr().out
    assert all(f"epoch {e}" in table for e in (1, 2, 10)) and "random init" in table and "eff. rank" in table
    # a list, given through any checkpoint in the run folder
    out = tmp_path / "sel"
    assert ev.main(["--checkpoint", str(run / "jepa-latest.pth.tar"), "--epochs", "10,2", "--output", str(out), *common]) == 0
    assert [e["epoch"] for e in json.loads((out / "eval.json").read_text())["epochs"]] == [2, 10]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "3"], "no checkpoint for epoch\\(s\\) \\[3\\].*it has \\[1\\]"),
        (["--epochs", "one"], "expected 'all' or epoch numbers"),
    ],
)
def test_cli_epochs_errors_say_what_to_do(tmp_path, capsys, args, message):
    cfg = tiny_cfg()
    _fastjepa_checkpoint(tmp_path, cfg)
    run = tmp_path / "run"
    (run / "jepa-ep1.pth.tar").write_bytes((run / "jepa-latest.pth.tar").read_bytes())
    assert ev.main(["--checkpoint", str(run), *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_epochs_in_a_folder_without_epoch_checkpoints(tmp_path, capsys):
    _fastjepa_checkpoint(tmp_path, tiny_cfg())
    assert ev.main(["--checkpoint", str(tmp_path / "run"), "--epochs", "all"]) == 2
    assert "logging.checkpoint_freq=1" in capsys.readouterr().err


def test_cli_random_init_only(tmp_path):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(
        "data: {crop_size: 16}\nmask: {patch_size: 4, min_keep: 0}\n"
        "meta: {model_name: vit_tiny, model_kwargs: {depth: 1, embed_dim: 32, num_heads: 2}, pred_depth: 1, pred_emb_dim: 16}\n"
    )
    out = tmp_path / "ev"
    args = [
        "--random-init",
        "--config",
        str(cfg_file),
        "--output",
        str(out),
        "--limit-train",
        "100",
        "--limit-val",
        "50",
        "--no-cache",
    ]
    assert ev.main(args) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["evaluated"] == "random_init" and res["checkpoint"] is None
    assert res["linear_probe_top1"] == res["random_init"]["linear_probe_top1"]


def test_cli_missing_checkpoint_says_what_to_do(tmp_path, capsys):
    (tmp_path / "jepa-latest.pth.tar").write_bytes(b"")
    assert ev.main(["--checkpoint", str(tmp_path / "jepa-lastest.pth.tar")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "jepa-latest.pth.tar" in err and "--random-init" in err
    assert ev.main([]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    # a damaged file fails loudly too
    assert ev.main(["--checkpoint", str(tmp_path / "jepa-latest.pth.tar")]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_cuda_asked_for_but_absent_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev.main(["--random-init", "--device", "cuda", "--output", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda, but no CUDA device is visible here" in err and "set --device cpu (or --device auto)" in err
    assert not (tmp_path / "ev").exists()


def test_quick_probe_writes_json(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    ckpt = _fastjepa_checkpoint(tmp_path, cfg)
    monkeypatch.setattr(probe, "QUICK_TRAIN", 100)
    res = probe.quick_probe(ckpt.parent, cfg, cache_dir=tmp_path / "c")
    assert set(res["random_init"]) >= {"linear_probe_top1", "knn_top1"}
    assert res["quick"] and json.loads((ckpt.parent / "eval.json").read_text())["linear_probe_top1"] == res["linear_probe_top1"]


def test_progress_bars_do_not_break_non_tty_runs(tmp_path):
    """A piped run (stderr not a terminal) finishes, prints the table and no bar redraws."""
    cfg = tiny_cfg()
    ckpt = _fastjepa_checkpoint(tmp_path, cfg)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "fastjepa.eval",
        "--checkpoint",
        str(ckpt),
        "--limit-train",
        "100",
        "--limit-val",
        "50",
        "--no-cache",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "linear probe" in proc.stdout and "\r" not in proc.stderr and "it/s" not in proc.stderr
    assert (ckpt.parent / "eval.json").is_file()


def test_cli_image_folders(tmp_path):
    from PIL import Image

    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, cls in enumerate(("bright", "dark")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(6):
                px = g.integers(0, 80, (20, 20, 3)) + (160 if k == 0 else 0)
                Image.fromarray(px.astype(np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    cfg = tiny_cfg()
    ckpt = _fastjepa_checkpoint(tmp_path, cfg)
    args = ["--checkpoint", str(ckpt), "--data", "imagefolder", "--train-dir", str(tmp_path / "train"), "--val-dir", str(tmp_path / "val"),
            "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--no-baseline"]  # fmt: skip
    assert ev.main(args) == 0
    res = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert res["data"]["n_train"] == 12 and res["data"]["n_val"] == 12 and res["random_init"] is None
    assert res["linear_probe_top1"] == 1.0  # brightness is linearly separable even at random init
    assert ev.main(["--checkpoint", str(ckpt), "--data", "imagefolder", "--train-dir", str(tmp_path / "train")]) == 2

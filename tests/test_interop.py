"""Hugging Face and timm weights both ways, the feature API, any input size, torch.hub,
the meta device and the extension's torch-version check (docs/interop.md).

transformers is a test dependency (the ``test`` extra); these tests skip, saying why,
where it does not import. timm is imported for real where it imports; where it cannot
(its torchvision dependency has no build for a CPU torch 2.13), a test-only stub of the
torchvision modules timm's imports name (none of which the ViT path uses) is put in
``sys.modules`` for the duration of those tests. The timm key layout is also checked
against :data:`TIMM_VIT_KEYS`, written from timm's source, without importing timm.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import fastjepa
from fastjepa import IJEPA, checkpoint, models
from fastjepa.checkpoint import CheckpointError, save_checkpoint
from fastjepa.checkpoint.__main__ import main as checkpoint_cli
from fastjepa.checkpoint.formats import fastjepa_to_hf, hf_config, hf_to_fastjepa
from fastjepa.config import load_config
from fastjepa.architecture import arch_from_module
from fastjepa.encoder import export_encoder
from fastjepa.interop import read_encoder
from fastjepa.masks import MaskCollator
from fastjepa.ops import available, use_backend

from ._tiny import TINY

ROOT = Path(__file__).resolve().parents[1]

# timm's VisionTransformer(class_token=False, global_pool="avg", fc_norm=False, num_classes=0) — I-JEPA's
# configuration in timm (vit_huge_patch14_gap_224.in1k_ijepa) — read off timm/models/vision_transformer.py:
# pos_embed (1, N, D) with no prefix token; PatchEmbed.proj (Conv2d); Block: norm1, attn (qkv fused, proj),
# ls1/ls2 Identity (no init_values), norm2, mlp (fc1, fc2); norm_pre/fc_norm/head Identity; final norm.
TIMM_BLOCK_KEYS = [
    ("norm1.weight", "D"), ("norm1.bias", "D"), ("attn.qkv.weight", "3D,D"), ("attn.qkv.bias", "3D"),
    ("attn.proj.weight", "D,D"), ("attn.proj.bias", "D"), ("norm2.weight", "D"), ("norm2.bias", "D"),
    ("mlp.fc1.weight", "H,D"), ("mlp.fc1.bias", "H"), ("mlp.fc2.weight", "D,H"), ("mlp.fc2.bias", "D"),
]  # fmt: skip


def timm_vit_keys(D: int, depth: int, N: int, patch: int, C: int = 3, H: int | None = None) -> dict[str, tuple[int, ...]]:
    H = H or 4 * D
    size = {"D": D, "3D": 3 * D, "H": H}
    out = {"pos_embed": (1, N, D), "patch_embed.proj.weight": (D, C, patch, patch), "patch_embed.proj.bias": (D,)}
    for i in range(depth):
        for name, shape in TIMM_BLOCK_KEYS:
            out[f"blocks.{i}.{name}"] = tuple(size[s] for s in shape.split(","))
    out.update({"norm.weight": (D,), "norm.bias": (D,)})
    return out


# -- third-party imports


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    try:
        from transformers import IJepaConfig, IJepaModel
    except ImportError as exc:
        pytest.skip(f"transformers' IJepaModel does not import here: {exc}")
    return types.SimpleNamespace(Config=IJepaConfig, Model=IJepaModel)


class _Any(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any(name, (), {})

    def __call__(cls, *args, **kwargs):
        return _Any("stub", (), {})

    def __iter__(cls):
        return iter(())


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any(name, (), {})


_TV = ["torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms", "torchvision.transforms.functional",
       "torchvision.transforms.v2", "torchvision.utils", "torchvision.models", "torchvision.models.feature_extraction",
       "torchvision.datasets"]  # fmt: skip


@pytest.fixture(scope="module")
def timm():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    try:
        import timm as real

        yield real
        return
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("torchvision"):
            pytest.skip(f"timm does not import: {exc}")
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        del sys.modules[name]
    for name in _TV:
        mod = _StubModule(name)
        mod.__path__ = []
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = mod
    for name in _TV:
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        import timm as stubbed

        yield stubbed
    finally:
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.") or m in _TV]:
            del sys.modules[name]


# -- helpers


def _trained_model(embed_dim=192, heads=3, depth=2, img=32, patch=8, seed=0):
    torch.manual_seed(seed)
    enc = models.vit_tiny(depth=depth, img_size=img, patch_size=patch, embed_dim=embed_dim, num_heads=heads)
    pred = models.vit_predictor(num_patches=(img // patch) ** 2, embed_dim=embed_dim, predictor_embed_dim=48, depth=1, num_heads=heads)
    model = IJEPA(enc, pred)
    with torch.no_grad():  # the target differs from the context encoder, as after EMA steps
        for p in model.target_encoder.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _run_folder(tmp_path, *, embed_dim=64, heads=4, with_eval=True):
    """A run folder as training leaves it: jepa-latest.pth.tar with its config, and eval.json."""
    cfg = load_config(None, [*TINY, f"meta.model_kwargs={{depth: 2, embed_dim: {embed_dim}, num_heads: {heads}}}", "data.crop_size=32",
                             "mask.patch_size=8", "optimization.epochs=7"])  # fmt: skip
    model = _trained_model(embed_dim=embed_dim, heads=heads)
    run = tmp_path / "run"
    save_checkpoint(run / "jepa-latest.pth.tar", model, epoch=7, loss=0.1, batch_size=8, lr=1e-3, extra={"config": cfg})
    if with_eval:
        probe = {"linear_probe_top1": 0.8125, "knn_top1": 0.75, "epoch": 7, "data": {"description": "embedded MNIST-5k"},
                 "random_init": {"linear_probe_top1": 0.5, "knn_top1": 0.4375}}  # fmt: skip
        (run / "eval.json").write_text(json.dumps(probe))
    return run, model


def _tokens(module, x):
    module.eval()
    with torch.no_grad():
        return module(x)


def _hf_tokens(hf_model, x, **kw):
    hf_model.eval()
    with torch.no_grad():
        return hf_model(pixel_values=x, **kw).last_hidden_state


# -- Hugging Face


def test_export_hf_loads_in_transformers_with_equal_features(tmp_path, hf, capsys):
    run, model = _run_folder(tmp_path)
    out = tmp_path / "hf"
    assert checkpoint_cli(["export", str(run), str(out), "--format", "hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded, info = hf.Model.from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["layer_norm_eps"]) == (64, 4, 2, 1e-6)
    assert (cfg["image_size"], cfg["patch_size"], cfg["intermediate_size"]) == (32, 8, 256)
    x = torch.randn(3, 3, 32, 32)
    want = _tokens(model.target_encoder, x)
    torch.testing.assert_close(_hf_tokens(loaded, x), want, atol=1e-5, rtol=1e-5)
    # the model card: config, data, epochs and the run's probe numbers
    card = (out / "README.md").read_text()
    for text in ("target encoder", "fixed 2-D sin-cos one", "epochs: 7", "synthetic", "81.2 %", "75.0 %", "random init | 50.0 %", "IJepaModel.from_pretrained", "library_name: transformers"):
        assert text in card, text
    # and back: fastjepa.load_encoder reads the folder, bit for bit
    back = fastjepa.load_encoder(out)
    assert isinstance(back, models.VisionTransformer) and not back.training
    assert back.fastjepa_source["layout"] == "hf" and back.fastjepa_source["architecture_from"] == "config.json"
    for k, v in model.target_encoder.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert torch.equal(_tokens(back, x), want)
    assert back.pos_embed.requires_grad is False and back.blocks[0].attn.qkv.weight.requires_grad


def test_export_hf_which_context(tmp_path, hf):
    run, model = _run_folder(tmp_path, with_eval=False)
    out = tmp_path / "ctx"
    assert checkpoint_cli(["export", str(run), str(out), "--format", "hf", "--which", "context"]) == 0
    loaded = hf.Model.from_pretrained(out)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_hf_tokens(loaded, x), _tokens(model.encoder, x), atol=1e-5, rtol=1e-5)
    assert "context encoder" in (out / "README.md").read_text() and "Frozen-feature" not in (out / "README.md").read_text()


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_to_fastjepa_to_hf(tmp_path, hf, qkv_bias):
    torch.manual_seed(1)
    config = hf.Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                       patch_size=8, qkv_bias=qkv_bias)  # fmt: skip  # layer_norm_eps: transformers' default 1e-12
    original = hf.Model(config).eval()
    src = tmp_path / "hf"
    original.save_pretrained(src)
    x = torch.randn(2, 3, 32, 32)
    want = _hf_tokens(original, x)
    for path in (src, src / "model.safetensors"):
        enc = fastjepa.load_encoder(path)
        assert arch_from_module(enc) == {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0, "patch_size": 8, "img_size": 32,
                                        "in_chans": 3, "qkv_bias": qkv_bias, "norm_eps": 1e-12}  # fmt: skip
        torch.testing.assert_close(_tokens(enc, x), want, atol=1e-5, rtol=1e-5)
    out = tmp_path / "again"
    export_encoder(src, out, format="hf")
    assert "not the fixed 2-D sin-cos one" in (out / "README.md").read_text()  # a random IJepaModel's table
    again, info = hf.Model.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    for (k1, v1), (k2, v2) in zip(sorted(original.state_dict().items()), sorted(again.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2), k1
    assert again.config.layer_norm_eps == original.config.layer_norm_eps and again.config.qkv_bias == qkv_bias


def test_hf_names_map_both_ways_without_transformers():
    enc = models.vit_tiny(depth=2, img_size=32, patch_size=8)
    state = enc.state_dict()
    hf_state = fastjepa_to_hf(state)
    assert len(hf_state) == len(state) + 2 * 4  # qkv weight and bias become three tensors each, per block
    assert "encoder.layer.1.attention.attention.value.bias" in hf_state
    back = hf_to_fastjepa(hf_state)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # transformers 5's in-memory names and IJepaForImageClassification's prefix read the same
    memory = {k.replace("encoder.layer.", "layers.").replace("attention.attention.query", "attention.q_proj"): v for k, v in hf_state.items()}
    memory = {("ijepa." + k): v for k, v in memory.items() if "query" not in k}
    assert "ijepa.layers.0.attention.q_proj.weight" in memory
    assert hf_config(arch_from_module(enc))["layer_norm_eps"] == 1e-6


def test_eval_cli_takes_an_hf_folder(tmp_path, hf, capsys):
    from fastjepa import eval as ev

    original = hf.Model(hf.Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                                  patch_size=7, layer_norm_eps=1e-6))  # fmt: skip
    original.save_pretrained(tmp_path / "hf")
    args = ["--checkpoint", str(tmp_path / "hf"), "--limit-train", "60", "--limit-val", "30", "--no-cache", "--no-baseline", "--output", str(tmp_path / "e")]
    assert ev.main(args) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert res["checkpoint"]["format"] == "hf" and 0.0 <= res["linear_probe_top1"] <= 1.0


def test_eval_cli_takes_a_run_folder_saying_which_checkpoint(tmp_path, capsys):
    from fastjepa import eval as ev

    run, _ = _run_folder(tmp_path, with_eval=False)
    args = ["--checkpoint", str(run), "--limit-train", "40", "--limit-val", "20", "--no-cache", "--no-baseline"]
    assert ev.main(args) == 0
    assert f"{run} is a run folder: evaluating jepa-latest.pth.tar" in capsys.readouterr().err
    res = json.loads((run / "eval.json").read_text())  # written into the run folder
    assert res["checkpoint"]["chosen"] == "latest" and res["checkpoint"]["epoch"] == 7


# -- timm


def test_export_timm_key_layout_matches_timm(tmp_path):
    run, model = _run_folder(tmp_path, with_eval=False)
    out = tmp_path / "timm"
    assert checkpoint_cli(["export", str(run), str(out), "--format", "timm"]) == 0
    from safetensors.torch import load_file

    state = load_file(out / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == timm_vit_keys(64, 2, 16, 8)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_args"] | {} == cfg["model_args"] and cfg["model_args"]["class_token"] is False
    assert (cfg["model_args"]["global_pool"], cfg["model_args"]["num_heads"], cfg["num_classes"]) == ("avg", 4, 0)
    assert 'timm.create_model("local-dir:' in (out / "README.md").read_text()
    back = fastjepa.load_encoder(out)
    assert back.fastjepa_source["layout"] == "timm" and back.num_heads == 4
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_tokens(back, x), _tokens(model.target_encoder, x))


def test_fastjepa_to_timm_and_back(tmp_path, timm):
    run, model = _run_folder(tmp_path, with_eval=False)
    out = tmp_path / "timm"
    export_encoder(run, out, format="timm")
    tm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert {k: tuple(v.shape) for k, v in tm.state_dict().items()} == timm_vit_keys(64, 2, 16, 8)
    x = torch.randn(2, 3, 32, 32)
    enc = model.target_encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(tm.forward_features(x), enc.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tm(x), enc.forward_head(enc.forward_features(x), pre_logits=True), atol=1e-5, rtol=1e-5)
    # a plain timm state dict (torch.save) loads too; the head count is not in the weights: the
    # standard one for the width is taken (64 is no standard width: 64 / 64 = 1 head)
    torch.save(tm.state_dict(), tmp_path / "timm_vit.pth")
    back = fastjepa.load_encoder(tmp_path / "timm_vit.pth")
    assert back.fastjepa_source["layout"] == "timm" and back.num_heads == 1
    assert all(torch.equal(back.state_dict()[k], v) for k, v in enc.state_dict().items())
    tiny = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8, class_token=False, global_pool="avg",
                             fc_norm=False, num_classes=0).eval()  # fmt: skip
    torch.save({"state_dict": tiny.state_dict()}, tmp_path / "tiny.pth")
    back = fastjepa.load_encoder(tmp_path / "tiny.pth")
    assert back.num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(_tokens(back, x), tiny.forward_features(x), atol=1e-5, rtol=1e-5)


def test_timm_builds_the_exported_huge_encoder(tmp_path, timm):
    enc = models.vit_huge(patch_size=14, img_size=28, depth=1).eval()
    out = tmp_path / "h"
    state = dict(enc.state_dict())
    from fastjepa.checkpoint import save_safetensors
    from fastjepa.checkpoint.formats import dumps_config, timm_config

    out.mkdir()
    save_safetensors(state, {"format": "pt"}, out / "model.safetensors")
    cfg = timm_config(arch_from_module(enc))
    assert cfg["architecture"] == "vit_huge_patch14_gap_224"
    (out / "config.json").write_text(dumps_config(cfg))
    tm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(tm.forward_features(x), enc(x), atol=1e-4, rtol=1e-4)


# -- every layout load_encoder reads


def test_load_encoder_reads_every_layout(tmp_path, caplog):
    run, model = _run_folder(tmp_path, with_eval=False)
    want = model.target_encoder.state_dict()

    def same(enc, ref=want):
        return enc.state_dict().keys() == ref.keys() and all(torch.equal(enc.state_dict()[k], v) for k, v in ref.items())

    # a run folder: latest, then best when there is one (saying which)
    enc = fastjepa.load_encoder(run)
    assert same(enc) and enc.fastjepa_source["chosen"] == "latest" and enc.num_heads == 4  # heads from the stored config
    best = _trained_model(embed_dim=64, heads=4, seed=5)
    save_checkpoint(run / "jepa-best.pth.tar", best, epoch=4, loss=0.1, batch_size=8, lr=1e-3,
                    extra={"config": read_encoder(run).info["config"]})  # fmt: skip
    with caplog.at_level("INFO", logger="fastjepa.interop"):
        enc = fastjepa.load_encoder(run)
    assert same(enc, best.target_encoder.state_dict()) and enc.fastjepa_source["chosen"] == "best" and enc.fastjepa_source["epoch"] == 4
    assert "best checkpoint jepa-best.pth.tar" in caplog.text
    # the context encoder, by name
    assert same(fastjepa.load_encoder(run / "jepa-latest.pth.tar", which="context"), model.encoder.state_dict())
    # the reference's .pth.tar: module.-prefixed keys, no config (architecture from the shapes)
    ref = {name: {f"module.{k}": v for k, v in getattr(model, name).state_dict().items()} for name in ("encoder", "predictor", "target_encoder")}
    torch.save({**ref, "opt": None, "scaler": None, "epoch": 3, "loss": 0.0, "batch_size": 8, "world_size": 1, "lr": 0.0}, tmp_path / "ref.pth.tar")
    enc = fastjepa.load_encoder(tmp_path / "ref.pth.tar")
    assert isinstance(enc, models.VisionTransformer) and same(enc) and enc.fastjepa_source["layout"] == "reference checkpoint"
    with pytest.raises(TypeError, match="fastjepa.load_encoder"):  # the checkpoint layer builds no model: it names the call that does
        checkpoint.load_encoder(tmp_path / "ref.pth.tar")
    # ... and the call with a model keeps working
    target = models.vit_tiny(depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=4)
    assert checkpoint.load_encoder(tmp_path / "ref.pth.tar", target)["epoch"] == 3 and same(target)
    # fastjepa's safetensors export
    assert checkpoint_cli(["export", str(run / "jepa-latest.pth.tar"), str(tmp_path / "enc.safetensors")]) == 0
    enc = fastjepa.load_encoder(tmp_path / "enc.safetensors")
    assert same(enc) and enc.num_heads == 4 and enc.fastjepa_source["layout"] == "fastjepa safetensors"
    # a model built on the meta device and the weights assigned: usable on the CPU at once
    assert all(p.device.type == "cpu" for p in enc.parameters())


@pytest.mark.parametrize(
    "make, found",
    [
        (lambda d: (d / "notes.txt").write_text("hi") and d, "a folder holding \\['notes.txt'\\]"),
        (lambda d: torch.save({"foo": torch.zeros(2)}, d / "w.pth") or d / "w.pth", "1 keys \\('foo'\\)"),
        (lambda d: (d / "config.json").write_text('{"model_type": "bert"}') and torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin") or d,
         "model_type 'bert'"),
    ],
)  # fmt: skip
def test_unknown_layout_names_what_it_found_and_what_is_read(tmp_path, capsys, make, found):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=found) as err:
        fastjepa.load_encoder(path)
    assert "Hugging Face IJepaModel folder" in str(err.value) and "timm VisionTransformer" in str(err.value)
    from fastjepa import eval as ev

    assert ev.main(["--checkpoint", str(path), "--no-baseline"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "fastjepa reads" in err_lines[0]


def test_export_folder_formats_need_a_folder(tmp_path, capsys):
    run, _ = _run_folder(tmp_path, with_eval=False)
    (tmp_path / "file").write_text("")
    assert checkpoint_cli(["export", str(run), str(tmp_path / "file"), "--format", "hf"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert checkpoint_cli(["export", str(run), str(tmp_path / "out")]) == 2
    assert "--format hf" in capsys.readouterr().err


def test_an_hf_folder_loads_with_a_config_and_exports_to_safetensors(tmp_path):
    """A folder of another tool is a source like a run folder: with --config its encoder is
    built from the config, and the safetensors export reads the folder as it is."""
    from fastjepa import encoder as encoders
    from fastjepa.checkpoint import read_safetensors
    from fastjepa.config import dump_config

    torch.manual_seed(3)
    enc = models.vit_tiny(depth=2, embed_dim=64, num_heads=4, patch_size=8, img_size=32).eval()
    export_encoder_state(enc, tmp_path / "hf")
    cfg = load_config(None, [*TINY, "meta.model_kwargs={depth: 2, embed_dim: 64, num_heads: 4}", "data.crop_size=32", "mask.patch_size=8"])
    dump_config(cfg, tmp_path / "cfg.yaml")
    got, _, info = encoders.load_run_encoder(tmp_path / "hf", config=tmp_path / "cfg.yaml")
    assert info["architecture_from"] == f"--config {tmp_path / 'cfg.yaml'}" and info["format"] == "hf"
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in got.state_dict().items())
    out = export_encoder(tmp_path / "hf", tmp_path / "enc.safetensors")
    assert (out["format"], out["network"], out["arch"]["embed_dim"], out["arch"]["num_heads"]) == ("safetensors", "target_encoder", 64, 4)
    state, meta = read_safetensors(tmp_path / "enc.safetensors")
    assert meta["num_heads"] == "4" and sorted(state) == sorted(enc.state_dict())
    assert all(torch.equal(state[k], v) for k, v in enc.state_dict().items())


# -- any input size


@pytest.mark.parametrize("size", [160, 288])
def test_other_sizes_match_transformers_interpolate_pos_encoding(tmp_path, hf, size):
    torch.manual_seed(2)
    enc = models.vit_tiny(depth=2).eval()  # 224 px, patch 16
    x = torch.randn(2, 3, size, size)
    out = tmp_path / "hf"
    export_encoder_state(enc, out)
    hf_model = hf.Model.from_pretrained(out).eval()
    # the fixed sin-cos table, recomputed for the grid: exactly a model built for that size
    built = models.vit_tiny(depth=2, img_size=size)
    built.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "pos_embed"}, strict=False)
    assert torch.equal(_tokens(enc, x), _tokens(built, x))
    # interpolated: what transformers does (and what "auto" does for a table that is not the sin-cos one)
    enc.pos_embed_resize = "interpolate"
    torch.testing.assert_close(_tokens(enc, x), _hf_tokens(hf_model, x, interpolate_pos_encoding=True), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        enc.pos_embed.add_(0.01 * torch.randn_like(enc.pos_embed))
        hf_model.embeddings.position_embeddings.copy_(enc.pos_embed)
    enc.pos_embed_resize = "auto"
    torch.testing.assert_close(_tokens(enc, x), _hf_tokens(hf_model, x, interpolate_pos_encoding=True), atol=1e-5, rtol=1e-5)
    # a non-square input runs too
    assert _tokens(enc, torch.randn(1, 3, size, 224)).shape == (1, size // 16 * 14, 192)


def export_encoder_state(enc, out):
    """An encoder object to an HF folder (what export writes, from a module instead of a run)."""
    from fastjepa.checkpoint import save_safetensors
    from fastjepa.checkpoint.formats import dumps_config

    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(fastjepa_to_hf(enc.state_dict()), {"format": "pt"}, out / "model.safetensors")
    (out / "config.json").write_text(dumps_config(hf_config(arch_from_module(enc))))


def _backends():
    out = ["reference"]
    for name in ("cpp", "triton"):
        if available()[name]:
            out.append(name)
    return out


@pytest.mark.parametrize("backend", _backends())
def test_masked_forward_at_another_grid(backend):
    torch.manual_seed(3)
    enc = models.vit_tiny(depth=2, img_size=32, patch_size=8, embed_dim=48, num_heads=2).eval()  # built for a 4 x 4 grid
    collate = MaskCollator(input_size=(48, 40), patch_size=8, nenc=1, npred=2, min_keep=2)  # a 6 x 5 grid
    imgs = torch.randn(4, 3, 48, 40)
    _, masks_enc, masks_pred = collate([(imgs[i], 0) for i in range(4)])
    assert int(torch.cat([m.flatten() for m in masks_enc + masks_pred]).max()) < 30
    full = _tokens(enc, imgs)  # (4, 30, D) — unmasked, then gathered by hand below
    pos = enc.pos_embed_for(6, 5)
    assert pos.shape == (1, 30, 48)
    with use_backend(backend), torch.no_grad():
        got = enc(imgs, masks_enc)
        tokens = enc.patch_embed(imgs) + pos  # (4, 30, D)
        by_hand = torch.cat([torch.gather(tokens, 1, m.unsqueeze(-1).expand(-1, -1, 48)) for m in masks_enc])
        want = enc.norm(enc.blocks[1](enc.blocks[0](by_hand)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert full.shape == (4, 30, 48)


# -- the feature API


def test_feature_api_names():
    torch.manual_seed(4)
    enc = models.vit_tiny(depth=4, img_size=32, patch_size=8, embed_dim=48, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc.forward_features(x)
        assert torch.equal(tokens, enc(x))
        assert torch.equal(enc.forward_head(tokens, pre_logits=True), tokens.mean(dim=1))
        layers = enc.get_intermediate_layers(x, 4)
        assert len(layers) == 4 and torch.equal(layers[-1], tokens)
        raw = enc.get_intermediate_layers(x, [0, -1], norm=False)
        h = enc.patch_embed(x) + enc.pos_embed
        h0 = enc.blocks[0](h)
        assert torch.equal(raw[0], h0) and torch.equal(enc.norm(raw[1]), tokens)
        maps = enc.get_intermediate_layers(x, 1, reshape=True)
        assert maps[0].shape == (2, 48, 4, 4) and torch.equal(maps[0][:, :, 1, 2], tokens[:, 1 * 4 + 2])
    with pytest.raises(ValueError, match="no class token"):
        enc.get_intermediate_layers(x, 1, return_class_token=True)
    with pytest.raises(ValueError, match="n=5: expected 1 to the depth \\(4\\)"):
        enc.get_intermediate_layers(x, 5)


# -- torch.hub, the meta device, the extension's torch version


def test_hubconf_entry_points(tmp_path):
    enc = torch.hub.load(str(ROOT), "vit_tiny", source="local", depth=1, img_size=32, patch_size=8)
    assert isinstance(enc, models.VisionTransformer) and enc.patch_embed.grid_size == 4
    run, model = _run_folder(tmp_path, with_eval=False)
    loaded = torch.hub.load(str(ROOT), "encoder", str(run), source="local")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.target_encoder.state_dict().items())


def test_encoders_build_on_the_meta_device():
    with torch.device("meta"):
        enc = models.vit_tiny()
        pred = models.vit_predictor(num_patches=196, embed_dim=192, predictor_embed_dim=96, depth=2, num_heads=3)
        big = models.vit_huge(patch_size=14)
    assert {p.device.type for m in (enc, pred, big) for p in m.parameters()} == {"meta"}
    enc = enc.to_empty(device="cpu")
    enc.load_state_dict(models.vit_tiny().state_dict())
    assert enc(torch.randn(1, 3, 224, 224)).shape == (1, 196, 192)


def test_extension_built_for_another_torch_warns(monkeypatch):
    from fastjepa import info
    from fastjepa.ops import _dispatch

    fake = types.SimpleNamespace(build_info=lambda: {"compiler": "gcc", "torch": "1.0.0", "cuda": "no"}, WITH_CUDA=False)
    real = importlib.import_module
    monkeypatch.setattr(_dispatch.importlib, "import_module", lambda name, *a: fake if name == "fastjepa._C" else real(name, *a))
    monkeypatch.setattr(info.importlib, "import_module", lambda name, *a: fake if name == "fastjepa._C" else real(name, *a))
    _dispatch._cpp_available.cache_clear()
    try:
        with pytest.warns(_dispatch.ExtensionVersionWarning, match=f"built for torch 1.0.0 but torch {torch.__version__.split('+')[0]} is running"):
            assert _dispatch._cpp_available().ok
        row = next(r for r in info.rows() if r[0] == "fastjepa._C")
        assert "WARNING" in row[2] and "rebuild" in row[2]
        same = types.SimpleNamespace(build_info=lambda: {"torch": torch.__version__.split("+")[0]})
        assert _dispatch.cpp_torch_mismatch(same) is None
    finally:
        monkeypatch.undo()
        _dispatch._cpp_available.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", _dispatch.ExtensionVersionWarning)
        _dispatch._cpp_available()  # the real extension, built for this torch: no warning

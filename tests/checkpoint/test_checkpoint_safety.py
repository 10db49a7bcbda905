"""Opening a checkpoint never runs its code: weights-only loading everywhere, a clear
refusal with an explicit opt-in, a converter for earlier checkpoints, and safetensors
encoders for sharing. The payload tests use a real code-running pickle whose side effect
is writing a file, and check that the file was (not) written."""

import ast
import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastjepa import checkpoint as ck
from fastjepa import encoder as encoders
from fastjepa import eval as ev
from fastjepa import rng
from fastjepa import train as train_cli
from fastjepa.checkpoint import __main__ as checkpoint_cli
from fastjepa.checkpoint import (
    CheckpointError,
    TrustedCheckpointWarning,
    UnsafeCheckpointError,
    load_checkpoint,
    load_encoder,
    read_checkpoint,
    read_safetensors,
)
from fastjepa.build import build_model
from fastjepa.config import load_config
from fastjepa.models import vit_tiny
from fastjepa.training.trainer import Trainer

from .._tiny import TINY

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "fastjepa"


class Payload:
    """Unpickling this runs ``exec``: it writes ``marker``. Nothing else in the file needs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run: one epoch of the tiny config (2 planned), its checkpoint as written."""
    out = tmp_path_factory.mktemp("run")
    Trainer(load_config(None, [*TINY, "meta.max_steps=6"]), out, quiet=True).fit()
    return out, read_checkpoint(out / "jepa-latest.pth.tar")


def _poisoned(trained, folder):
    """``folder/jepa-latest.pth.tar``: the trained checkpoint plus a payload; the marker it would write."""
    _, ckpt = trained
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "PAYLOAD_RAN"
    bad = dict(ckpt, fastjepa={**ckpt["fastjepa"], "note": Payload(marker)})
    torch.save(bad, folder / "jepa-latest.pth.tar")
    return folder / "jepa-latest.pth.tar", marker


def _tiny_encoder(**kw):
    args = dict(patch_size=4, img_size=16, depth=1, embed_dim=32, num_heads=2)
    return vit_tiny(**{**args, **kw})


def _one_line(text):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# -- the refusal and the opt-in


def test_trainer_checkpoints_need_nothing_beyond_weights_only(trained):
    out, _ = trained
    assert torch.serialization.get_unsafe_globals_in_checkpoint(out / "jepa-latest.pth.tar") == []


@pytest.mark.parametrize("how", ["read_checkpoint", "load_checkpoint", "load_encoder", "load_run_encoder"])
def test_api_refuses_a_payload_without_running_it(trained, tmp_path, how):
    path, marker = _poisoned(trained, tmp_path)
    cfg = load_config(None, TINY)
    calls = {
        "read_checkpoint": lambda: read_checkpoint(path),
        "load_checkpoint": lambda: load_checkpoint(path, build_model(cfg)),
        "load_encoder": lambda: load_encoder(path, _tiny_encoder()),
        "load_run_encoder": lambda: encoders.load_run_encoder(path),
    }
    with pytest.raises(UnsafeCheckpointError) as info:
        calls[how]()
    assert not marker.exists(), "the payload ran"
    msg = _one_line(str(info.value))
    assert str(path) in msg and "builtins.exec" in msg and "--trust-checkpoint" in msg and "trust=True" in msg
    assert info.value.wanted == ["builtins.exec"]


def test_trust_opens_it_runs_it_and_warns_once(trained, tmp_path):
    path, marker = _poisoned(trained, tmp_path)
    with pytest.warns(TrustedCheckpointWarning, match="builtins.exec"):
        ckpt = read_checkpoint(path, trust=True)
    assert marker.read_text() == "the payload ran"  # the payload was real
    assert ckpt["fastjepa"]["step"] == 6
    marker.unlink()
    model = build_model(load_config(None, TINY))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(path, model, trust=True)
        load_encoder(path, _tiny_encoder(), trust=True)
    assert not [w for w in caught if issubclass(w.category, TrustedCheckpointWarning)]  # once per file
    assert marker.exists()
    assert torch.equal(model.target_encoder.pos_embed, ckpt["target_encoder"]["pos_embed"])


@pytest.mark.slow
def test_eval_command_line_refuses_exit_2_one_line_then_trusts(trained, tmp_path, capsys):
    path, marker = _poisoned(trained, tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["--checkpoint", str(path), "--no-baseline", "--no-cache", "--limit-train", "40", "--limit-val", "20"]
    r = subprocess.run(
        [sys.executable, "-m", "fastjepa.eval", *common, "--output", str(tmp_path / "e")],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    line = _one_line(r.stderr)
    assert line.startswith("fastjepa.eval: checkpoint ") and "builtins.exec" in line and "--trust-checkpoint" in line
    assert not marker.exists() and not (tmp_path / "e").exists()
    with pytest.warns(TrustedCheckpointWarning):
        assert ev.main([*common, "--output", str(tmp_path / "e"), "--trust-checkpoint"]) == 0
    assert marker.exists() and (tmp_path / "e" / "eval.json").is_file()


def test_train_resume_refuses_exit_2_one_line_then_trusts(trained, tmp_path, capsys):
    path, marker = _poisoned(trained, tmp_path / "run")
    args = ["--output", str(tmp_path / "run"), "--resume", "--quiet", *TINY]
    assert train_cli.main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fastjepa.train: checkpoint ") and str(path) in line and "builtins.exec" in line
    assert "--trust-checkpoint" in line and not marker.exists()
    with pytest.warns(TrustedCheckpointWarning):
        assert train_cli.main([*args, "--trust-checkpoint"]) == 0
    assert marker.exists()
    assert read_checkpoint(path)["fastjepa"]["step"] == 12  # resumed and finished; the new file is weights-only


def test_a_damaged_file_is_still_called_damaged(tmp_path):
    (tmp_path / "g.pth.tar").write_bytes(b"\x80\x02garbage" * 50)
    with pytest.raises(CheckpointError, match="damaged or truncated") as info:
        read_checkpoint(tmp_path / "g.pth.tar")
    assert not isinstance(info.value, UnsafeCheckpointError)
    _one_line(str(info.value))


# -- what the published files hold opens as it is


def test_reference_layout_with_module_prefix_and_adamw_state_loads_weights_only(tmp_path):
    cfg = load_config(None, TINY)
    a = build_model(cfg)
    groups = [  # the reference's groups carry its own keys (WD_exclude) beside AdamW's
        {"params": [p for n, p in a.encoder.named_parameters() if "bias" not in n and p.ndim != 1]},
        {
            "params": [p for n, p in a.encoder.named_parameters() if "bias" in n or p.ndim == 1],
            "WD_exclude": True,
            "weight_decay": 0,
        },
        {"params": list(a.predictor.parameters())},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    imgs = torch.randn(2, 3, 16, 16)
    a(imgs, [torch.tensor([[0, 1, 2, 5], [3, 4, 5, 6]])], [torch.tensor([[9, 10], [11, 15]])]).backward()
    opt.step()
    with torch.no_grad():
        for p in a.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = {
        "encoder": {f"module.{k}": v for k, v in a.encoder.state_dict().items()},
        "predictor": {f"module.{k}": v for k, v in a.predictor.state_dict().items()},
        "target_encoder": {f"module.{k}": v for k, v in a.target_encoder.state_dict().items()},
        "opt": opt.state_dict(),
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0},
        "epoch": 300, "loss": 0.123, "batch_size": 128, "world_size": 16, "lr": 0.001,
    }  # fmt: skip
    path = tmp_path / "IN1K-vit.pth.tar"
    torch.save(ref, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    b = build_model(cfg)
    opt_b = torch.optim.AdamW(
        [{"params": g["params"], **{k: v for k, v in g.items() if k != "params"}} for g in [
            {"params": [p for n, p in b.encoder.named_parameters() if "bias" not in n and p.ndim != 1]},
            {"params": [p for n, p in b.encoder.named_parameters() if "bias" in n or p.ndim == 1], "WD_exclude": True, "weight_decay": 0},
            {"params": list(b.predictor.parameters())},
        ]], lr=1e-3,
    )  # fmt: skip
    ckpt = load_checkpoint(path, b, opt_b)  # no trust needed
    assert ckpt["epoch"] == 300 and ckpt["scaler"]["scale"] == 65536.0
    for net in ("encoder", "predictor", "target_encoder"):
        for (ka, x), (kb, y) in zip(getattr(a, net).state_dict().items(), getattr(b, net).state_dict().items()):
            assert ka == kb and torch.equal(x, y), (net, ka)
    for sa, sb in zip(opt.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert opt_b.param_groups[1]["WD_exclude"] is True
    enc, _, info = encoders.load_run_encoder(path)  # evaluation opens it too (architecture from the shapes)
    assert info["format"] == "reference" and torch.equal(
        enc.blocks[0].attn.qkv.weight, a.target_encoder.blocks[0].attn.qkv.weight
    )


# -- checkpoints of earlier fastjepa versions


def _as_format_1(ckpt):
    """``ckpt`` as fastjepa <= format 1 wrote it: NumPy's RNG state the tuple of ``np.random.get_state()``."""
    old = copy.deepcopy(ckpt)
    n = old["fastjepa"]["rng"]["numpy"]
    key = n["state"]["key"].numpy().astype(np.uint32)
    old["fastjepa"]["rng"]["numpy"] = (n["bit_generator"], key, n["state"]["pos"], n["has_gauss"], n["gauss"])
    old["fastjepa"]["format_version"] = 1
    return old


@pytest.mark.slow
def test_an_earlier_checkpoint_is_refused_naming_convert_which_keeps_resume_exact(trained, tmp_path, capsys):
    out, ckpt = trained
    full = Trainer(load_config(None, TINY), tmp_path / "full", quiet=True).fit()
    part = tmp_path / "part"
    part.mkdir()
    for f in ("log.csv", "config.yaml"):
        (part / f).write_bytes((out / f).read_bytes())
    old = part / "old.pth.tar"
    torch.save(_as_format_1(ckpt), old)
    assert "numpy._core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(old)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(old)
    msg = _one_line(str(info.value))
    assert "numpy" in msg and f"python -m fastjepa.checkpoint convert {old} NEW.pth.tar" in msg and "earlier fastjepa" in msg

    assert checkpoint_cli.main(["convert", str(old), str(part / "jepa-latest.pth.tar")]) == 0
    assert "NumPy RNG state" in capsys.readouterr().out
    new = part / "jepa-latest.pth.tar"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(new) == []
    conv = read_checkpoint(new)
    assert conv["fastjepa"]["format_version"] == ck.FORMAT_VERSION
    a, b = ckpt["fastjepa"]["rng"]["numpy"], conv["fastjepa"]["rng"]["numpy"]
    assert torch.equal(a["state"]["key"], b["state"]["key"]) and a["state"]["pos"] == b["state"]["pos"]
    assert (a["has_gauss"], a["gauss"]) == (b["has_gauss"], b["gauss"])
    np_state = rng.numpy_rng_from_plain(b)
    assert np.array_equal(np_state["state"]["key"], _as_format_1(ckpt)["fastjepa"]["rng"]["numpy"][1])
    rest = Trainer(load_config(None, TINY), part, resume=True, quiet=True).fit()
    assert rest["step"] == full["step"] == 12
    fa, fb = read_checkpoint(tmp_path / "full" / "jepa-latest.pth.tar"), read_checkpoint(new)
    for net in ("encoder", "predictor", "target_encoder"):
        assert all(torch.equal(fa[net][k], fb[net][k]) for k in fa[net]), net


def test_convert_refuses_foreign_globals_unless_trusted(trained, tmp_path, capsys):
    path, marker = _poisoned(trained, tmp_path)
    assert checkpoint_cli.main(["convert", str(path), str(tmp_path / "new.pth.tar")]) == 2
    assert "builtins.exec" in _one_line(capsys.readouterr().err) and not marker.exists()
    with pytest.warns(TrustedCheckpointWarning):
        assert checkpoint_cli.main(["convert", "--trust-checkpoint", str(path), str(tmp_path / "new.pth.tar")]) == 0
    assert marker.exists()  # it had to run to be read ...
    marker.unlink()
    conv = read_checkpoint(tmp_path / "new.pth.tar")  # ... and the rewrite opens weights-only, payload gone
    assert conv["fastjepa"]["note"] is None and not marker.exists()


def test_extras_that_cannot_load_weights_only_are_refused_at_save_naming_where(tmp_path):
    import datetime

    with pytest.raises(TypeError, match=r"fastjepa\.config\.meta\.when: a datetime\.date"):
        ck.save_checkpoint(
            tmp_path / "c.pth.tar", {"encoder": {}, "predictor": {}, "target_encoder": {}}, epoch=0, loss=0.0, batch_size=1, lr=0.0,
            extra={"config": {"meta": {"when": datetime.date(2024, 1, 1)}}},
        )  # fmt: skip
    p = ck.plain({"a": np.float32(1.5), "b": (np.arange(3, dtype=np.uint32), [np.int64(2)])})
    assert p["a"] == 1.5 and type(p["a"]) is float and torch.equal(p["b"][0], torch.tensor([0, 1, 2], dtype=torch.uint32))
    assert p["b"][1] == [2] and type(p["b"][1][0]) is int and isinstance(p["b"], tuple)


# -- safetensors


def test_export_round_trip_bit_equal_reference_names_and_eval_gives_the_same_numbers(trained, tmp_path, capsys):
    out, ckpt = trained
    dst = tmp_path / "enc.safetensors"
    assert checkpoint_cli.main(["export", str(out), str(dst)]) == 0  # a run folder: its latest checkpoint
    assert "embed_dim 32" in capsys.readouterr().out
    state, meta = read_safetensors(dst)
    want = ckpt["target_encoder"]
    assert sorted(state) == sorted(want) == sorted(_tiny_encoder().state_dict())  # the reference's names (safetensors sorts them)
    assert not any(k.startswith("module.") for k in state)
    assert all(torch.equal(state[k], want[k]) and state[k].dtype == want[k].dtype for k in want)
    assert meta["network"] == "target_encoder" and meta["model_name"] == "vit_tiny" and meta["epoch"] == "0"
    assert (meta["embed_dim"], meta["depth"], meta["num_heads"], meta["patch_size"], meta["img_size"]) == (
        "32",
        "1",
        "2",
        "4",
        "16",
    )
    assert json.loads(meta["model_kwargs"]) == {"depth": 1, "embed_dim": 32, "num_heads": 2}
    enc = _tiny_encoder()
    got = load_encoder(dst, enc)
    assert got["metadata"] == meta and all(torch.equal(v, want[k]) for k, v in enc.state_dict().items())

    common = ["--no-baseline", "--no-cache", "--limit-train", "60", "--limit-val", "30"]
    assert ev.main(["--checkpoint", str(dst), "--output", str(tmp_path / "s"), *common]) == 0
    assert ev.main(["--checkpoint", str(out / "jepa-latest.pth.tar"), "--output", str(tmp_path / "p"), *common]) == 0
    s, p = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("s", "p"))
    assert s["checkpoint"]["architecture_from"] == "the file's metadata" and s["checkpoint"]["epoch"] == 0
    for k in ("linear_probe_top1", "knn_top1", "feature_effective_rank", "feature_dim"):
        assert s[k] == p[k], k
    assert s["model"] == p["model"]  # the same architecture (and seed) rebuilt from the metadata


def test_export_context_encoder_and_its_network_is_checked(trained, tmp_path):
    out, ckpt = trained
    dst = tmp_path / "ctx.safetensors"
    encoders.export_encoder(out / "jepa-latest.pth.tar", dst, which="context")
    state, meta = read_safetensors(dst)
    assert meta["network"] == "encoder" and all(torch.equal(state[k], ckpt["encoder"][k]) for k in state)
    with pytest.raises(CheckpointError, match="holds the encoder, not the target_encoder"):
        load_encoder(dst, _tiny_encoder())
    load_encoder(dst, _tiny_encoder(), which="encoder")
    with pytest.raises(CheckpointError, match="should end in .safetensors"):
        encoders.export_encoder(out, tmp_path / "x.pth.tar")


def test_wrong_architecture_safetensors_fails_naming_what_differs(trained, tmp_path, capsys):
    out, _ = trained
    dst = tmp_path / "enc.safetensors"
    encoders.export_encoder(out, dst)
    with pytest.raises(CheckpointError, match=r"embed_dim 32 in the file, 48 in the model"):
        load_encoder(dst, _tiny_encoder(embed_dim=48))
    # the same shapes, another head count: a plain state-dict load would pass silently
    with pytest.raises(CheckpointError, match=r"num_heads 2 in the file, 4 in the model") as info:
        load_encoder(dst, _tiny_encoder(num_heads=4))
    _one_line(str(info.value))
    with pytest.raises(CheckpointError, match=r"depth 1 in the file, 2 in the model"):
        load_encoder(dst, _tiny_encoder(depth=2))

    # a file whose metadata claims two blocks but holds one: eval says so before building the model
    state, meta = read_safetensors(dst)
    lying = tmp_path / "lying.safetensors"
    ck.save_safetensors(
        state, {**meta, "depth": "2", "model_kwargs": json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2})}, lying
    )
    assert ev.main(["--checkpoint", str(lying), "--no-baseline", "--no-cache", "--output", str(tmp_path / "e")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(lying) in line and "holds 1 blocks" in line and "depth 2" in line
    # metadata that disagrees with itself: the built model is not what the fields say
    ck.save_safetensors(state, {**meta, "num_heads": "4"}, lying)
    assert ev.main(["--checkpoint", str(lying), "--no-baseline", "--no-cache", "--output", str(tmp_path / "e")]) == 2
    assert "num_heads 4 in the file, 2 in the model" in _one_line(capsys.readouterr().err)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_encoder(tmp_path / "bad.safetensors", _tiny_encoder())


def test_safetensors_of_another_tool_loads_by_shape(trained, tmp_path):
    """No fastjepa metadata (e.g. written by timm-style tooling, with module. prefixes):
    names are matched as for .pth.tar files and eval reads the architecture off the shapes."""
    from safetensors.torch import save_file

    _, ckpt = trained
    path = tmp_path / "other.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in ckpt["target_encoder"].items()}, str(path))
    enc = _tiny_encoder()
    load_encoder(path, enc)
    assert all(torch.equal(v, ckpt["target_encoder"][k]) for k, v in enc.state_dict().items())
    _, _, info = encoders.load_run_encoder(path)
    assert info["architecture_from"] == "the file's weight shapes"


def test_read_checkpoint_points_safetensors_to_load_encoder(trained, tmp_path):
    out, _ = trained
    encoders.export_encoder(out, tmp_path / "enc.safetensors")
    with pytest.raises(CheckpointError, match="safetensors file .*load_encoder"):
        load_checkpoint(tmp_path / "enc.safetensors", build_model(load_config(None, TINY)))


# -- the source: no other way in


def _calls(tree):
    """(function name, call node) for every call in a module, with the enclosing def."""
    out = []

    def visit(node, fn):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            if isinstance(child, ast.Call):
                out.append((name, child))
            visit(child, name)

    visit(tree, "<module>")
    return out


def test_weights_only_false_appears_only_in_the_trust_path():
    loads, unsafe = [], []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        for fn, call in _calls(ast.parse(text)):
            f = call.func
            dotted = (
                f"{f.value.id}.{f.attr}"
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else getattr(f, "id", "")
            )
            if dotted in ("torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
                loads.append((rel, fn, dotted))
            for kw in call.keywords:
                if kw.arg == "weights_only" and not (isinstance(kw.value, ast.Constant) and kw.value.value is True):
                    unsafe.append((rel, fn))
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    unsafe.append((rel, fn, "allow_pickle"))
        assert text.count("weights_only=False") == (1 if rel == "fastjepa/checkpoint/core.py" else 0), rel
    assert unsafe == [("fastjepa/checkpoint/core.py", "_load_trusted")]
    assert sorted(loads) == [
        ("fastjepa/checkpoint/core.py", "_load_trusted", "torch.load"),
        ("fastjepa/checkpoint/core.py", "_torch_load", "torch.load"),
        ("fastjepa/checkpoint/core.py", "_torch_load", "torch.load"),
    ]
    # the trusted load is reached only from _torch_load, below its `if not trust: raise`
    callers = [
        fn
        for path in PKG.rglob("*.py")
        for fn, c in _calls(ast.parse(path.read_text()))
        if getattr(c.func, "id", "") == "_load_trusted"
    ]
    assert callers == ["_torch_load"]


def test_command_lines_do_not_import_safetensors_at_start():
    code = "import sys, fastjepa.checkpoint, fastjepa.eval, fastjepa.train; sys.exit('safetensors' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, timeout=120).returncode == 0


def test_the_checkpoint_command_runs_as_users_type_it(tmp_path):
    """`python -m fastjepa.checkpoint` as a subprocess: the module run as __main__ must not
    meet a half-imported copy of itself (it did: every call, --help included, died on a
    circular import), and a bad input exits 2 with one line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "fastjepa.checkpoint", *args], capture_output=True, text=True, env=env, timeout=120)

    ok = run("--help")
    assert ok.returncode == 0 and "export" in ok.stdout and "convert" in ok.stdout, ok.stderr
    bad = run("convert", str(tmp_path / "missing.pth.tar"), str(tmp_path / "new.pth.tar"))
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "missing.pth.tar" in bad.stderr and "Traceback" not in bad.stderr

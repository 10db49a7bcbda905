"""What a checkpoint holds is checked against what it is loaded into before any of it is
used; damage is detected (zip CRCs, the safetensors export's sha256); an architecture read
from a file is checked against its tensors before a model is built. Each case is one
line naming the file and the key, and exit status 2 from the command lines."""

import copy
import json
import pickle
import shutil
import warnings
import zipfile

import pytest
import torch

from fastjepa import architecture as arch_mod
from fastjepa import checkpoint as ck
from fastjepa import encoder as encoder_mod
from fastjepa import eval as ev
from fastjepa import train as train_cli
from fastjepa.build import build_model
from fastjepa.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    UnverifiedCheckpointWarning,
    load_checkpoint,
    load_encoder,
    read_checkpoint,
    read_safetensors,
)
from fastjepa.checkpoint.__main__ import main as checkpoint_cli
from fastjepa.config import load_config
from fastjepa.models import vit_tiny
from fastjepa.training.trainer import Trainer
from fastjepa.training.optim import make_optimizer

from .._tiny import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of the tiny config (2 planned): the run folder and its checkpoint."""
    out = tmp_path_factory.mktemp("run")
    Trainer(load_config(None, [*TINY, "meta.max_steps=6"]), out, quiet=True).fit()
    return out, read_checkpoint(out / "jepa-latest.pth.tar")


def _one_line(text):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def _run_with(trained, tmp_path, ckpt):
    """A copy of the run folder whose latest checkpoint is ``ckpt``."""
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    torch.save(ckpt, out / "jepa-latest.pth.tar")
    return out


def _resume(out, capsys, *extra):
    code = train_cli.main(["--output", str(out), "--resume", "--quiet", *TINY, *extra])
    err = capsys.readouterr().err
    return code, err


def _refused_on_resume(trained, tmp_path, capsys, ckpt, *words, extra=()):
    out = _run_with(trained, tmp_path, ckpt)
    before = (out / "log.csv").read_text()
    code, err = _resume(out, capsys, *extra)
    assert code == 2, err
    line = _one_line(err)
    assert str(out / "jepa-latest.pth.tar") in line or "--resume" in line
    for w in words:
        assert w in line, line
    assert (out / "log.csv").read_text() == before  # nothing ran
    return line


def _tiny_encoder():
    return vit_tiny(patch_size=4, img_size=16, depth=1, embed_dim=32, num_heads=2)


# -- issue case 1: optimizer state of the wrong size never reaches the fused AdamW


def _first_state_id(ckpt):
    return sorted(ckpt["opt"]["state"])[0]


def test_optimizer_moment_of_the_wrong_size_is_refused_before_the_optimizer_runs(trained, tmp_path, capsys):
    ckpt = copy.deepcopy(trained[1])
    pid = _first_state_id(ckpt)
    ckpt["opt"]["state"][pid]["exp_avg"] = torch.zeros(7)
    line = _refused_on_resume(trained, tmp_path, capsys, ckpt, f"'opt.state[{pid}].exp_avg'", "shape (7,)")
    assert "its parameter's is" in line


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda o: o["state"][min(o["state"])].__setitem__("exp_avg_sq", o["state"][min(o["state"])]["exp_avg_sq"].long()), ("exp_avg_sq", "torch.int64")),
        (lambda o: o["state"][min(o["state"])].__setitem__("exp_avg", torch.full_like(o["state"][min(o["state"])]["exp_avg"], float("nan"))), ("exp_avg", "NaN")),
        (lambda o: o["state"][min(o["state"])].__setitem__("step", torch.tensor([1.0, 2.0])), ("step", "a step count")),
        (lambda o: o["state"][min(o["state"])].__setitem__("step", torch.tensor(-3.0)), ("step", ">= 0")),
        (lambda o: o["param_groups"].pop(), ("3 parameter group(s)", "has 4")),
        (lambda o: o["param_groups"][0]["params"].pop(), ("param_groups[0]'", "parameter(s)")),
        (lambda o: o["param_groups"][1].__setitem__("lr", float("nan")), ("param_groups[1].lr'", "finite")),
        (lambda o: o["param_groups"][1].__setitem__("lr", -1e-3), ("param_groups[1].lr' is -0.001", ">= 0")),
        (lambda o: o["param_groups"][1].__setitem__("betas", (0.9,)), ("betas", "2 values")),
        (lambda o: o["param_groups"][1].__setitem__("eps", "tiny"), ("eps", "finite number")),
        (lambda o: o["param_groups"][2].__setitem__("amsgrad", 3), ("amsgrad", "true, false or None")),
        (lambda o: o["state"].__setitem__(10_000, {"step": torch.tensor(1.0)}), ("opt.state[10000]", "no parameter group")),
    ],
    ids=["int-moment", "nan-moment", "step-shape", "step-negative", "group-count", "group-size", "nan-lr", "negative-lr", "betas", "eps-type", "flag-type", "unknown-id"],
)
def test_each_optimizer_entry_is_checked_against_the_optimizer(trained, mutate, words):
    ckpt = copy.deepcopy(trained[1])
    mutate(ckpt["opt"])
    cfg = load_config(None, TINY)
    model = build_model(cfg)
    opt = make_optimizer(model, torch.device("cpu"), False)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(CheckpointError) as info:
        ck.restore_checkpoint("x.pth.tar", ckpt, model, opt)
    line = _one_line(str(info.value))
    for w in words:
        assert w in line, line
    assert str(opt.state_dict()) == str(before)  # nothing was loaded


def test_flags_written_as_none_by_the_per_parameter_optimizer_load_into_a_fused_one(trained):
    ckpt = copy.deepcopy(trained[1])
    for g in ckpt["opt"]["param_groups"]:
        g["fused"], g["foreach"] = None, None  # as the reference step's optimizer writes them
    model = build_model(load_config(None, TINY))
    ck.restore_checkpoint("x.pth.tar", ckpt, model, make_optimizer(model, torch.device("cpu"), False))


def test_scaler_state_is_checked(trained):
    ckpt = copy.deepcopy(trained[1])
    ckpt["scaler"] = {"scale": float("inf"), "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}
    model = build_model(load_config(None, TINY))
    with pytest.raises(CheckpointError, match=r"'scaler.scale' is inf"):
        ck.restore_checkpoint("x.pth.tar", ckpt, model, None, torch.amp.GradScaler("cpu"))


# -- issue case 3: a damaged file is detected, not loaded


def _largest_entry(path):
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    return info, info.header_offset + 30 + name_len + extra_len


def _flip(path, n=400):
    info, start = _largest_entry(path)
    raw = bytearray(path.read_bytes())
    mid = start + info.file_size // 2
    for i in range(mid, mid + n):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    return info.filename


def test_flipped_bytes_inside_a_tensor_are_refused_by_eval_and_resume(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    path = out / "jepa-latest.pth.tar"
    entry = _flip(path)
    assert ev.main(["--checkpoint", str(path), "--no-baseline", "--no-cache", "--output", str(tmp_path / "e")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(path) in line and "damaged" in line and entry in line and "CRC" in line
    code, err = _resume(out, capsys)
    assert code == 2 and "damaged" in _one_line(err)


def test_files_written_without_checksums_and_reference_files_still_load(trained, tmp_path):
    from torch.utils.serialization import config

    ckpt = trained[1]
    reference = {k: ckpt[k] for k in ck.REFERENCE_KEYS}  # a reference-layout file: no "fastjepa", no hash of ours
    config.save.compute_crc32 = False
    try:
        torch.save(reference, tmp_path / "nocrc.pth.tar")
    finally:
        config.save.compute_crc32 = True
    with zipfile.ZipFile(tmp_path / "nocrc.pth.tar") as zf:
        assert all(i.CRC == 0 for i in zf.infolist())
    enc = _tiny_encoder()
    load_encoder(tmp_path / "nocrc.pth.tar", enc)
    torch.testing.assert_close(enc.state_dict(), dict(ckpt["target_encoder"]))


def test_safetensors_export_records_a_hash_that_catches_damage(trained, tmp_path, capsys):
    dst = tmp_path / "enc.safetensors"
    assert checkpoint_cli(["export", str(trained[0]), str(dst)]) == 0
    capsys.readouterr()  # the export's own lines (the run folder's pick, what it wrote)
    state, meta = read_safetensors(dst)
    assert meta["sha256"] == ck.tensors_digest({k: v for k, v in state.items()}) and meta["format_version"] == "2"
    raw = bytearray(dst.read_bytes())
    for i in range(len(raw) - 600, len(raw) - 200):  # inside the data, after the JSON header
        raw[i] ^= 0x5A
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="is damaged: its tensors' sha256"):
        read_safetensors(bad)
    assert ev.main(["--checkpoint", str(bad), "--no-baseline", "--no-cache", "--output", str(tmp_path / "e")]) == 2
    assert str(bad) in _one_line(capsys.readouterr().err)


def test_safetensors_hash_removed_is_refused_and_a_format_1_export_loads_with_a_warning(trained, tmp_path):
    dst = tmp_path / "enc.safetensors"
    encoder_mod.export_encoder(trained[0], dst)
    state, meta = read_safetensors(dst)
    from safetensors.torch import save_file

    stripped = {k: v for k, v in meta.items() if k != "sha256"}
    save_file(state, str(tmp_path / "stripped.safetensors"), metadata=stripped)
    with pytest.raises(CheckpointError, match="records a content hash, but it has none"):
        read_safetensors(tmp_path / "stripped.safetensors")
    save_file(state, str(tmp_path / "v1.safetensors"), metadata={**stripped, "format_version": "1"})
    with pytest.warns(UnverifiedCheckpointWarning, match="without a content hash"):
        got, _ = read_safetensors(tmp_path / "v1.safetensors")
    torch.testing.assert_close(got, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_safetensors(tmp_path / "v1.safetensors")  # once per file


# -- issue case 6: the architecture cannot change on resume


@pytest.mark.parametrize(
    "override, words",
    [
        ("meta.pred_num_heads=4", ("pred_num_heads 4 here, 2 in the checkpoint", "meta.pred_num_heads")),
        ("meta.model_kwargs={depth: 1, embed_dim: 32, num_heads: 4}", ("num_heads 4 here, 2 in the checkpoint",)),
    ],
    ids=["pred-heads", "encoder-heads"],
)
def test_resume_with_another_head_count_is_one_clear_line(trained, tmp_path, capsys, override, words):
    line = _refused_on_resume(trained, tmp_path, capsys, trained[1], "architecture differs", *words, extra=(override,))
    assert "drop the override" in line


# -- issue case 9: weights must be floating point


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused(trained, tmp_path, capsys, dtype):
    ckpt = copy.deepcopy(trained[1])
    ckpt["target_encoder"] = {k: v.to(dtype) for k, v in ckpt["target_encoder"].items()}
    torch.save(ckpt, tmp_path / "c.pth.tar")
    with pytest.raises(CheckpointError, match=rf"is {dtype}, expected a floating-point tensor"):
        load_encoder(tmp_path / "c.pth.tar", _tiny_encoder())
    assert ev.main(["--checkpoint", str(tmp_path / "c.pth.tar"), "--no-baseline", "--no-cache", "--output", str(tmp_path / "e")]) == 2
    assert "floating-point" in _one_line(capsys.readouterr().err)


# -- issue case 10: damaged contents, one line each


def _without_epoch(c):
    del c["epoch"]


@pytest.mark.parametrize(
    "mutate, words",
    [
        (_without_epoch, ("has no 'epoch'",)),
        (lambda c: c.__setitem__("epoch", "abc"), ("'epoch' is 'abc' (str)", "integer >= 0")),
        (lambda c: c.__setitem__("fastjepa", [1, 2]), ("'fastjepa' is [1, 2] (list)", "expected a mapping")),
        (lambda c: c["fastjepa"].__setitem__("rng", {"python": 5}), ("'fastjepa.rng' has no 'numpy'",)),
        (lambda c: c["fastjepa"]["rng"].__setitem__("python", 5), ("'fastjepa.rng.python' is 5",)),
        (lambda c: c["fastjepa"]["rng"].__setitem__("torch", torch.zeros(7, dtype=torch.uint8)), ("'fastjepa.rng.torch' holds 7 bytes",)),
        (lambda c: c["fastjepa"]["rng"].__setitem__("torch", torch.zeros(5056)), ("'fastjepa.rng.torch' is a torch.float32 tensor",)),
        (lambda c: c["fastjepa"]["rng"]["numpy"]["state"].__setitem__("key", torch.zeros(3, dtype=torch.int64)), ("'fastjepa.rng.numpy'",)),
        (lambda c: c["fastjepa"].__setitem__("next_itr", 10**9), ("'fastjepa.next_itr' is 1000000000", "6 iterations")),
        (lambda c: c["fastjepa"].__setitem__("next_itr", -5), ("'fastjepa.next_itr' is -5", "integer >= 0")),
        (lambda c: c["fastjepa"].__setitem__("format_version", 99), ("newer fastjepa (format 99)",)),
        (lambda c: c["target_encoder"]["pos_embed"].fill_(float("nan")), ("'target_encoder.pos_embed' holds", "NaN")),
        (lambda c: c["encoder"].__setitem__("blocks.0.norm1.weight", [1.0]), ("'encoder.blocks.0.norm1.weight' is [1.0] (list)",)),
    ],
    ids=["no-epoch", "epoch-str", "fastjepa-list", "rng-python-only", "rng-python-int", "rng-torch-size", "rng-torch-dtype",
         "rng-numpy-key", "next-itr-huge", "next-itr-negative", "newer-format", "nan-pos-embed", "weight-not-tensor"],
)  # fmt: skip
def test_damaged_contents_refused_on_resume(trained, tmp_path, capsys, mutate, words):
    ckpt = copy.deepcopy(trained[1])
    mutate(ckpt)
    _refused_on_resume(trained, tmp_path, capsys, ckpt, *words)


def test_resuming_with_fewer_epochs_than_done_is_refused(trained, tmp_path, capsys):
    ckpt = copy.deepcopy(trained[1])  # one epoch done
    line = _refused_on_resume(trained, tmp_path, capsys, ckpt, "done 1 epoch(s)", "optimization.epochs is 1", extra=("optimization.epochs=1", "optimization.warmup=0"))
    assert "above 1" in line


def test_garbage_pickle_inside_a_valid_archive_is_damaged_not_a_traceback(trained, tmp_path, capsys):
    src = trained[0] / "jepa-latest.pth.tar"
    dst = tmp_path / "g.pth.tar"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data = b"\x80\x02" + bytes(range(40, 140)) + b"."  # opcodes in a nonsense order (CRC recomputed: intact zip)
            zout.writestr(info.filename, data)
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        read_checkpoint(dst)
    assert ev.main(["--checkpoint", str(dst), "--no-baseline", "--no-cache", "--output", str(tmp_path / "e")]) == 2
    assert "damaged" in _one_line(capsys.readouterr().err)


def test_nan_weights_are_refused_by_eval(trained, tmp_path, capsys):
    ckpt = copy.deepcopy(trained[1])
    ckpt["target_encoder"]["pos_embed"][0, 0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "n.pth.tar")
    assert ev.main(["--checkpoint", str(tmp_path / "n.pth.tar"), "--no-baseline", "--no-cache", "--output", str(tmp_path / "e")]) == 2
    assert "'target_encoder.pos_embed' holds 1 NaN" in _one_line(capsys.readouterr().err)


def test_unknown_model_name_in_safetensors_metadata(trained, tmp_path, capsys):
    dst = tmp_path / "enc.safetensors"
    encoder_mod.export_encoder(trained[0], dst)
    state, meta = read_safetensors(dst)
    ck.save_safetensors(state, {**meta, "model_name": "vit_nonexistent"}, tmp_path / "x.safetensors")
    assert ev.main(["--checkpoint", str(tmp_path / "x.safetensors"), "--no-baseline", "--no-cache", "--output", str(tmp_path / "e")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "vit_nonexistent" in line and "expected one of" in line


# -- issue case 15: an architecture from a file or a config cannot exhaust memory


def _never_built(monkeypatch):
    def refuse(cfg):
        raise AssertionError(f"a model was built: {cfg['meta']['model_kwargs']}")

    monkeypatch.setattr(encoder_mod, "config_encoder", refuse)


def test_huge_embed_dim_in_safetensors_metadata_is_refused_before_building(trained, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "enc.safetensors"
    encoder_mod.export_encoder(trained[0], dst)
    state, meta = read_safetensors(dst)
    kwargs = {**json.loads(meta["model_kwargs"]), "embed_dim": 400000}
    ck.save_safetensors(state, {**meta, "embed_dim": "400000", "model_kwargs": json.dumps(kwargs)}, tmp_path / "big.safetensors")
    _never_built(monkeypatch)
    assert ev.main(["--checkpoint", str(tmp_path / "big.safetensors"), "--no-baseline", "--no-cache", "--output", str(tmp_path / "e")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "embed_dim 400000" in line and "pos_embed" in line


def test_huge_embed_dim_in_a_stored_config_is_refused_before_building(trained, tmp_path, capsys, monkeypatch):
    ckpt = copy.deepcopy(trained[1])
    ckpt["fastjepa"]["config"]["meta"]["model_kwargs"] = {"depth": 1, "embed_dim": 200000, "num_heads": 2}
    torch.save(ckpt, tmp_path / "c.pth.tar")
    _never_built(monkeypatch)
    assert ev.main(["--checkpoint", str(tmp_path / "c.pth.tar"), "--no-baseline", "--no-cache", "--output", str(tmp_path / "e")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "embed_dim 200000" in line and "the checkpoint's config" in line


def test_a_config_whose_model_exceeds_memory_is_refused_before_building(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    big = ["meta.model_kwargs={depth: 1, embed_dim: 200000, num_heads: 2}"]  # ~1.9 TB of parameters
    assert train_cli.main(["--output", str(out), "--quiet", *TINY, *big]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "G parameters" in line and "more than this machine's" in line
    monkeypatch.setattr(arch_mod, "memory_limit_bytes", lambda: 2**30)  # a 1 GiB machine
    assert train_cli.main(["--output", str(out), "--quiet", *TINY, "data.crop_size=16384", "mask.patch_size=2048"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "crop 16384" in line and "patch 2048" in line and "1.0 GiB" in line
    assert not (out / "jepa-latest.pth.tar").exists()


def test_parameter_count_matches_the_built_model():
    cfg = load_config(None, TINY)
    model = build_model(cfg)
    enc, pred = arch_mod.parameter_count(arch_mod.architecture(cfg))
    assert enc == sum(t.numel() for t in model.encoder.state_dict().values())
    assert pred == sum(t.numel() for t in model.predictor.state_dict().values())


# -- issue case 16: unsafe payloads are named for what they are


class Payload:
    def __reduce__(self):
        return (exec, ("raise SystemExit('the payload ran')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_raw_pickle_and_legacy_format_payloads_name_the_global(tmp_path):
    with open(tmp_path / "raw.pth.tar", "wb") as f:
        pickle.dump({"encoder": Payload()}, f, protocol=4)
    torch.save({"encoder": Payload()}, tmp_path / "legacy.pth.tar", _use_new_zipfile_serialization=False)
    for name in ("raw.pth.tar", "legacy.pth.tar"):
        with pytest.raises(UnsafeCheckpointError) as info:
            read_checkpoint(tmp_path / name)
        assert info.value.wanted == ["builtins.exec"], (name, info.value.wanted)
        assert "builtins.exec" in _one_line(str(info.value)) and "damaged" not in str(info.value)


def test_a_resumed_run_still_loads_exactly(trained, tmp_path):
    """The checks pass on every checkpoint fastjepa writes (and change nothing they load)."""
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    cfg = load_config(None, TINY)
    t = Trainer(cfg, out, resume=True, quiet=True)
    assert (t.epoch, t.next_itr, t.step) == (0, 6, 6)  # stopped by max_steps after the epoch's last step
    torch.testing.assert_close(t.model.encoder.state_dict(), dict(trained[1]["encoder"]))
    model = build_model(cfg)
    load_checkpoint(out / "jepa-latest.pth.tar", model, make_optimizer(model, torch.device("cpu"), False))

"""Checkpoints: reference format, round trip, `module.` prefix, damaged files fail loudly."""

import pytest
import torch

from fastjepa import IJEPA
from fastjepa.checkpoint import REFERENCE_KEYS, CheckpointError, load_checkpoint, load_encoder, save_checkpoint
from fastjepa.models import vit_predictor, vit_tiny


def tiny():
    enc = vit_tiny(patch_size=4, img_size=16, depth=1, embed_dim=32, num_heads=2)
    return IJEPA(enc, vit_predictor(num_patches=16, embed_dim=32, predictor_embed_dim=16, depth=1, num_heads=2))


def _save(path, model, opt):
    save_checkpoint(path, model, opt, None, epoch=3, loss=0.5, batch_size=8, world_size=1, lr=1e-3, extra={"step": 7})


def test_round_trip_reference_keys(tmp_path):
    a, b = tiny(), tiny()
    opt_a = torch.optim.AdamW(a.parameters())
    a(torch.randn(2, 3, 16, 16), [torch.tensor([[0, 1, 2], [3, 4, 5]])], [torch.tensor([[9, 10], [11, 12]])]).backward()
    opt_a.step()
    _save(tmp_path / "c.pth.tar", a, opt_a)
    raw = torch.load(tmp_path / "c.pth.tar", weights_only=True)  # fastjepa writes nothing that needs more
    assert set(REFERENCE_KEYS) <= set(raw)
    assert not any(k.startswith("module.") for k in raw["encoder"])
    opt_b = torch.optim.AdamW(b.parameters())
    ckpt = load_checkpoint(tmp_path / "c.pth.tar", b, opt_b)
    assert ckpt["epoch"] == 3 and ckpt["fastjepa"]["step"] == 7
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert opt_b.state_dict()["state"].keys() == opt_a.state_dict()["state"].keys()


def test_save_from_ready_state_dicts_writes_what_saving_the_model_writes(tmp_path):
    """The form FSDP2's gathered state takes: the same file as from the model and optimizer."""
    a = tiny()
    opt = torch.optim.AdamW(a.parameters())
    a(torch.randn(2, 3, 16, 16), [torch.tensor([[0, 1, 2], [3, 4, 5]])], [torch.tensor([[9, 10], [11, 12]])]).backward()
    opt.step()
    _save(tmp_path / "m.pth.tar", a, opt)
    states = {name: {f"module.{k}": v for k, v in getattr(a, name).state_dict().items()} for name in ("encoder", "predictor", "target_encoder")}
    _save(tmp_path / "s.pth.tar", {**states, "opt": opt.state_dict()}, None)
    m, s = (torch.load(tmp_path / f"{n}.pth.tar", weights_only=True) for n in "ms")
    assert list(m) == list(s) and m["epoch"] == s["epoch"] == 3 and m["fastjepa"] == s["fastjepa"]
    for name in ("encoder", "predictor", "target_encoder"):
        assert list(m[name]) == list(s[name]) and all(torch.equal(m[name][k], s[name][k]) for k in m[name]), name
    assert m["opt"]["state"].keys() == s["opt"]["state"].keys()
    with pytest.raises(TypeError, match=r"states\['opt'\]"):
        _save(tmp_path / "x.pth.tar", states, opt)


def test_reference_checkpoint_with_module_prefix(tmp_path):
    a, b = tiny(), tiny()
    with torch.no_grad():  # three different networks, so a mixed-up key cannot pass
        for p in a.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = {
        "encoder": {f"module.{k}": v for k, v in a.encoder.state_dict().items()},
        "predictor": {f"module.{k}": v for k, v in a.predictor.state_dict().items()},
        "target_encoder": {f"module.{k}": v for k, v in a.target_encoder.state_dict().items()},
        "opt": None, "scaler": None, "epoch": 10, "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3,
    }  # fmt: skip
    torch.save(ref, tmp_path / "ref.pth.tar")
    ckpt = load_checkpoint(tmp_path / "ref.pth.tar", b)
    assert ckpt["epoch"] == 10
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    enc = vit_tiny(patch_size=4, img_size=16, depth=1, embed_dim=32, num_heads=2)
    load_encoder(tmp_path / "ref.pth.tar", enc)  # the target encoder, the one evaluated
    for x, y in zip(enc.state_dict().values(), a.target_encoder.state_dict().values()):
        assert torch.equal(x, y)
    load_encoder(tmp_path / "ref.pth.tar", enc, which="encoder")
    assert torch.equal(enc.blocks[0].attn.qkv.weight, a.encoder.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.encoder.blocks[0].attn.qkv.weight, a.target_encoder.blocks[0].attn.qkv.weight)


def test_truncated_file_fails_loudly(tmp_path):
    a = tiny()
    _save(tmp_path / "c.pth.tar", a, None)
    data = (tmp_path / "c.pth.tar").read_bytes()
    (tmp_path / "t.pth.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(tmp_path / "t.pth.tar", tiny())
    (tmp_path / "g.pth.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="t.pth.tar|g.pth.tar"):
        load_checkpoint(tmp_path / "g.pth.tar", tiny())
    (tmp_path / "e.pth.tar").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "e.pth.tar", tiny())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth.tar", tiny())


def test_wrong_architecture_is_an_error_not_a_restart(tmp_path):
    _save(tmp_path / "c.pth.tar", tiny(), None)
    other = IJEPA(vit_tiny(patch_size=4, img_size=16, depth=2, embed_dim=32, num_heads=2),
                  vit_predictor(num_patches=16, embed_dim=32, predictor_embed_dim=16, depth=1, num_heads=2))  # fmt: skip
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "c.pth.tar", other)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pth.tar"
    _save(path, tiny(), None)
    before = path.read_bytes()
    real_save = torch.save

    def boom(obj, f):  # interrupted inside the write, after the temporary file holds the data
        real_save(obj, f)
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(path, tiny(), None)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth.tar"]  # no temporary left behind


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="tells a folder fd from a file fd through /proc")
def test_atomic_save_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Durability, not just atomicity: the temporary file's data reach the disk before it is
    renamed over the target, and the folder (the rename itself) after."""
    import os

    from fastjepa.checkpoint import atomic_save

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_save({"a": torch.ones(3)}, tmp_path / "c.pth.tar")
    assert events == [("fsync", "file"), ("replace", "c.pth.tar"), ("fsync", "dir")]
    assert torch.equal(torch.load(tmp_path / "c.pth.tar")["a"], torch.ones(3))

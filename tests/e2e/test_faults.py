"""Faults: signals, kill -9 mid-save, non-finite loss, bad images, bad folders, damaged checkpoints."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastjepa.checkpoint import read_checkpoint
from fastjepa.config import load_config
from fastjepa.training.trainer import Trainer
from fastjepa.training.checkpointing import NonFiniteLoss

from .._inject import nan_at_script
from .._tiny import TINY

ROOT = Path(__file__).resolve().parents[2]
LONG = [*TINY, "optimization.epochs=40", "meta.max_steps=200"]


def start(out, *overrides, env=None, new_session=False, program=("-m", "fastjepa.train")):
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    cmd = [sys.executable, *program, "--quiet", "--output", str(out), *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT, start_new_session=new_session)


# Runs `python -m fastjepa.train ARGS` with its N-th torch.save (a checkpoint write: training
# saves nothing else) pausing SECONDS after the data are in the temporary file and before
# the rename, where a kill -9 would tear a naive write.
PAUSE_SAVE = """
import runpy, sys, time
import torch
n, seconds = int(sys.argv[1]), float(sys.argv[2])
real_save, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    calls[0] += 1
    if calls[0] == n:
        f.flush()
        time.sleep(seconds)
torch.save = save
sys.argv = ["fastjepa.train", *sys.argv[3:]]
runpy.run_module("fastjepa.train", run_name="__main__", alter_sys=True)
"""


def _uninterrupted(out, *overrides):
    """The same command line run to the end in its own process: the interrupted run and its
    resume are compared with what `python -m fastjepa.train` gives, not with a Trainer inside
    the test process (whose torch threads and other global state earlier tests may have set)."""
    proc = start(out, *overrides)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]


def start_pausing_save(tmp_path, n, seconds, out, *overrides):
    """:func:`start` with the ``n``-th checkpoint write pausing ``seconds`` mid-write."""
    script = tmp_path / "pause_save.py"
    script.write_text(PAUSE_SAVE)
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(script), str(n), str(seconds), "--quiet", "--output", str(out), *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)


def wait_for(pred, timeout=120.0):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def csv_rows(run_dir):
    p = Path(run_dir) / "log.csv"
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def losses(run_dir):
    return [(int(r["step"]), float(r["loss"])) for r in csv_rows(run_dir)]


def test_sigterm_checkpoints_and_resume_continues_exactly(tmp_path):
    proc = start(tmp_path / "run", *LONG)
    wait_for(lambda: len(csv_rows(tmp_path / "run")) >= 3 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM received" in err and "--resume" in err
    ckpt = read_checkpoint(tmp_path / "run" / "jepa-latest.pth.tar")
    stopped_at = ckpt["fastjepa"]["step"]
    assert 0 < stopped_at < 200
    r = subprocess.run([sys.executable, "-m", "fastjepa.train", "--quiet", "--output", str(tmp_path / "run"), "--resume", *LONG],
                       capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    _uninterrupted(tmp_path / "full", *LONG)
    assert losses(tmp_path / "run") == losses(tmp_path / "full")


def test_ctrl_c_with_loader_workers_checkpoints_and_resume_continues_exactly(tmp_path):
    """Ctrl-C in a terminal signals the whole process group, DataLoader workers included:
    the run still finishes its step, writes a checkpoint and exits 130; --resume continues."""
    args = [*LONG, "data.num_workers=2"]
    proc = start(tmp_path / "run", *args, new_session=True)
    wait_for(lambda: len(csv_rows(tmp_path / "run")) >= 8 or proc.poll() is not None)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "SIGINT received" in err and "DataLoader worker" not in err and "Traceback" not in err
    stopped_at = read_checkpoint(tmp_path / "run" / "jepa-latest.pth.tar")["fastjepa"]["step"]
    assert 0 < stopped_at < 200
    r = subprocess.run([sys.executable, "-m", "fastjepa.train", "--quiet", "--output", str(tmp_path / "run"), "--resume", *args],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    _uninterrupted(tmp_path / "full", *args)
    assert losses(tmp_path / "run") == losses(tmp_path / "full")


def test_kill9_during_checkpoint_write_keeps_previous(tmp_path):
    """The 2nd save pauses inside the write (injected by a wrapper); kill -9 there; the 1st survives."""
    run = tmp_path / "run"
    proc = start_pausing_save(tmp_path, 2, 60, run, *TINY, "optimization.epochs=3")
    # the epoch-1 checkpoint is complete and the epoch-2 write is paused mid-way
    wait_for(lambda: (run / "jepa-latest.pth.tar").exists() and any(p.name.endswith(".tmp") for p in run.glob(".*")))
    first = read_checkpoint(run / "jepa-latest.pth.tar")
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    after = read_checkpoint(run / "jepa-latest.pth.tar")  # intact, the epoch-1 checkpoint
    assert after["epoch"] == first["epoch"] == 1
    assert all(torch.equal(a, b) for a, b in zip(first["encoder"].values(), after["encoder"].values()))
    r = subprocess.run([sys.executable, "-m", "fastjepa.train", "--quiet", "--output", str(run), "--resume", *TINY, "optimization.epochs=3"],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_checkpoint(run / "jepa-latest.pth.tar")["epoch"] == 3
    assert read_checkpoint(run / "jepa-prev.pth.tar")["epoch"] == 2  # the last two are kept
    assert not [p.name for p in run.glob(".*")]  # the killed write's temporary file is gone
    # epoch 2 ran twice (killed while saving it, then again from the epoch-1 checkpoint): the
    # log holds each step once, and the losses are the uninterrupted run's
    Trainer(load_config(None, [*TINY, "optimization.epochs=3"]), tmp_path / "full", quiet=True).fit()
    assert losses(run) == losses(tmp_path / "full")


def test_second_signal_exits_at_once(tmp_path):
    run = tmp_path / "run"
    proc = start_pausing_save(tmp_path, 1, 60, run, *LONG)
    wait_for(lambda: len(csv_rows(run)) >= 2 or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)  # the stop checkpoint is the first save: it pauses inside the write
    wait_for(lambda: any(p.name.endswith(".tmp") for p in run.glob(".*")))
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 20 and proc.returncode == 128 + signal.SIGINT
    assert "second SIGINT" in err
    assert not (run / "jepa-latest.pth.tar").exists()  # nothing half-written took its place


class _NaNAt:
    """Wrap IJEPA.forward to return NaN at one step (the injected fault)."""

    def __init__(self, model, step):
        self.model, self.step, self.calls = model, step, 0
        self.forward = model.forward

    def __call__(self, *a, **k):
        loss = self.forward(*a, **k)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 == self.step else loss


def test_nan_stops_with_step_and_keeps_good_checkpoint(tmp_path):
    cfg = load_config(None, [*TINY, "optimization.epochs=3"])
    t = Trainer(cfg, tmp_path / "run", quiet=True)
    t.model.forward = _NaNAt(t.model, step=8)  # epoch 2 (6 iterations per epoch)
    with pytest.raises(NonFiniteLoss, match=r"non-finite at step 8 \(epoch 2, iteration 2\).*jepa-latest.pth.tar"):
        t.fit()
    ckpt = read_checkpoint(tmp_path / "run" / "jepa-latest.pth.tar")
    assert ckpt["epoch"] == 1  # the good epoch-1 checkpoint, not overwritten
    assert all(torch.isfinite(v).all() for v in ckpt["encoder"].values())


def test_nan_skip_policy_skips_the_step(tmp_path, capsys):
    cfg = load_config(None, [*TINY, "optimization.nan_policy=skip", "meta.max_steps=4"])
    t = Trainer(cfg, tmp_path / "run", quiet=True)
    t.model.forward = _NaNAt(t.model, step=1)
    summary = t.fit()
    assert summary["step"] == 4
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert "step 1: non-finite loss or gradients" in capsys.readouterr().err


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
def test_a_skipped_step_changes_nothing(tmp_path, fault, reference):
    """nan_policy=skip: no optimizer step, no EMA update, no optimizer state change — for a
    NaN loss and for a finite loss with an inf gradient; decided on the device (fastjepa's
    fused AdamW) or on the host (the reference step's per-parameter AdamW)."""
    over = [*TINY, "optimization.nan_policy=skip", f"meta.reference_step={str(reference).lower()}"]
    t = Trainer(load_config(None, over), tmp_path / "run", quiet=True)
    assert t.skip_on_device is not reference
    imgs, masks_enc, masks_pred = t.collator([t.dataset[i] for i in range(8)])
    imgs = imgs[0]
    t.stepper.step(imgs, masks_enc, masks_pred, index=0)  # one normal step: optimizer state exists
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    opt_before = [{k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for st in t.optimizer.state.values()]
    if fault == "nan_loss":
        t.model.forward = _NaNAt(t.model, step=0)
    else:
        p0 = next(p for p in t.model.encoder.parameters() if p.requires_grad)
        p0.register_hook(lambda g: torch.full_like(g, float("inf")))
    r = t.stepper.step(imgs, masks_enc, masks_pred, index=1)
    assert torch.isfinite(r.loss).item() == (fault == "inf_grad")
    assert r.skipped.item() == 1.0
    after = t.model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    for st, old in zip(t.optimizer.state.values(), opt_before):
        for k, v in old.items():
            assert torch.equal(st[k], v), k


def test_cli_non_finite_loss_exits_3_naming_step_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = start(run, *TINY, "optimization.epochs=3", program=nan_at_script(tmp_path, rank=0, step=8))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    assert re.search(r"the loss became non-finite at step 8 \(epoch 2, iteration 2\); stopping\. The last good checkpoint is "
                     r".*jepa-latest\.pth\.tar — resume from it with --resume", err), err[-3000:]  # fmt: skip
    assert read_checkpoint(run / "jepa-latest.pth.tar")["epoch"] == 1


def _image_folder(root, n_good=40):
    for i in range(n_good):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(d / f"img{i}.png")
    (root / "class0" / "garbage.jpg").write_bytes(b"this is not an image")
    good = (root / "class1" / "img1.png").read_bytes()
    (root / "class1" / "truncated.png").write_bytes(good[: len(good) // 3])
    Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(root / "class1" / "full.jpg")
    data = (root / "class1" / "full.jpg").read_bytes()
    (root / "class1" / "full.jpg").write_bytes(data[:200])  # truncated JPEG


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_images_are_skipped_counted_and_reported(tmp_path, capfd, workers):
    """Three bad files, three epochs (every file is read each epoch), in the main process
    or in loader workers forked anew each epoch: one warning per file, each counted once,
    and the count on each epoch's summary line."""
    _image_folder(tmp_path / "imgs")
    cfg = load_config(None, [*TINY, "data.dataset=imagefolder", f"data.root_path={tmp_path}", "data.image_folder=imgs",
                             "data.batch_size=4", "optimization.epochs=3", f"data.num_workers={workers}"])  # fmt: skip
    t = Trainer(cfg, tmp_path / "run", quiet=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, not once per code location
        summary = t.fit()
    assert summary["status"] == "done" and summary["step"] == 3 * (43 // 4)
    assert t.dataset.num_skipped == 3
    err = capfd.readouterr().err
    assert err.count("3 unreadable image(s) skipped so far") == 3, err[-3000:]  # each epoch's summary line
    if workers == 0:  # (a forked worker's warnings go to its own copy of the recorder)
        for name in ("garbage.jpg", "truncated.png", "full.jpg"):
            assert sum(f"skipping unreadable image {tmp_path}" in str(w.message) and name in str(w.message) for w in caught) == 1, name


@pytest.mark.parametrize("setup,match", [
    ("missing", r"image folder .*imgs does not exist \(set data\.root_path and data\.image_folder\)"),
    ("empty", r"image folder .*imgs holds no images \(expected .*imgs/<class>/<image> with one of \.jpg"),
])  # fmt: skip
def test_missing_or_empty_folder_fails_before_work(tmp_path, setup, match):
    if setup == "empty":
        (tmp_path / "imgs" / "class0").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "fastjepa.train", "--output", str(tmp_path / "run"), *TINY, "data.dataset=imagefolder",
                        f"data.root_path={tmp_path}", "data.image_folder=imgs"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert r.returncode == 2 and re.search(match, r.stderr), r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1  # one line saying what to do, no traceback
    assert not (tmp_path / "run").exists()


def test_damaged_checkpoint_on_resume_is_an_error_not_a_restart(tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(None, [*TINY, "optimization.epochs=1"]), run, quiet=True).fit()
    p = run / "jepa-latest.pth.tar"
    p.write_bytes(p.read_bytes()[:1000])
    r = subprocess.run([sys.executable, "-m", "fastjepa.train", "--output", str(run), "--resume", *TINY],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert r.returncode == 2 and "damaged or truncated" in r.stderr
    assert len(csv_rows(run)) == 6  # the log was not restarted


def test_latest_checkpoint_exists_at_every_moment_of_a_write(tmp_path, monkeypatch):
    """Keep the last two without a gap: latest is hard-linked to prev, then replaced, so a
    kill at any point of a checkpoint write leaves a jepa-latest to resume from."""
    run = tmp_path / "run"
    latest = run / "jepa-latest.pth.tar"
    seen, real_replace = [], os.replace

    def replace(src, dst):
        seen.append(latest.exists())
        real_replace(src, dst)
        seen.append(latest.exists())

    monkeypatch.setattr(os, "replace", replace)
    Trainer(load_config(None, [*TINY, "optimization.epochs=3"]), run, quiet=True).fit()
    first = seen.index(True)
    assert first > 0 and all(seen[first:]), seen  # once there, never gone
    assert read_checkpoint(latest)["epoch"] == 3 and read_checkpoint(run / "jepa-prev.pth.tar")["epoch"] == 2
    assert not [p.name for p in run.glob(".*")]  # no temporary or link file left behind


def test_resume_falls_back_to_prev_when_latest_is_missing(tmp_path, monkeypatch):
    """Without hard links the write renames latest -> prev first; a kill right after leaves
    only prev, and --resume continues from it instead of saying there is no checkpoint."""
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no hard links here")))
    run = tmp_path / "run"
    Trainer(load_config(None, [*TINY, "meta.max_steps=8"]), run, quiet=True).fit()  # epoch 1 + 2 steps of epoch 2
    (run / "jepa-latest.pth.tar").unlink()  # the moment between the two renames
    assert read_checkpoint(run / "jepa-prev.pth.tar")["epoch"] == 1
    t = Trainer(load_config(None, TINY), run, resume=True, quiet=True)
    assert (t.epoch, t.next_itr, t.step) == (1, 0, 6)
    assert t.fit()["status"] == "done"


def test_non_finite_weights_are_never_written_over_a_good_checkpoint(tmp_path):
    """An inf in the weights with a finite loss (an overflowing gradient on the last step of
    an epoch): the run stops without overwriting the last good checkpoint."""
    cfg = load_config(None, [*TINY, "optimization.epochs=3"])
    t = Trainer(cfg, tmp_path / "run", quiet=True)
    step = t.stepper.step

    def poisoned(*a, index, **k):
        out = step(*a, index=index, **k)
        if index == 11:  # the last step of epoch 2 (6 iterations per epoch)
            with torch.no_grad():
                next(t.model.encoder.parameters()).view(-1)[0] = float("inf")
        return out

    t.stepper.step = poisoned
    with pytest.raises(NonFiniteLoss, match=r"weights became non-finite by step 12; not writing them over .*jepa-latest"):
        t.fit()
    ckpt = read_checkpoint(tmp_path / "run" / "jepa-latest.pth.tar")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["encoder"].values())

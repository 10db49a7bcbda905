"""What a run refuses, and how: nonsense config values, a run folder that belongs to another
run, writes outside the output folder, looping image folders, unreadable data, a full or
unwritable disk, bad evaluation options, and a time budget smaller than one epoch. Each is
one line and exit code 2 from the command lines, before any work where it can be."""

import csv
import errno
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fastjepa import eval as fj_eval
from fastjepa import train as fj_train
from fastjepa.checkpoint import CheckpointError, read_checkpoint
from fastjepa.config import ConfigError, load_config
from fastjepa.data import ImageFolder
from fastjepa.data import embedded as emb
from fastjepa.schedulers import CosineWD, LinearMomentum, WarmupCosineLR
from fastjepa.training.trainer import Trainer
from fastjepa.training import time_budget
from fastjepa.training.runfolder import LOCK_NAME, RunFolderError

from .._tiny import TINY

ROOT = Path(__file__).resolve().parents[2]


def one_line_error(capsys, prefix: str = "") -> str:
    """The one line of stderr (with ``prefix``: the one line starting so, beside a run's progress lines)."""
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and ln.startswith(prefix)]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def cli(*args, module="fastjepa.train", timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


# -- items 7, 8, 12: every number checked at validation, every way of writing one accepted


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimization.lr=-0.001", r"optimization.lr: got -0.001, expected a number >= 0"),
        ("optimization.start_lr=-1", r"optimization.start_lr: got -1.0, expected a number >= 0"),
        ("optimization.final_lr=-1e-6", r"optimization.final_lr: got -1e-06, expected a number >= 0"),
        ("optimization.weight_decay=-0.04", r"optimization.weight_decay: got -0.04, expected a number >= 0"),
        ("optimization.final_weight_decay=-1", r"optimization.final_weight_decay"),
        ("optimization.clip_grad=-1", r"optimization.clip_grad: got -1.0, expected a max gradient norm > 0"),
        ("optimization.clip_grad=0", r"optimization.clip_grad: got 0.0"),
        ("meta.pred_num_heads=0", r"meta.pred_num_heads: got 0, expected an integer >= 1"),
        ("data.crop_scale=[2, 5]", r"data.crop_scale: got \[2.0, 5.0\], expected \[low, high\] with 0 < low <= high <= 1"),
        ("data.crop_scale=[-0.5, 1]", r"data.crop_scale: got \[-0.5, 1.0\]"),
        ("data.crop_scale=[0.9, 0.3]", r"data.crop_scale: got \[0.9, 0.3\]"),
        ("optimization.ipe_scale=0", r"optimization.ipe_scale: got 0.0, expected a number > 0"),
        ("meta.model_kwargs={depth: -1, embed_dim: 32, num_heads: 2}", r"meta.model_kwargs.depth: got -1, expected an integer >= 1"),
        ("meta.model_kwargs={depth: 1, embed_dim: 32, num_heads: 0}", r"meta.model_kwargs.num_heads: got 0"),
        ("meta.model_kwargs={depth: 1, embed_dim: 32, num_heads: 2, mlp_ratio: -4}", r"meta.model_kwargs.mlp_ratio: got -4"),
        ("optimization.lr=.nan", r"optimization.lr: got nan \(float\), expected a finite number"),
        ("optimization.lr=.inf", r"optimization.lr: got inf \(float\), expected a finite number"),
        ("optimization.warmup=.nan", r"optimization.warmup: got nan \(float\), expected a finite number"),
        ("optimization.ema=[0.996, .nan]", r"optimization.ema: .*two finite numbers"),
        ("optimization.ema=[0.996, 1.004]", r"optimization.ema=\[0.996, 1.004\]: expected 0 <= start <= end <= 1"),
    ],
)
def test_nonsense_values_are_refused_at_validation_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, override])


def test_ipe_scale_zero_with_warmup_zero_is_refused_not_a_momentum_above_one():
    with pytest.raises(ConfigError, match=r"optimization.ipe_scale"):
        load_config(None, [*TINY, "optimization.ipe_scale=0", "optimization.warmup=0"])


@pytest.mark.parametrize("written, value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("1.0e-3", 1e-3), ("+2e-4", 2e-4), ("0.001", 1e-3), ("1", 1.0)])
def test_every_way_of_writing_a_number_is_accepted(tmp_path, written, value):
    assert load_config(None, [*TINY, f"optimization.lr={written}"])["optimization"]["lr"] == value  # the command line
    path = tmp_path / "c.yaml"
    path.write_text(f"optimization:\n  lr: {written}\n")
    assert load_config(path, TINY)["optimization"]["lr"] == value  # a YAML file


def test_a_quoted_number_stays_a_string_and_is_refused():
    with pytest.raises(ConfigError, match=r"optimization.lr: got '1e-3' \(str\), expected a number"):
        load_config(None, [*TINY, "optimization.lr='1e-3'"])


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optimization:\n  lr: 0.001\n  epochs: 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"dup.yaml is not valid YAML: found duplicate key 'lr' at line 4, column 3"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"found duplicate key 'depth'"):
        load_config(None, [*TINY, "meta.model_kwargs={depth: 1, depth: 2}"])


def test_config_errors_from_the_command_line_are_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("optimization:\n  lr: 0.001\n  lr: 0.1\n")
    assert fj_train.main(["--config", str(path), "--output", str(tmp_path / "run")]) == 2
    assert "found duplicate key 'lr' at line 3" in one_line_error(capsys)
    assert fj_train.main(["--output", str(tmp_path / "run"), *TINY, "optimization.lr=-1"]) == 2
    assert "optimization.lr: got -1.0" in one_line_error(capsys)
    assert fj_train.main(["--config", str(tmp_path), "--output", str(tmp_path / "run")]) == 2
    assert "is a folder: pass a YAML file" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_schedules_never_leave_their_bounds():
    mom = LinearMomentum(0.996, 1.0, 100)
    assert [mom.value(s) for s in (0, 100, 101, 10**6)] == [0.996, 1.0, 1.0, 1.0]
    lr = WarmupCosineLR(2e-4, 1e-3, 1e-6, 10, 100)
    assert lr.value(100) == pytest.approx(1e-6) and lr.value(150) == pytest.approx(1e-6) and lr.value(10**6) == pytest.approx(1e-6)
    wd = CosineWD(0.04, 0.4, 100)
    assert wd.value(150) == pytest.approx(0.4) and wd.value(10**6) == pytest.approx(0.4)


@pytest.mark.slow  # three or four tiny runs
def test_mid_epoch_resume_with_another_batch_size_is_refused(tmp_path):
    """A checkpoint at iteration 3 of batch 8 would be read as iteration 3 of batch 4:
    refused with one line; at an epoch's end another batch size resumes, its momentum <= 1."""
    out = tmp_path / "run"
    part = Trainer(load_config(None, [*TINY, "meta.max_steps=3"]), out, quiet=True).fit()
    assert part["status"] == "max_steps"
    with pytest.raises(CheckpointError, match=r"stopped mid-epoch \(iteration 3\) with data.batch_size=8 on 1 process\(es\); this run has data.batch_size=4"):
        Trainer(load_config(None, [*TINY, "data.batch_size=4"]), out, resume=True, quiet=True)
    # an epoch's end: allowed, and the schedules stay in their bounds though the step count outgrows them
    Trainer(load_config(None, [*TINY, "optimization.epochs=1"]), tmp_path / "b", quiet=True).fit()
    # batch 16: 3 steps an epoch, a 6-step schedule, and the resumed step counter is already 6
    done = Trainer(load_config(None, [*TINY, "optimization.epochs=2", "data.batch_size=16"]), tmp_path / "b", resume=True, quiet=True).fit()
    assert done["status"] == "done" and done["step"] == 9
    with open(tmp_path / "b" / "log.csv", newline="") as f:
        momenta = [float(r["momentum"]) for r in csv.DictReader(f)]
    assert len(momenta) == 6 + 3 and momenta[-3:] == [1.0, 1.0, 1.0]  # unclamped: 1.00067, 1.00133, 1.002


# -- item 4: everything a run writes is inside --output


@pytest.mark.parametrize("tag", ["../../escaped", "/tmp/abs", "a/b", "..", ".hidden", "", "a\\b"])
def test_write_tag_must_be_a_plain_name(tag):
    with pytest.raises(ConfigError, match=r"logging.write_tag: got .*, expected a plain name"):
        load_config(None, [*TINY, f"logging.write_tag='{tag}'"])


def test_a_run_writes_only_inside_its_output_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    Trainer(load_config(None, [*TINY, "optimization.epochs=1", "logging.write_tag=run1"]), work / "out", quiet=True).fit()
    assert [p.name for p in work.iterdir()] == ["out"]
    assert sorted(p.name for p in (work / "out").iterdir()) == ["config.yaml", "log.csv", "run1-best.pth.tar", "run1-ep1.pth.tar", "run1-latest.pth.tar"]


# -- item 2: a run folder belongs to one run


@pytest.mark.slow  # three or four tiny runs
def test_a_second_fresh_run_into_a_finished_runs_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--quiet", "--output", str(out), *TINY, "optimization.epochs=1"]
    assert fj_train.main(args) == 0
    first = read_checkpoint(out / "jepa-latest.pth.tar")
    capsys.readouterr()
    assert fj_train.main(args) == 2
    line = one_line_error(capsys)
    assert f"output folder {out} holds another run's checkpoint(s) (jepa-best.pth.tar, jepa-ep1.pth.tar, jepa-latest.pth.tar)" in line
    assert "--resume" in line and "--overwrite" in line
    after = read_checkpoint(out / "jepa-latest.pth.tar")
    assert all(torch.equal(a, b) for a, b in zip(first["encoder"].values(), after["encoder"].values()))
    # --overwrite: a fresh run, the old run's checkpoints gone (none left beside the new ones)
    assert fj_train.main([*args, "--overwrite", "optimization.epochs=2", "logging.checkpoint_freq=2"]) == 0
    assert sorted(p.name for p in out.glob("*.pth.tar")) == ["jepa-best.pth.tar", "jepa-ep2.pth.tar", "jepa-latest.pth.tar", "jepa-prev.pth.tar"]
    assert read_checkpoint(out / "jepa-prev.pth.tar")["epoch"] == 1  # the new run's own epoch 1
    assert not (out / LOCK_NAME).exists()  # a finished run leaves no lock file


def test_a_concurrent_run_is_refused_and_a_dead_runs_lock_is_not(tmp_path):
    """Another process holds the folder's lock: a run into it is refused before building
    anything, naming the holder. Killed with -9, the holder's lock is gone with it."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "os.write(fd, b'4242 otherhost 2026-01-01T00:00:00'); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
         "time.sleep(600)", str(out / LOCK_NAME)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"output folder {out} is in use by another run \(pid 4242 on otherhost"):
            Trainer(load_config(None, [*TINY, "optimization.epochs=1"]), out, quiet=True)
        with pytest.raises(RunFolderError, match=r"is in use by another run"):
            Trainer(load_config(None, [*TINY, "optimization.epochs=1"]), out, resume=True, quiet=True)
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).exists()  # the stale file stays; its lock does not
    assert Trainer(load_config(None, [*TINY, "optimization.epochs=1"]), out, quiet=True).fit()["status"] == "done"


def test_the_lock_is_held_while_a_run_trains(tmp_path, monkeypatch):
    """Two runs that both passed the early check: the second to reach training is refused."""
    out = tmp_path / "run"
    cfg = [*TINY, "optimization.epochs=1"]
    first, second = (Trainer(load_config(None, cfg), out, quiet=True) for _ in range(2))
    seen = []
    real_step = first.stepper.step

    def step_and_try_the_other(*a, **k):
        if not seen:
            with pytest.raises(RunFolderError, match="is in use by another run") as exc:
                second.fit()
            seen.append(str(exc.value))
        return real_step(*a, **k)

    monkeypatch.setattr(first.stepper, "step", step_and_try_the_other)
    assert first.fit()["status"] == "done" and len(seen) == 1
    with pytest.raises(RunFolderError, match="holds another run's checkpoint"):
        second.fit()


# -- item 5: image folders with links


def _images(folder: Path, n: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.new("RGB", (20, 20), (10 * i % 256, 40, 90)).save(folder / f"{i}.png")


def test_looping_links_are_walked_once_and_reported_in_one_line(tmp_path):
    root = tmp_path / "train"
    _images(root / "a", 8)
    _images(root / "b", 8)
    (root / "a" / "loopA").symlink_to(".")
    (root / "a" / "loopB").symlink_to("..")
    (root / "b" / "deeper").mkdir()
    (root / "b" / "deeper" / "up").symlink_to("../..")
    (root / "b" / "twin.png").symlink_to(root / "b" / "0.png")
    (root / "b" / "gone.png").symlink_to(root / "nowhere.png")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(root, crop_size=16)
    assert time.perf_counter() - t0 < 60  # not a timing claim: an exponential walk never ends
    assert len(ds) == 16 and ds.classes == ["a", "b"]
    assert sorted(Path(p).name for p, _ in ds.samples) == sorted([f"{i}.png" for i in range(8)] * 2)
    assert sorted(Path(p).name for p in ds.skipped_links) == ["gone.png", "loopA", "loopB", "twin.png", "up"]
    lines = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0] and "skipped 5 link(s)" in lines[0]


def test_a_linked_class_folder_of_real_files_is_still_read(tmp_path):
    """A link to a folder outside the tree is a real folder walked once: its files count."""
    _images(tmp_path / "elsewhere", 3)
    root = tmp_path / "train"
    _images(root / "a", 2)
    (root / "b").symlink_to(tmp_path / "elsewhere")
    ds = ImageFolder(root, crop_size=16)
    assert len(ds) == 5 and [label for _, label in ds.samples] == [0, 0, 1, 1, 1] and ds.skipped_links == []


# -- item 13: unreadable data


def _corrupt_folder(root: Path) -> None:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"{i}.jpg").write_bytes(b"not an image " * 10)


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_folder_of_corrupt_files_is_one_line(tmp_path, capsys, workers):
    _corrupt_folder(tmp_path / "data" / "train")
    args = ["--quiet", "--output", str(tmp_path / "run"), *TINY, "data.dataset=imagefolder", f"data.root_path={tmp_path / 'data'}",
            "data.image_folder=train", f"data.num_workers={workers}"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-file warnings
        assert fj_train.main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fastjepa.train:")]
    assert len(err) == 1 and "no readable image in" in err[0] and "all 8 image file(s) failed to open or decode" in err[0], err


def test_a_damaged_mnist_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTJEPA_CACHE", str(tmp_path))
    images, labels = emb.load_mnist_arrays()
    (cache,) = tmp_path.glob("mnist5k-*.npz")
    good = cache.read_bytes()
    for damage in (good[: len(good) // 2], good[:100] + bytes(1000) + good[1100:]):
        cache.write_bytes(damage)
        with pytest.warns(RuntimeWarning, match="are damaged; rebuilding them"):
            again = emb.load_mnist_arrays()
        assert np.array_equal(again[0], images) and np.array_equal(again[1], labels)
        assert cache.read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p != cache]  # no temporary file left


def test_the_mnist_cache_is_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way leaves no cache file (and the data still loads)."""
    monkeypatch.setenv("FASTJEPA_CACHE", str(tmp_path))

    def half_then_full(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(emb.np, "savez", half_then_full)
    images, _ = emb.load_mnist_arrays()
    assert images.shape == (5000, 28, 28) and list(tmp_path.iterdir()) == []


# -- item 11: environment faults


def _full_disk_after(monkeypatch, saves_ok: int):
    """torch.save fails (ENOSPC from the file) once ``saves_ok`` saves have completed."""
    import fastjepa.checkpoint.core as ckpt_mod

    real = ckpt_mod.torch.save
    count = {"n": 0}

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            self.written += len(b)
            if self.written > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def flush(self):
            return self.f.flush()

    def save(obj, f, *a, **k):
        count["n"] += 1
        if count["n"] > saves_ok:
            return real(obj, Full(f), *a, **k)
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)


def test_disk_full_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _full_disk_after(monkeypatch, saves_ok=2)  # epoch 1: latest + ep1; epoch 2's latest fails
    assert fj_train.main(["--quiet", "--output", str(out), *TINY, "logging.checkpoint_freq=1"]) == 2
    line = one_line_error(capsys, "fastjepa.train")
    assert "Traceback" not in capsys.readouterr().err
    assert line.startswith("fastjepa.train: No space left on device: ") and f"the last complete checkpoint is {out / 'jepa-latest.pth.tar'}" in line
    assert read_checkpoint(out / "jepa-latest.pth.tar")["epoch"] == 1
    assert not [p.name for p in out.glob(".*")]  # neither the temporary file nor the lock
    monkeypatch.undo()
    assert fj_train.main(["--quiet", "--output", str(out), "--resume", *TINY, "logging.checkpoint_freq=1"]) == 0


@pytest.mark.parametrize("resume", [False, True])
def test_an_unwritable_output_folder_is_one_line(tmp_path, monkeypatch, capsys, resume):
    """A read-only folder (simulated: the tests run as root, whom permissions do not stop)."""
    import fastjepa.training.runfolder as rf

    out = tmp_path / "run"
    if resume:
        assert fj_train.main(["--quiet", "--output", str(out), *TINY, "optimization.epochs=1"]) == 0
        capsys.readouterr()
    real_open = rf.os.open

    def read_only(path, flags, *a):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(rf.os, "open", read_only)
    argv = ["--quiet", "--output", str(out), *TINY, "optimization.epochs=2"] + (["--resume"] if resume else [])
    assert fj_train.main(argv) == 2
    assert one_line_error(capsys) == f"fastjepa.train: output folder {out} is not writable: Permission denied"


# -- item 14: evaluation options checked before any work


@pytest.fixture
def no_eval_work(monkeypatch):
    def work(*a, **k):
        raise AssertionError("evaluation work started before the options were checked")

    monkeypatch.setattr(fj_eval, "evaluate_encoder", work)
    monkeypatch.setattr(fj_eval, "random_init_encoder", work)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
        (["--batch-size", "-5"], "--batch-size -5: expected an integer >= 1"),
        (["--C", "-1"], "--C -1.0: expected a finite number > 0"),
        (["--C", "0"], "--C 0.0: expected a finite number > 0"),
        (["--C", "nan"], "--C nan: expected a finite number > 0"),
        (["--limit-train", "0"], "--limit-train 0: expected an integer >= 1"),
    ],
)
def test_bad_eval_options_are_refused_before_any_work(tmp_path, capsys, no_eval_work, option, message):
    assert fj_eval.main(["--random-init", "--output", str(tmp_path / "ev"), *option, *TINY]) == 2
    assert one_line_error(capsys).startswith(f"fastjepa.eval: {message}")


def test_eval_output_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, no_eval_work):
    (tmp_path / "taken").write_text("x")
    assert fj_eval.main(["--random-init", "--output", str(tmp_path / "taken"), *TINY]) == 2
    assert "--output" in one_line_error(capsys) and (tmp_path / "taken").read_text() == "x"


def test_eval_into_an_unwritable_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys, no_eval_work):
    def read_only(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fj_eval.tempfile, "TemporaryFile", read_only)
    assert fj_eval.main(["--random-init", "--output", str(tmp_path / "ev"), *TINY]) == 2
    assert one_line_error(capsys) == f"fastjepa.eval: cannot write eval.json into {tmp_path / 'ev'}: Read-only file system"


def test_a_one_class_training_folder_is_refused_before_any_work(tmp_path, capsys, no_eval_work):
    _images(tmp_path / "train" / "only", 4)
    _images(tmp_path / "val" / "only", 2)
    argv = ["--random-init", "--data", "imagefolder", "--train-dir", str(tmp_path / "train"), "--val-dir", str(tmp_path / "val"),
            "--output", str(tmp_path / "ev"), *TINY]  # fmt: skip
    assert fj_eval.main(argv) == 2
    assert "hold one class: a probe needs at least two" in one_line_error(capsys)


@pytest.mark.slow
def test_cli_refusals_in_a_subprocess_are_one_line_exit_2(tmp_path):
    """The installed entry point, not only main(): a fresh run over another run's folder, a
    bad eval option. (> 5 s: interpreter and torch start-up, twice.)"""
    out = tmp_path / "run"
    out.mkdir()
    (out / "jepa-latest.pth.tar").write_bytes(b"another run")
    r = cli("--output", str(out), *TINY)
    lines = [ln for ln in r.stderr.splitlines() if "thread(s)" not in ln]  # the CPU threads line, on a busy machine
    assert r.returncode == 2 and len(lines) == 1 and "holds another run's checkpoint" in lines[0], r.stderr
    r = cli("--random-init", "--batch-size", "0", *TINY, module="fastjepa.eval")
    assert r.returncode == 2 and r.stderr.strip() == "fastjepa.eval: --batch-size 0: expected an integer >= 1", r.stderr


# -- the time budget: a cut within the epoch when one epoch does not fit


@pytest.mark.parametrize(
    "budget, step_s, ipe, expected",
    [
        (100.0, 1.0, 50, None),  # 50 steps (57.5 s with overhead) fit: whole epochs
        (10.0, 1.0, 50, int(10 / time_budget.OVERHEAD)),  # 8 of 50
        (0.001, 1.0, 50, 1),  # at least one step
        (100.0, 0.0, 50, None),  # nothing measured
    ],
)
def test_steps_for_budget(budget, step_s, ipe, expected):
    assert time_budget.steps_for_budget(budget, step_s, ipe) == expected


def test_a_budget_under_one_epoch_cuts_within_it_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(time_budget, "measure_step_seconds", lambda step, dataset: 1.0)
    budget = 3.5 * time_budget.OVERHEAD  # 3 one-second steps fit, one 6-step epoch does not
    cfg = load_config(None, [*TINY, "optimization.epochs=3", f"optimization.time_budget_s={budget}"])
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    assert trainer.stepper.lr_sched.T_max == 3 and trainer.stepper.mom_sched.T_max == 3  # the schedules span the 3 steps
    summary = trainer.fit()
    assert summary["status"] == "done" and summary["step"] == 3
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optimization"]
    assert saved["epochs"] == 1 and saved["budget_steps"] == 3 and saved["warmup"] == pytest.approx(1 * 3 / (6 * 3))
    err = capsys.readouterr().err
    assert "one epoch (6 steps, ~7 s) does not fit optimization.time_budget_s=4.025, so the run stops after 3 steps of epoch 1" in err
    assert "time budget: stopped after 3 of 6 steps of epoch 1" in err
    ckpt = read_checkpoint(tmp_path / "run" / "jepa-latest.pth.tar")
    assert ckpt["epoch"] == 0 and ckpt["fastjepa"]["next_itr"] == 3 and ckpt["fastjepa"]["step"] == 3


@pytest.mark.slow  # three or four tiny runs
def test_a_resumed_cut_run_reads_the_cut_and_stops_at_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(time_budget, "measure_step_seconds", lambda step, dataset: 1.0)
    args = [*TINY, "optimization.epochs=3", f"optimization.time_budget_s={3.5 * time_budget.OVERHEAD}"]
    part = Trainer(load_config(None, [*args, "meta.max_steps=2"]), tmp_path / "run", quiet=True).fit()
    assert part["status"] == "max_steps" and part["step"] == 2

    def no_measuring(step, dataset):
        raise AssertionError("a resumed run measured its step time again")

    monkeypatch.setattr(time_budget, "measure_step_seconds", no_measuring)
    capsys.readouterr()
    rest = Trainer(load_config(None, args), tmp_path / "run", resume=True, quiet=True)
    assert rest.stepper.lr_sched.T_max == 3
    assert rest.fit()["step"] == 3
    assert "3 of the 6 steps of epoch 1, as chosen for optimization.time_budget_s" in capsys.readouterr().err
    # resuming the finished cut trains nothing more
    again = Trainer(load_config(None, args), tmp_path / "run", resume=True, quiet=True).fit()
    assert again["status"] == "done" and again["step"] == 3
    # the uninterrupted cut run trains the same losses
    monkeypatch.setattr(time_budget, "measure_step_seconds", lambda step, dataset: 1.0)
    Trainer(load_config(None, args), tmp_path / "full", quiet=True).fit()

    def losses(run):
        with open(tmp_path / run / "log.csv", newline="") as f:
            return [(r["step"], r["loss"]) for r in csv.DictReader(f)]

    assert losses("run") == losses("full")

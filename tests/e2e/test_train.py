"""End-to-end training: the CLI in a subprocess, resume equality, output files."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastjepa.checkpoint import read_checkpoint
from fastjepa.config import ConfigError, load_config
from fastjepa.training.trainer import Trainer

from .._tiny import TINY

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=240, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "fastjepa.train", *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def losses(run_dir):
    with open(Path(run_dir) / "log.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_default_config_trains_in_subprocess(tmp_path):
    """The packaged default config, shrunk by overrides, end to end through the CLI."""
    out = tmp_path / "run"
    r = run_cli("--output", str(out), "meta.max_steps=6", "meta.model_kwargs={depth: 1}", "meta.pred_depth=1",
                "data.batch_size=16", "logging.log_freq=2", "logging.probe=false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("jepa-latest.pth.tar", "log.csv", "config.yaml", "loss.png"):
        assert (out / name).is_file(), name
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"epoch", "itr", "loss", "lr", "wd", "momentum", "imgs_per_sec", "mask_enc", "mask_pred"} <= set(rows[0])
    assert len(rows) == 6
    assert "loss:" in r.stderr and "masks:" in r.stderr and "grad_stats" in r.stderr  # reference-style console lines
    # the summary line: how it ended, steps, images, wall time, final loss, where the files are
    assert re.search(rf"fastjepa: max_steps: 0 epoch\(s\), step 6, 96 images in [\d.]+ s, final loss [\d.]+ — files in {re.escape(str(out))}/", r.stdout), r.stdout


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    full = Trainer(load_config(None, TINY), tmp_path / "full", quiet=True).fit()
    assert full["status"] == "done" and full["step"] == 12
    part = Trainer(load_config(None, [*TINY, "meta.max_steps=4"]), tmp_path / "part", quiet=True).fit()
    assert part["status"] == "max_steps" and part["step"] == 4
    rest = Trainer(load_config(None, TINY), tmp_path / "part", resume=True, quiet=True).fit()
    assert rest["status"] == "done" and rest["step"] == 12
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [s for s, _ in b] == list(range(12))
    assert a == b  # the loss sequence (log.csv keeps 6 decimals) ...
    fa, fb = (read_checkpoint(tmp_path / r / "jepa-latest.pth.tar") for r in ("full", "part"))
    for net in ("encoder", "predictor", "target_encoder"):  # ... and every weight, bit for bit
        assert all(torch.equal(fa[net][k], fb[net][k]) for k in fa[net]), net
    for sa, sb in zip(fa["opt"]["state"].values(), fb["opt"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))


def test_loss_falls(tmp_path):
    cfg = load_config(None, [*TINY, "optimization.epochs=4", "optimization.lr=0.002"])
    Trainer(cfg, tmp_path / "r", quiet=True).fit()
    seq = [v for _, v in losses(tmp_path / "r")]
    assert sum(seq[-4:]) / 4 < sum(seq[:4]) / 4


def test_bad_config_exits_before_work(tmp_path):
    r = run_cli("--output", str(tmp_path / "x"), "optimization.epoch=1", timeout=60)
    assert r.returncode == 2 and "unknown key optimization.epoch" in r.stderr
    assert not (tmp_path / "x").exists()
    r = run_cli("--output", str(tmp_path / "y"), "--resume", timeout=60)
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_cuda_asked_for_but_absent_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"meta\.device=cuda, but no CUDA device is visible here.*: set meta\.device=cpu \(or meta\.device=auto\)"):
        Trainer(load_config(None, [*TINY, "meta.device=cuda"]), tmp_path / "x", quiet=True)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("accum", [2])
def test_grad_accum_matches_full_batch(tmp_path, accum):
    a = Trainer(load_config(None, [*TINY, "meta.max_steps=3"]), tmp_path / "a", quiet=True).fit()
    b = Trainer(load_config(None, [*TINY, "meta.max_steps=3", f"optimization.grad_accum={accum}"]), tmp_path / "b", quiet=True).fit()
    assert a["step"] == b["step"] == 3
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "a"), losses(tmp_path / "b")):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-6)


def test_options_may_come_between_overrides():
    from fastjepa.eval import parse_args as eval_args
    from fastjepa.train import parse_args as train_args

    a = train_args(["--output", "r", "meta.fsdp=true", "--resume", "data.batch_size=8", "--quiet"])
    assert a.resume and a.quiet and a.output == "r" and a.overrides == ["meta.fsdp=true", "data.batch_size=8"]
    e = eval_args(["--checkpoint", "c", "meta.pred_depth=1", "--quiet", "data.crop_size=16"])
    assert e.quiet and e.overrides == ["meta.pred_depth=1", "data.crop_size=16"]


@pytest.mark.parametrize("compat", ["fastjepa", "reference"])
def test_resume_mid_epoch_is_exact_in_both_mask_modes(tmp_path, compat):
    """mask.compat=reference draws block corners from the global RNG and seeds each batch
    from a running counter: both must continue where they stopped (mid-epoch here)."""
    over = [*TINY, f"mask.compat={compat}", "mask.backend=python"]
    full = Trainer(load_config(None, over), tmp_path / "full", quiet=True).fit()
    Trainer(load_config(None, [*over, "meta.max_steps=4"]), tmp_path / "part", quiet=True).fit()
    t = Trainer(load_config(None, over), tmp_path / "part", resume=True, quiet=True)
    assert torch.equal(torch.get_rng_state(), read_checkpoint(tmp_path / "part" / "jepa-latest.pth.tar")["fastjepa"]["rng"]["torch"])
    rest = t.fit()
    assert full["step"] == rest["step"] == 12
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_each_step_uses_the_schedules_as_spec_says(tmp_path):
    """docs/design.md §5: the lr/wd schedules step before each optimizer step, counting from 1; the
    EMA uses exactly ema[0] on the first step; groups excluded from wd keep 0."""
    cfg = load_config(None, [*TINY, "optimization.start_lr=0.0002", "optimization.lr=0.001", "optimization.ema=[0.99,1.0]"])
    t = Trainer(cfg, tmp_path / "r", quiet=True)
    imgs, masks_enc, masks_pred = t.collator([t.dataset[i] for i in range(8)])
    imgs = imgs[0]
    target_before = [p.detach().clone() for p in t.model.target_encoder.parameters()]
    seen = []
    sched = t.stepper
    for step in range(3):
        r = t.stepper.step(imgs, masks_enc, masks_pred, index=step)
        lr, wd, mom = r.lr, r.wd, r.momentum
        seen.append((lr, wd, mom))
        assert lr == sched.lr_sched.value(step + 1) and wd == sched.wd_sched.value(step + 1) and mom == sched.mom_sched.value(step)
        for g in t.optimizer.param_groups:
            assert g["lr"] == lr and g["weight_decay"] == (0.0 if g.get("WD_exclude") else wd)
        if step == 0:  # target = 0.99 target + 0.01 encoder, exactly ema[0]
            for before, p, q in zip(target_before, t.model.target_encoder.parameters(), t.model.encoder.parameters()):
                torch.testing.assert_close(p, 0.99 * before + 0.01 * q.detach(), rtol=1e-6, atol=1e-7)
    assert seen[0][2] == 0.99 and seen[0][0] == pytest.approx(0.0002 + (0.001 - 0.0002) / sched.lr_sched.warmup_steps)
    assert seen[0][0] < seen[1][0] < seen[2][0]  # warming up
    assert sum(1 for g in t.optimizer.param_groups if g.get("WD_exclude")) >= 1


def test_periodic_checkpoints_and_the_saved_config(tmp_path):
    """jepa-ep<N> every logging.checkpoint_freq epochs and at the last; config.yaml is the
    resolved config, overrides included, and loads back as the same config."""
    over = [*TINY, "optimization.epochs=3", "logging.checkpoint_freq=2", "optimization.lr=0.0007"]
    Trainer(load_config(None, over), tmp_path / "r", quiet=True).fit()
    assert sorted(p.name for p in (tmp_path / "r").glob("jepa-ep*.pth.tar")) == ["jepa-ep2.pth.tar", "jepa-ep3.pth.tar"]
    assert [read_checkpoint(tmp_path / "r" / f"jepa-ep{n}.pth.tar")["epoch"] for n in (2, 3)] == [2, 3]
    saved = load_config(tmp_path / "r" / "config.yaml")
    assert saved == load_config(None, over) and saved["optimization"]["lr"] == 0.0007


def test_progress_bar_shows_loss_throughput_and_eta(tmp_path, capsys, monkeypatch):
    """On a terminal, not quiet: the epoch bar carries loss, img/s and tqdm's elapsed<remaining
    (off a terminal the trainer turns bars off by itself: test_eval's non-TTY test)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    Trainer(load_config(None, [*TINY, "optimization.epochs=1"]), tmp_path / "r", quiet=False).fit()
    err = capsys.readouterr().err
    # tqdm pads the rate ("  1.07it/s") and turns it round below 1 it/s ("1.20s/it") on a slow machine
    assert re.search(r"epoch 1/1: .*\d+/6 \[\d+:\d+<\d+:\d+, +[\d.]+(?:it/s|s/it), img_s=\d+, loss=\d\.\d{4}\]", err), err[-2000:]


def test_set_flag_and_positional_overrides_are_the_same():
    from fastjepa.train import parse_args

    a = parse_args(["--set", "data.batch_size=8", "--set", "optimization.lr=0.01", "meta.seed=3"])
    assert {*a.overrides, *(a.set or [])} == {"data.batch_size=8", "optimization.lr=0.01", "meta.seed=3"}


def test_loader_workers_do_not_change_the_run(tmp_path):
    """Masks and crops are functions of (seed, epoch, batch), not of which process made
    them: 0 and 2 loader workers give the same losses."""
    for w in (0, 2):
        Trainer(load_config(None, [*TINY, f"data.num_workers={w}"]), tmp_path / f"w{w}", quiet=True).fit()
    assert losses(tmp_path / "w0") == losses(tmp_path / "w2")


@pytest.mark.parametrize("probed", [True, False])
def test_summary_says_what_the_probe_means_when_there_is_one(tmp_path, monkeypatch, capsys, probed):
    import fastjepa.train as train

    monkeypatch.setattr(train, "_after_training", lambda *a: ", linear probe 80.0% / k-NN 30.0% (random init 81.0% / 31.0%)" if probed else "")
    assert train.main(["--output", str(tmp_path / "run"), "--quiet", *TINY]) == 0
    out = capsys.readouterr().out
    assert (train.PROBE_MEANING in out) is probed
    assert "not expected to beat its random initialisation" in train.PROBE_MEANING and "docs/probe-experiments.md" in train.PROBE_MEANING

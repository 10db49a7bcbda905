"""Representation health: the metrics on inputs of known rank and spread, the collapse
detector on a forced collapse and on a healthy run, and the best checkpoint (written,
pruned, picked by eval and export)."""

import csv
import math

import pytest
import torch

from fastjepa import health
from fastjepa.checkpoint import CheckpointError, read_checkpoint, resolve_run_checkpoint
from fastjepa.config import ConfigError, load_config
from fastjepa.training.trainer import Trainer

from ._tiny import TINY


def _orthonormal(n, k, gen):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


@pytest.mark.parametrize("k", [1, 3, 7, 16])
def test_rankme_of_rank_k_with_equal_singular_values_is_k(k):
    g = torch.Generator().manual_seed(k)
    x = 2.5 * _orthonormal(64, k, g) @ _orthonormal(32, k, g).T  # (64, 32), k equal singular values
    assert float(health.rankme(x)) == pytest.approx(k, rel=1e-6)
    assert float(health.rankme(x.float())) == pytest.approx(k, rel=1e-4)  # fp32 features: fp32 result
    assert health.rankme(x.float()).dtype == torch.float32


def test_rankme_known_cases():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(4000, 16, generator=g)
    assert 15.0 < float(health.rankme(iso)) <= 16.0  # every direction used ~equally
    # unequal singular values (2, 1): p = (2/3, 1/3), exp(entropy) known in closed form
    u, v = _orthonormal(10, 2, g), _orthonormal(6, 2, g)
    x = u @ torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64)) @ v.T
    p = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert float(health.rankme(x)) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)
    assert float(health.rankme(torch.zeros(8, 4))) == 0.0  # nothing spanned
    assert float(health.rankme(torch.ones(8, 4))) == pytest.approx(1.0)  # one direction (not centred: RankMe)
    assert float(health.effective_rank(torch.ones(8, 4), center=True)) == 0.0  # centred: nothing left
    assert math.isnan(float(health.rankme(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))))  # no raise: no host read
    # max_rows: only the first rows count (a fixed cost)
    y = torch.cat([_orthonormal(8, 2, g) @ _orthonormal(16, 2, g).T, torch.randn(100, 16, generator=g, dtype=torch.float64)])
    assert float(health.rankme(y, max_rows=8)) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match=r"\(n >= 1, dim\)"):
        health.rankme(torch.ones(4))


def test_spread_and_cosine_of_known_distributions():
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.5, 1.0, 2.0, 4.0])
    x = torch.randn(200_000, 4, generator=g) * sigma + 3.0
    assert float(health.spread(x)) == pytest.approx(float(sigma.mean()), rel=1e-2)  # per-dimension std, averaged; offset ignored
    assert float(health.spread(torch.full((16, 8), 7.0))) == 0.0  # every row the same: collapse
    assert math.isnan(float(health.spread(torch.ones(1, 8))))  # one row (a micro-batch of one image): nothing to measure
    u = torch.rand(100_000, 1, generator=g)  # uniform on [0, 1): std 1/sqrt(12)
    assert float(health.spread(u)) == pytest.approx(1 / math.sqrt(12), rel=1e-2)
    a = torch.randn(5, 3, 8, generator=g)
    assert float(health.pred_target_cosine(a, 2 * a)) == pytest.approx(1.0)
    assert float(health.pred_target_cosine(a, -a)) == pytest.approx(-1.0)
    e = torch.eye(4)
    assert float(health.pred_target_cosine(e, e.roll(1, 0))) == 0.0
    assert health.pooled(torch.arange(6.0).reshape(1, 3, 2)).tolist() == [[2.0, 3.0]]


def test_eval_effective_rank_is_the_same_implementation():
    from fastjepa.evaluation.classifiers import effective_rank

    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64) + 5.0
    assert effective_rank(x.numpy()) == pytest.approx(float(health.effective_rank(x, center=True)), rel=1e-12)


def test_detector_fires_after_patience_once_and_rearms():
    d = health.CollapseDetector(rankme_fraction=0.5, std_floor=1e-3, patience=3)
    # judged on the directions beyond the first (rankme - 1): healthy while above 0.5 x (12 - 1) = 5.5
    assert [d.update(s, r, 1.0) for s, r in enumerate([10, 12, 11, 9, 6.6])] == [None] * 5
    out = [d.update(s, 6.0, 1.0) for s in range(5, 10)]
    assert out[:2] == [None, None] and out[3:] == [None, None]  # fires once, on the third low log step
    assert "step 7: representation collapse: target_rankme 6.00: its directions beyond the first (5.00) below 0.5 x their peak (11.00" in out[2]
    assert "optimization.lr" in out[2]
    assert d.update(10, 11.0, 1.0) is None and d.count == 0  # healthy again: re-armed
    assert [d.update(s, 11.0, 1e-4) for s in (11, 12, 13)][-1].startswith("step 13: representation collapse: target_std 0.0001 below")
    # its state survives a checkpoint; non-finite values are not judged
    e = health.CollapseDetector(0.5, 1e-3, 3, state=d.state())
    assert (e.peak, e.count, e.fired) == (12.0, 3, True)
    assert e.update(14, float("nan"), 1.0) is None and e.count == 3
    # a steady run never fires; 0 turns a test off
    quiet = health.CollapseDetector(0.0, 0.0, 1)
    assert all(quiet.update(s, 1.0, 0.0) is None for s in range(20))


@pytest.mark.parametrize(
    "override, message",
    [
        ("health.max_rows=1", "health.max_rows=1: expected an integer >= 2"),
        ("health.patience=0", "health.patience=0: expected an integer >= 1"),
        ("health.rankme_fraction=1.5", r"health.rankme_fraction=1.5: expected a fraction in \[0, 1\)"),
        ("health.std_floor=-1", "health.std_floor=-1.0: expected a number >= 0"),
        ("meta.on_collapse=halt", "config key meta.on_collapse: got 'halt'"),
    ],
)
def test_health_config_is_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, override])
    with pytest.raises(ConfigError, match="meta.on_collapse=stop needs health.enabled=true"):
        load_config(None, [*TINY, "meta.on_collapse=stop", "health.enabled=false"])


def rows(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def collapse_target_from(t, step):
    """From optimizer step ``step`` on, the target encoder maps every image to one output."""
    net = t.model.target_encoder
    forward = net.forward

    def constant(*a, **k):
        out = forward(*a, **k)
        return out * 0 + 1 if t.step >= step else out

    net.forward = constant


def test_health_columns_at_log_steps_only(tmp_path):
    t = Trainer(load_config(None, TINY), tmp_path / "r", quiet=True)
    t.fit()
    log = rows(tmp_path / "r")
    logged = [int(r["step"]) for r in log if r["target_rankme"]]
    assert logged == [0, 2, 4, 5, 6, 8, 10, 11]  # log_freq 2 and each epoch's last iteration
    for r in log:
        if r["target_rankme"]:
            assert 1.0 <= float(r["target_rankme"]) <= 8.0  # batch 8: at most 8 directions
            assert 1.0 <= float(r["context_rankme"]) <= 8.0
            assert float(r["target_std"]) > 0 and float(r["context_std"]) > 0 and float(r["pred_std"]) > 0
            assert -1.0 <= float(r["pred_target_cos"]) <= 1.0
        else:
            assert all(r[k] == "" for k in health.HEALTH_COLUMNS)


def test_micro_batches_pool_into_one_batch_of_health(tmp_path):
    """grad_accum=8 with batch 8: micro-batches of one image; RankMe and std still see all 8."""
    runs = {}
    for accum in (1, 8):
        run = tmp_path / f"a{accum}"
        Trainer(load_config(None, [*TINY, f"optimization.grad_accum={accum}", "meta.max_steps=1"]), run, quiet=True).fit()
        runs[accum] = rows(run)[0]
    for k in ("target_rankme", "target_std", "context_rankme", "context_std", "pred_std"):
        assert float(runs[8][k]) == pytest.approx(float(runs[1][k]), rel=1e-3), k


def test_detector_stays_quiet_on_a_healthy_run(tmp_path, capsys):
    s = Trainer(load_config(None, [*TINY, "optimization.epochs=3", "meta.on_collapse=stop"]), tmp_path / "r", quiet=True).fit()
    assert s["status"] == "done" and s["collapse"] is None
    assert "collapse" not in capsys.readouterr().err


def test_detector_warns_on_a_forced_collapse(tmp_path, capsys):
    t = Trainer(load_config(None, [*TINY, "health.patience=2"]), tmp_path / "r", quiet=True)
    collapse_target_from(t, 6)  # epoch 2
    s = t.fit()
    assert s["status"] == "done"  # warn: the run goes on
    err = capsys.readouterr().err
    assert err.count("representation collapse") == 1
    assert "step 8: representation collapse: target_std 0 below health.std_floor=0.0001 for 2 log steps" in err
    assert "meta.on_collapse=stop would stop here" in err
    log = {int(r["step"]): r for r in rows(tmp_path / "r") if r["target_rankme"]}
    # one output for every image: one direction (RankMe 1), no spread
    assert float(log[8]["target_std"]) == 0.0 and float(log[8]["target_rankme"]) == pytest.approx(1.0)


def test_on_collapse_stop_writes_the_checkpoint_and_says_why(tmp_path, capsys):
    t = Trainer(load_config(None, [*TINY, "health.patience=2", "meta.on_collapse=stop"]), tmp_path / "r", quiet=True)
    collapse_target_from(t, 6)
    s = t.fit()
    assert s["status"] == "collapsed" and s["step"] == 9 and "target_std 0 below" in s["collapse"]
    assert "stopping (meta.on_collapse=stop)" in capsys.readouterr().err
    ckpt = read_checkpoint(tmp_path / "r" / "jepa-latest.pth.tar")
    assert ckpt["fastjepa"]["step"] == 9 and ckpt["fastjepa"]["health"]["detector"]["fired"]
    # the kept checkpoint is still epoch 1's, before the collapse
    assert read_checkpoint(tmp_path / "r" / "jepa-best.pth.tar")["epoch"] == 1


def test_train_cli_exits_non_zero_on_collapse(tmp_path, monkeypatch, capsys):
    from fastjepa import train

    monkeypatch.setattr(health.CollapseDetector, "update", lambda self, step, r, s: f"step {step}: representation collapse: forced")
    rc = train.main(["--output", str(tmp_path / "r"), *TINY, "meta.on_collapse=stop"])
    err = capsys.readouterr().err
    assert rc == 4 and "fastjepa.train: stopped on collapse (meta.on_collapse=stop): step 0: representation collapse: forced" in err
    assert (tmp_path / "r" / "jepa-latest.pth.tar").is_file()


def test_best_checkpoint_is_written_pruned_and_picked(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / ".jepa-best.pth.tar.link").write_bytes(b"partial")  # left by a killed write
    (run / ".jepa-best.pth.tar.abc123.tmp").write_bytes(b"partial")
    t = Trainer(load_config(None, [*TINY, "optimization.epochs=3", "health.patience=100"]), run, quiet=True)
    collapse_target_from(t, 6)  # epochs 2 and 3 collapse: RankMe 1
    s = t.fit()
    assert not (run / ".jepa-best.pth.tar.link").exists() and not (run / ".jepa-best.pth.tar.abc123.tmp").exists()
    best, latest = read_checkpoint(run / "jepa-best.pth.tar"), read_checkpoint(run / "jepa-latest.pth.tar")
    assert best["epoch"] == 1 and latest["epoch"] == 3
    epoch1_rank = next(float(r["target_rankme"]) for r in rows(run) if r["step"] == "5")  # epoch 1's last log step
    assert best["fastjepa"]["health"]["best_rankme"] == pytest.approx(epoch1_rank, rel=1e-5)
    assert s["best_checkpoint"] == str(run / "jepa-best.pth.tar") and s["best_rankme"] == pytest.approx(epoch1_rank, rel=1e-5)
    assert "jepa-best.pth.tar is epoch 1" in capsys.readouterr().err
    # picked: best by default, latest when asked, a file as itself
    assert resolve_run_checkpoint(run) == run / "jepa-best.pth.tar"
    assert resolve_run_checkpoint(run, prefer="latest") == run / "jepa-latest.pth.tar"
    assert resolve_run_checkpoint(run / "jepa-prev.pth.tar") == run / "jepa-prev.pth.tar"
    with pytest.raises(CheckpointError, match="without a <tag>-latest.pth.tar"):
        resolve_run_checkpoint(tmp_path)
    # resume keeps the best's score: a later epoch must beat it
    t2 = Trainer(load_config(None, [*TINY, "optimization.epochs=4", "health.patience=100"]), run, resume=True, quiet=True)
    assert t2.best_rankme == pytest.approx(epoch1_rank, rel=1e-5)


def test_eval_and_export_take_a_run_folder(tmp_path, capsys):
    from fastjepa import eval as ev
    from fastjepa.checkpoint.__main__ import main as checkpoint_main
    from fastjepa.checkpoint import read_safetensors

    run = tmp_path / "r"
    t = Trainer(load_config(None, [*TINY, "health.patience=100"]), run, quiet=True)
    collapse_target_from(t, 6)
    t.fit()
    common = ["--limit-train", "40", "--limit-val", "20", "--no-cache", "--no-baseline", "--quiet", "--data", "embedded"]
    assert ev.main(["--checkpoint", str(run), "--output", str(tmp_path / "e1"), *common]) == 0
    assert "is a run folder: evaluating jepa-best.pth.tar (the epoch with the highest target RankMe" in capsys.readouterr().err
    assert ev.main(["--checkpoint", str(run), "--latest", "--output", str(tmp_path / "e2"), *common]) == 0
    assert "is a run folder: evaluating jepa-latest.pth.tar" in capsys.readouterr().err
    assert checkpoint_main(["export", str(run), str(tmp_path / "b.safetensors")]) == 0
    assert "exporting jepa-best.pth.tar" in capsys.readouterr().err
    assert read_safetensors(tmp_path / "b.safetensors")[1]["epoch"] == "1"
    assert checkpoint_main(["export", str(run), str(tmp_path / "l.safetensors"), "--latest"]) == 0
    assert read_safetensors(tmp_path / "l.safetensors")[1]["epoch"] == "2"


def test_quick_probe_probes_the_kept_checkpoint_too(tmp_path):
    from fastjepa.evaluation.probe import quick_probe

    run = tmp_path / "r"
    cfg = load_config(None, [*TINY, "health.patience=100"])
    t = Trainer(cfg, run, quiet=True)
    collapse_target_from(t, 6)
    t.fit()
    res = quick_probe(run, cfg, quiet=True, cache_dir=tmp_path / "cache")
    assert res["epoch"] == 2 and res["best"]["epoch"] == 1 and not res["best"]["same_as_latest"]
    assert 0.0 <= res["best"]["linear_probe_top1"] <= 1.0 and res["best"]["target_rankme"] > 0


@pytest.mark.slow
def test_bench_health_writes_json_and_markdown(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "benchmarks/bench_health.py", "--shapes", "tiny", "--repeats", "1", "--warmup", "1",
                        "--out", str(tmp_path), "--stem", "h"], cwd=root, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((tmp_path / "h.json").read_text())["rows"][0]
    assert row["shape"] == "tiny" and row["step_off_ms"] > 0 and row["metrics_ms"] > 0
    assert "| tiny |" in (tmp_path / "h.md").read_text()


def test_health_scalars_reach_tensorboard_and_wandb(tmp_path, monkeypatch):
    import fastjepa.training.logs as logs_module

    logged = []

    class Recorder:
        def __init__(self, out, cfg):
            pass

        def log(self, step, **values):
            logged.append((step, values))

        def close(self):
            pass

    monkeypatch.setattr(logs_module, "ScalarLoggers", Recorder)
    Trainer(load_config(None, [*TINY, "optimization.epochs=1"]), tmp_path / "r", quiet=True).fit()
    with_health = [step for step, v in logged if set(health.HEALTH_COLUMNS) <= set(v)]
    assert with_health == [0, 2, 4, 5] and all(math.isfinite(v["target_rankme"]) for s, v in logged if s in with_health)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_rank_stops_together_on_collapse(tmp_path, mode):
    """Under torchrun the detector judges the all-reduced values: every rank fires at the
    same log step and stops (a rank left behind would hang in the next collective)."""
    from .e2e.test_distributed import torchrun

    extra = ["meta.fsdp=true"] if mode == "fsdp" else []
    r = torchrun(tmp_path / mode, *extra, "health.std_floor=1000.0", "health.patience=2", "meta.on_collapse=stop")
    assert r.returncode != 0, (r.stdout + r.stderr)[-3000:]
    assert "stopped on collapse (meta.on_collapse=stop): step 2: representation collapse: target_std" in r.stderr, r.stderr[-3000:]
    ckpt = read_checkpoint(tmp_path / mode / "jepa-latest.pth.tar")
    assert ckpt["fastjepa"]["step"] == 3 and ckpt["fastjepa"]["health"]["detector"]["fired"]
    logged = [row for row in rows(tmp_path / mode) if row["target_rankme"]]
    assert [int(row["step"]) for row in logged] == [0, 2] and all(float(row["target_std"]) > 0 for row in logged)


@pytest.mark.slow
def test_health_evidence_writes_the_table(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    tiny = [a for a in TINY if not a.startswith(("optimization.epochs", "logging.probe", "logging.plots"))]
    r = subprocess.run([sys.executable, "benchmarks/health_evidence.py", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path),
                        "--stem", "ev", "--train-images", "50", *tiny, "optimization.epochs=3"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ev.json").read_text())
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 3] and res["best_epoch"] in (1, 2, 3)
    assert all(e["target_rankme_last"] > 0 for e in res["epochs"]) and "spearman_probe_vs_live_rankme" in res
    assert all(e["batch_rankme"] >= 1.0 and e["batch_centred_rank"] >= 0.0 for e in res["epochs"])
    assert "| random init |" in (tmp_path / "ev.md").read_text()
    table = subprocess.run([sys.executable, "benchmarks/health_evidence.py", "--table", str(tmp_path / "ev.json")],
                           cwd=root, env=env, capture_output=True, text=True, timeout=300, check=True).stdout  # fmt: skip
    row = table.splitlines()[-1]
    assert row.startswith("| `") and f"| {res['best_epoch']}: " in row and "| 3: " in row, table

"""Plots: every PNG of a run is written, non-empty and readable by Pillow."""

import csv
import json
import math

import pytest
from PIL import Image

from fastjepa.plot import main, plot_run
from fastjepa.training.logs import CSV_COLUMNS


def write_log(run, steps=40, health=False):
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for s in range(steps):
            w.writerow(dict(epoch=1 + s // 10, itr=s % 10, step=s, loss=0.5 * math.exp(-s / 10), lr=1e-3 * min(1, (s + 1) / 10),
                            wd=0.04 + 0.01 * s, momentum=0.996 + 1e-4 * s, imgs_per_sec="" if s % 10 else 100.0 + s,
                            mask_enc=40 + s % 5, mask_pred=10 + s % 3, ms_per_itr=12.5, mem_gb=0.0, grad_first=1e-3, grad_last=2e-3,
                            **({} if not health or s % 10 else dict(target_rankme=12 - s / 10, target_std=0.5, context_rankme=13 - s / 10,
                                                                   context_std=0.6, pred_std=0.3, pred_target_cos=0.1 + s / 100))))  # fmt: skip


@pytest.mark.parametrize("with_eval, health", [(False, False), (True, True)])
def test_plot_run_writes_readable_pngs(tmp_path, with_eval, health):
    """health.png when the log has health columns (at log steps only; empty between)."""
    run = tmp_path / "run"
    write_log(run, health=health)
    if with_eval:
        (run / "eval.json").write_text(
            json.dumps({"linear_probe_top1": 0.9, "knn_top1": 0.8, "random_init": {"linear_probe_top1": 0.85, "knn_top1": 0.3}})
        )
    paths = plot_run(run)
    assert {p.name for p in paths} == {"loss.png", "schedules.png", "throughput.png", "overview.png"} | ({"health.png"} if health else set())
    for p in paths:
        assert p.stat().st_size > 1000
        with Image.open(p) as img:
            img.verify()
        with Image.open(p) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200


def test_plot_cli(tmp_path, capsys):
    write_log(tmp_path / "r", steps=3)
    assert main([str(tmp_path / "r")]) == 0
    assert "overview.png" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
    assert "fastjepa run folder" in capsys.readouterr().err

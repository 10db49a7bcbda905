"""TensorBoard and Weights & Biases: what a run's log.csv holds, they receive too."""

import csv
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from fastjepa.config import ConfigError, load_config
from fastjepa.health import HEALTH_COLUMNS
from fastjepa.training.trainer import Trainer

from .._tiny import TINY

SCALARS = ("loss", "lr", "wd", "momentum", "imgs_per_sec", "mask_enc", "mask_pred", "mem_gb")


def csv_rows(run_dir):
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tensorboard_scalars_match_log_csv(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    Trainer(load_config(None, [*TINY, "logging.tensorboard=true"]), out, quiet=True).fit()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {f"train/{k}" for k in SCALARS} <= set(events.Tags()["scalars"])
    rows = csv_rows(out)
    assert len(rows) == 12  # 2 epochs x 6 iterations
    for key in ("loss", "lr", "wd", "momentum", "mask_enc", "mask_pred"):
        got = events.Scalars(f"train/{key}")
        assert [e.step for e in got] == [int(r["step"]) for r in rows], key
        # log.csv rounds to 6 decimals / 7 significant digits; TensorBoard keeps float32
        assert [e.value for e in got] == pytest.approx([float(r[key]) for r in rows], rel=1e-5, abs=1e-6), key
    assert len({e.value for e in events.Scalars("train/lr")}) > 1  # the schedule moved: not a constant stand-in


def test_no_tensorboard_events_when_off_or_not_installed(tmp_path, monkeypatch):
    Trainer(load_config(None, TINY), tmp_path / "off", quiet=True).fit()  # TINY sets logging.tensorboard=false
    assert not (tmp_path / "off" / "tensorboard").exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when tensorboard is absent
    r = Trainer(load_config(None, [*TINY, "logging.tensorboard=true"]), tmp_path / "absent", quiet=True).fit()
    assert r["status"] == "done" and len(csv_rows(tmp_path / "absent")) == 12
    assert not (tmp_path / "absent" / "tensorboard").exists()


class _FakeRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, values, step=None):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_wandb_receives_the_csv_scalars(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    Trainer(load_config(None, [*TINY, "logging.wandb=true", "logging.wandb_project=jepa-test"]), out, quiet=True).fit()
    (run,) = runs
    assert run.init_kwargs["project"] == "jepa-test" and run.init_kwargs["dir"] == str(out)
    assert run.init_kwargs["config"]["optimization"]["epochs"] == 2  # the resolved config travels with the run
    assert run.finished
    rows = csv_rows(out)
    assert [step for step, _ in run.logged] == [int(r["step"]) for r in rows]
    for (_, values), row in zip(run.logged, rows):
        health_logged = bool(row["target_rankme"])  # the health scalars come at log steps, as in the CSV
        assert set(values) == {f"train/{k}" for k in (*SCALARS, *(HEALTH_COLUMNS if health_logged else ()))}
        for key in HEALTH_COLUMNS if health_logged else ():
            assert values[f"train/{key}"] == pytest.approx(float(row[key]), rel=1e-5), key
        for key in ("loss", "lr", "wd", "momentum"):
            assert values[f"train/{key}"] == pytest.approx(float(row[key]), rel=1e-6, abs=1e-6), key


def test_wandb_asked_for_but_not_installed_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"logging\.wandb=true, but wandb is not installed: pip install 'fastjepa\[wandb\]'"):
        Trainer(load_config(None, [*TINY, "logging.wandb=true"]), out, quiet=True).fit()
    assert not (out / "log.csv").exists() and not (out / "config.yaml").exists()  # failed before writing anything


def test_train_cli_wandb_not_installed_exits_2_with_one_line(tmp_path):
    """Through the command line: exit status 2 and the install command, not a traceback."""
    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: wandb is not installed')\n")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(root)]))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "fastjepa.train", "--output", str(out), *TINY, "logging.wandb=true"],
                       capture_output=True, text=True, timeout=120, cwd=root, env=env)  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == ["fastjepa.train: logging.wandb=true, but wandb is not installed: pip install 'fastjepa[wandb]'"]
    assert not (out / "log.csv").exists()

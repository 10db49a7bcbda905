"""optimization.time_budget_s: the epochs are fitted to a measured step time, the timing
steps leave no trace, and a resumed run keeps the epochs it chose."""

import pytest
import torch
import yaml

from fastjepa.checkpoint import read_checkpoint
from fastjepa.config import ConfigError, load_config
from fastjepa.training.trainer import Trainer
from fastjepa.training import time_budget

from .._tiny import TINY
from ..e2e.test_train import losses


@pytest.mark.parametrize(
    "budget, step_s, ipe, max_epochs, expected",
    [
        (100.0, 0.1, 10, 100, int(100 / (10 * 0.1 * time_budget.OVERHEAD))),  # 86 fit, under the cap
        (100.0, 0.1, 10, 20, 20),  # never more than configured
        (0.001, 0.1, 10, 20, 1),  # at least one epoch
        (100.0, 0.0, 10, 7, 7),  # nothing measured: as configured
    ],
)
def test_epochs_for_budget(budget, step_s, ipe, max_epochs, expected):
    assert time_budget.epochs_for_budget(budget, step_s, ipe, max_epochs) == expected


def test_default_config_has_a_budget_and_the_test_config_none():
    assert load_config(None)["optimization"]["time_budget_s"] == 180
    assert load_config(None, TINY)["optimization"]["time_budget_s"] is None


@pytest.mark.parametrize("value", ["0", "-5"])
def test_bad_budget_names_key_and_expectation(value):
    with pytest.raises(ConfigError, match=rf"optimization.time_budget_s={float(value)}: expected a number of seconds > 0, or null"):
        load_config(None, [*TINY, f"optimization.time_budget_s={value}"])


@pytest.mark.parametrize("compat", ["fastjepa", "reference"])  # reference: masks from the global RNG
def test_timing_steps_leave_the_run_unchanged(tmp_path, compat):
    """A budget that binds nothing trains bit for bit what no budget trains: the timed
    steps' updates to weights, EMA target, optimizer state and RNG are all undone."""
    args = [*TINY, f"mask.compat={compat}"]
    plain = Trainer(load_config(None, args), tmp_path / "plain", quiet=True).fit()
    timed_trainer = Trainer(load_config(None, [*args, "optimization.time_budget_s=1000000"]), tmp_path / "timed", quiet=True)
    assert timed_trainer.plan is not None and timed_trainer.plan.step_s > 0 and timed_trainer.plan.epochs == 2
    timed = timed_trainer.fit()
    assert plain["step"] == timed["step"] == 12
    assert losses(tmp_path / "plain") == losses(tmp_path / "timed")
    a, b = (read_checkpoint(tmp_path / r / "jepa-latest.pth.tar") for r in ("plain", "timed"))
    for key in ("encoder", "predictor", "target_encoder"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name}"
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for i, s in a["opt"]["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["opt"]["state"][i][k])), f"opt state {i}.{k}"


def test_a_tight_budget_trains_fewer_epochs_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(time_budget, "measure_step_seconds", lambda step, dataset: 1.0)  # 6 steps an epoch: ~6.9 s
    budget = 1.5 * 6 * time_budget.OVERHEAD  # one epoch fits, two do not
    cfg = load_config(None, [*TINY, "optimization.epochs=3", "optimization.warmup=2", f"optimization.time_budget_s={budget}"])
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    summary = trainer.fit()
    assert summary["status"] == "done" and summary["epochs"] == 1 and summary["step"] == 6
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optimization"]
    assert saved["epochs"] == 1 and saved["warmup"] == 1  # warmup clamped to the epochs left
    assert trainer.stepper.lr_sched.value(6) == pytest.approx(cfg["optimization"]["lr"])  # warmup ends at the (new) end of epoch 1
    err = capsys.readouterr().err
    assert "fastjepa: expected training time ~" in err and "1 of the configured 3 epochs x 6 steps at" in err
    assert f"optimization.time_budget_s={budget:g}" in err


def test_resume_keeps_the_chosen_epochs_without_measuring_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(time_budget, "measure_step_seconds", lambda step, dataset: 1.0)
    budget = 1.5 * 6 * time_budget.OVERHEAD
    args = [*TINY, "optimization.epochs=3", f"optimization.time_budget_s={budget}"]
    part = Trainer(load_config(None, [*args, "meta.max_steps=3"]), tmp_path / "run", quiet=True).fit()
    assert part["status"] == "max_steps"

    def no_measuring(step, dataset):
        raise AssertionError("a resumed run measured its step time again")

    monkeypatch.setattr(time_budget, "measure_step_seconds", no_measuring)
    capsys.readouterr()
    rest = Trainer(load_config(None, args), tmp_path / "run", resume=True, quiet=True).fit()
    assert rest["status"] == "done" and rest["epochs"] == 1 and rest["step"] == 6
    assert f"1 epoch(s), as chosen for optimization.time_budget_s={budget:g} when the run started" in capsys.readouterr().err

"""The trainer's Stopper alone: the NaN policy, the skip report, the stop vote and the
collapse decision, judged from a log step's Readout (no training)."""

import math

import pytest
import torch

from fastjepa.config import load_config
from fastjepa.distributed import DistInfo
from fastjepa.training.checkpointing import NonFiniteLoss
from fastjepa.training.logs import Readout, RunLog
from fastjepa.training.stopping import Stopper

from .._tiny import TINY


def _readout(losses, *, skipped=None, health=None, votes=None, start=0):
    pending = [dict(epoch=1, itr=start + i, step=start + i) for i in range(len(losses))]
    n = len(losses)
    return Readout(pending, list(losses), health or [None] * n, skipped or [False] * n, [None] * n, votes)


def _stopper(*overrides):
    said = []
    return Stopper(load_config(None, [*TINY, *overrides]), DistInfo(), said.append), said


def test_nan_policy_stop_raises_naming_the_first_non_finite_step():
    stopper, _ = _stopper("optimization.nan_policy=stop")
    assert stopper.judge(_readout([1.0, 0.9])) is False
    with pytest.raises(NonFiniteLoss, match=r"non-finite at step 5 \(epoch 1, iteration 5\)"):
        stopper.judge(_readout([1.0, math.nan, math.inf], start=4))


def test_nan_policy_skip_reports_each_skipped_step_and_goes_on():
    stopper, said = _stopper("optimization.nan_policy=skip")
    assert stopper.judge(_readout([1.0, math.nan, 0.8], skipped=[False, True, False], start=10)) is False
    assert len(said) == 1 and said[0].startswith("step 11: non-finite loss or gradients")


def test_a_signal_stops_one_process_and_a_vote_stops_every_rank():
    stopper, _ = _stopper()
    assert not stopper.stop_between_log_steps() and stopper.vote(torch.device("cpu")) is None
    stopper.signal = 15
    assert stopper.stop_between_log_steps() and stopper.judge(_readout([1.0])) is True
    other, _ = _stopper()  # a rank that received nothing stops when another rank voted
    assert other.judge(_readout([1.0], votes=1.0)) is True and other.judge(_readout([1.0], votes=0.0)) is False


@pytest.mark.parametrize("on_collapse", ["stop", "warn"])
def test_collapse_stops_only_with_on_collapse_stop(on_collapse):
    stopper, said = _stopper(f"meta.on_collapse={on_collapse}", "health.patience=2")
    rows = [{"target_rankme": r, "target_std": 1.0} for r in (10.0, 1.0, 1.0, 1.0)]
    stop = stopper.judge(_readout([1.0] * 4, health=rows))
    assert stop is (on_collapse == "stop") and (stopper.collapse_reason is not None) is stop
    assert len(said) == 1 and ("stopping" in said[0]) is stop


def test_the_log_reads_what_the_steps_left_in_one_readout(tmp_path):
    log = RunLog(tmp_path, load_config(None, TINY), DistInfo(), torch.device("cpu"))
    pending = [dict(epoch=1, itr=i, step=i, loss=torch.tensor(float(i)), skipped=torch.tensor(float(i == 1)),
                    grads=torch.arange(4.0) if i == 2 else None) for i in range(3)]  # fmt: skip
    r = log.read(pending)
    assert r.losses == [0.0, 1.0, 2.0] and r.skipped == [False, True, False] and r.votes is None
    assert r.grads == [None, None, (0.0, 1.0, 2.0, 3.0)] and r.health == [None] * 3

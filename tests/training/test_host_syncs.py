"""No host read inside a training step: between log steps the trainer leaves its losses,
skip flags, gradient norms and health metrics on the device, and each log step reads them
all at once.

On a GPU every tensor-to-host read (``.item()``, ``.tolist()``, ``bool()``, ``float()``,
``.cpu()``, ...) waits for the device's queue to drain. Here, on the CPU, a
``TorchFunctionMode`` records each such call together with the trainer method it came from;
``test_no_cuda_synchronisation_inside_a_step`` (at the end, ``gpu`` mark) checks the same on
CUDA with ``torch.cuda.set_sync_debug_mode``.
"""

import csv
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fastjepa.config import load_config
from fastjepa.health import HEALTH_COLUMNS
from fastjepa.training.trainer import Trainer

from .._tiny import TINY
from ._cuda import cuda_batch, cuda_trainer

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "cpu", "numpy", "__array__"}
# the batch is made on the host, by the loader and the mask collator: not device reads
HOST_SIDE = ("/fastjepa/masks/", "/fastjepa/data/", "/torch/utils/data/")


class HostReads(TorchFunctionMode):
    """Records ``(phase, step, call)`` for each tensor-to-host read made while active."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.phase, self.reads = trainer, "loop", []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS and not _called_from(HOST_SIDE):
            self.reads.append((self.phase, self.trainer.step, name))
        return func(*args, **(kwargs or {}))


def _called_from(parts) -> bool:
    f = sys._getframe(2)
    while f is not None:
        if any(p in f.f_code.co_filename.replace("\\", "/") for p in parts):
            return True
        f = f.f_back
    return False


def _phase(mode, name, fn, flushes=None):
    def wrapped(*a, **k):
        outer, mode.phase = mode.phase, name
        before = len(mode.reads)
        try:
            return fn(*a, **k)
        finally:
            mode.phase = outer
            if flushes is not None and a[0]:  # a flush with rows: how many reads it made
                flushes.append((mode.trainer.step, len(a[0]), len(mode.reads) - before))

    return wrapped


def run_counted(tmp_path, monkeypatch, *overrides, nan_at=None):
    """Train TINY for one epoch (6 iterations) with logging.log_freq=4, counting reads."""
    from fastjepa.ops import _validate

    # the ops check index ranges on the host for CPU tensors only (on CUDA: validate=True)
    monkeypatch.setattr(_validate, "check_range", lambda *a, **k: None)
    t = Trainer(load_config(None, [*TINY, "optimization.epochs=1", "logging.log_freq=4", *overrides]), tmp_path / "run", quiet=True)
    if nan_at is not None:
        forward, calls = t.model.forward, []

        def nan_forward(*a, **k):
            calls.append(1)
            loss = forward(*a, **k)
            return loss * float("nan") if len(calls) - 1 == nan_at else loss

        t.model.forward = nan_forward
    mode, flushes = HostReads(t), []
    t.stepper.step = _phase(mode, "step", t.stepper.step)
    t.log.read = _phase(mode, "flush", t.log.read, flushes)  # the log step's read of what the steps left
    t.log.write = _phase(mode, "flush", t.log.write)
    t.checkpointer.save = _phase(mode, "checkpoint", t.checkpointer.save)
    with mode:
        summary = t.fit()
    return t, summary, mode.reads, flushes


LOG_STEPS = [0, 4, 5]  # itr 0 and 4 (log_freq 4) and 5 (the epoch's last)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_no_host_read_between_log_steps_and_one_per_log_step(tmp_path, monkeypatch, policy):
    t, summary, reads, flushes = run_counted(tmp_path, monkeypatch, f"optimization.nan_policy={policy}")
    assert summary["status"] == "done" and summary["step"] == 6
    assert t.skip_on_device  # fastjepa's step: fused AdamW, no GradScaler
    assert [r for r in reads if r[0] in ("step", "loop")] == []  # nothing read in (or between) the steps
    # each log step: one read, of all the rows since the last one (flush runs after the step's counter moved on)
    assert [(step - 1, reads_made) for step, _, reads_made in flushes] == [(s, 1) for s in LOG_STEPS]
    assert sum(rows for _, rows, _ in flushes) == 6
    # ... and that one read carried the health metrics of each log step (RankMe, stds, cosine)
    with open(t.out / "log.csv", newline="") as f:
        logged = {int(r["step"]): r for r in csv.DictReader(f)}
    assert [s for s, r in logged.items() if r["target_rankme"]] == LOG_STEPS
    assert all(float(logged[s][k]) == float(logged[s][k]) for s in LOG_STEPS for k in HEALTH_COLUMNS)  # numbers, not NaN


def test_health_off_reads_the_same_once_per_log_step(tmp_path, monkeypatch):
    _, _, reads, flushes = run_counted(tmp_path, monkeypatch, "health.enabled=false")
    assert [r for r in reads if r[0] in ("step", "loop")] == [] and [n for _, _, n in flushes] == [1, 1, 1]


def test_the_counter_sees_a_read_in_the_health_metrics(tmp_path, monkeypatch):
    """The health tensors are made inside the step: a host read there would be counted."""
    from fastjepa import health

    spread = health.spread
    monkeypatch.setattr(health, "spread", lambda x: (float(spread(x)), spread(x))[1])
    _, _, reads, _ = run_counted(tmp_path, monkeypatch)
    assert {(phase, step) for phase, step, name in reads if name == "__float__"} == {("step", s) for s in LOG_STEPS}


def test_a_skipped_step_is_decided_on_the_device_and_reported_at_the_log_step(tmp_path, monkeypatch, capsys):
    """nan_policy=skip, a NaN loss at step 2 (not a log step): still no read in the step; the
    log step that follows says which step was skipped, and the run ends with finite weights."""
    t, summary, reads, flushes = run_counted(tmp_path, monkeypatch, "optimization.nan_policy=skip", nan_at=2)
    assert [r for r in reads if r[0] in ("step", "loop")] == []
    assert all(n == 1 for _, _, n in flushes)
    err = capsys.readouterr().err
    assert err.count("non-finite loss or gradients") == 1 and "step 2: non-finite loss or gradients" in err
    assert summary["status"] == "done" and all(torch.isfinite(p).all() for p in t.model.parameters())


def test_a_non_finite_loss_stops_at_the_next_log_step_naming_its_step(tmp_path, monkeypatch):
    """nan_policy=stop, NaN at step 2: the log step at 4 reads it and names step 2."""
    from fastjepa.training.checkpointing import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match=r"non-finite at step 2 \(epoch 1, iteration 2\)"):
        run_counted(tmp_path, monkeypatch, nan_at=2)


def test_the_counter_sees_a_read_in_the_step(tmp_path, monkeypatch):
    """The counting above can fail: a float() of a gradient norm inside the step is seen."""
    t = Trainer(load_config(None, [*TINY, "logging.log_freq=4", "meta.max_steps=2"]), tmp_path / "run", quiet=True)
    stats = t.stepper.grad_stats
    t.stepper.grad_stats = lambda: (float(stats()[0]), stats())[1]  # the old one-read-per-norm habit
    mode = HostReads(t)
    t.stepper.step = _phase(mode, "step", t.stepper.step)
    with mode:
        t.fit()
    assert ("step", 0, "__float__") in mode.reads


# -- on CUDA: the same, with torch.cuda.set_sync_debug_mode


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_no_cuda_synchronisation_inside_a_step(tmp_path, policy):
    """fastjepa's step (bf16, fused AdamW, nan_policy stop or skip) runs under
    ``set_sync_debug_mode("error")``: any host sync inside it — a read of a loss, a flag or a
    gradient norm — would raise. The log step's gradient norms stay on the device too."""
    t = cuda_trainer(tmp_path, f"optimization.nan_policy={policy}")
    assert t.device == torch.device("cuda", 0) and t.amp_dtype is torch.bfloat16 and t.skip_on_device
    batch = cuda_batch(t)  # one batch throughout: Triton compiles (and any autotuning runs) in the warm-up only
    for i in range(2):
        t.stepper.step(*batch, index=i, want_grads=True)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):  # the mode is on: a host read raises
            torch.ones(1, device=t.device).item()
        outs = []
        for i in range(3):
            outs.append(t.stepper.step(*batch, index=2 + i, want_grads=i == 2))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(torch.stack([r.loss for r in outs])).all()
    grads = outs[-1].grads
    assert grads is not None and grads.device == t.device and torch.isfinite(grads).all()
    if policy == "skip":
        assert outs[-1].skipped.item() == 0.0

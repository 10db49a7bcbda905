"""When a run stops: :class:`Stopper`, a part of :class:`fastjepa.training.trainer.Trainer`.

It owns the stop decisions of the loop: SIGTERM/SIGINT, ``optimization.nan_policy``, the
collapse detector (``meta.on_collapse``) and, under torchrun, the agreement of every rank
(a vote that rides on the log step's one all-reduce: see :meth:`RunLog.read`).
"""

from __future__ import annotations

import math
import os
import signal
import sys

import torch

from ..distributed import DistInfo
from ..health import CollapseDetector
from ..models.ijepa import local_shard
from .checkpointing import NonFiniteLoss
from .logs import Readout


class StopRequested(Exception):
    """The loop stops after the current step (a signal, the collapse detector, a step limit)."""


class Stopper:
    """``cfg``: the run's resolved config; ``say`` prints a line (rank 0's console)."""

    def __init__(self, cfg: dict, dist: DistInfo, say, *, detector_state: dict | None = None):
        self.dist, self.say = dist, say
        self.nan_policy = cfg["optimization"]["nan_policy"]
        self.on_collapse = cfg["meta"]["on_collapse"]
        hc = cfg["health"]
        self.collapse = CollapseDetector(hc["rankme_fraction"], hc["std_floor"], hc["patience"], detector_state)
        self.collapse_reason: str | None = None  # set when the detector stops the run
        self.signal: int | None = None  # the signal this process received
        self._previous: dict = {}

    def restore_detector(self, state: dict) -> None:
        """Go on with a resumed run's collapse history."""
        hc_args = (self.collapse.rankme_fraction, self.collapse.std_floor, self.collapse.patience)
        self.collapse = CollapseDetector(*hc_args, state)

    # signals

    def install(self) -> None:
        """Catch SIGTERM and SIGINT: the first asks for a stop after this step, the second exits at once."""

        def handler(signum, frame):
            if self.signal is not None:  # second signal: leave now
                print(f"\nfastjepa: second {signal.Signals(signum).name}, exiting immediately", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self.signal = signum
            print(
                f"\nfastjepa: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
                "(send it again to exit at once)",
                file=sys.stderr,
                flush=True,
            )

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, handler)

    def uninstall(self) -> None:
        for sig, h in self._previous.items():
            signal.signal(sig, h)
        self._previous = {}

    def stop_between_log_steps(self) -> bool:
        """One process stops after the step a signal came in; under torchrun the ranks agree
        at the next log step (:meth:`vote`)."""
        return self.signal is not None and not self.dist.enabled

    def vote(self, device: torch.device) -> torch.Tensor | None:
        """This rank's stop vote for the log step's all-reduce (None: one process, nothing to agree on)."""
        if not self.dist.enabled:
            return None
        return torch.full((1,), 0.0 if self.signal is None else 1.0, dtype=torch.float64, device=device)

    # the log step

    def judge(self, r: Readout) -> bool:
        """Decide after a log step's read: raise :class:`NonFiniteLoss` at the first non-finite
        loss (of any rank; ``nan_policy=stop``), say which steps ``nan_policy=skip`` skipped,
        feed the collapse detector. True when a rank was asked to stop, or the detector stops
        the run (``meta.on_collapse=stop``). It judges the all-reduced values, so every rank
        decides alike."""
        if self.nan_policy == "stop":
            # the mean over ranks is non-finite iff some rank's loss is: every rank stops here, at the same step
            bad = next((p for p, v in zip(r.pending, r.losses) if not math.isfinite(v)), None)
            if bad is not None:
                raise NonFiniteLoss(
                    f"the loss became non-finite at step {bad['step']} (epoch {bad['epoch']}, iteration {bad['itr']})"
                )
        for p, v, sk in zip(r.pending, r.losses, r.skipped):
            if sk:
                self.say(f"step {p['step']}: non-finite loss or gradients (mean loss over ranks {v}), skipped the update "
                         "(optimization.nan_policy=skip)")  # fmt: skip
        stop = r.votes > 0 if r.votes is not None else self.signal is not None
        return self._watch_health(r) or stop

    def _watch_health(self, r: Readout) -> bool:
        """True when the detector fired and ``meta.on_collapse=stop``."""
        stop = False
        for p, hr in zip(r.pending, r.health):
            if hr is None:
                continue
            warning = self.collapse.update(p["step"], hr["target_rankme"], hr["target_std"])
            if warning is None:
                continue
            if self.on_collapse == "stop":
                self.collapse_reason = warning
                stop = True
                self.say(f"fastjepa: {warning} — stopping (meta.on_collapse=stop)")
            else:
                self.say(f"fastjepa: {warning} (meta.on_collapse=stop would stop here)")
        return stop


def check_ranks_agree(model: torch.nn.Module, dist: DistInfo, say, *, fsdp: bool = False) -> None:
    """Every rank must hold the same weights after data-parallel training."""
    import torch.distributed as tdist

    params = [local_shard(p.detach().float()) for p in model.parameters()]
    digest = torch.stack([p.double().sum() for p in params] + [p.double().abs().sum() for p in params])
    gathered = [torch.zeros_like(digest) for _ in range(dist.world_size)]
    tdist.all_gather(gathered, digest)
    if fsdp:  # shards differ by design; the gathered full weights are checked at save time
        say(f"fastjepa: FSDP2 run finished on {dist.world_size} ranks")
        return
    if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("data-parallel ranks ended with different weights: this is a bug, please report it")
    say(f"fastjepa: parameters identical across {dist.world_size} ranks")

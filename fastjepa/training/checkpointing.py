"""Checkpoints, resume and fault handling: signals, non-finite losses, ranks that disagree."""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

import torch

from ..architecture import check_same_architecture
from ..checkpoint import (
    CheckpointError,
    check_checkpoint,
    check_resume_state,
    fsync_dir,
    keep_as,
    keep_as_copy,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    save_states,
)
from ..distributed import any_rank
from ..health import CollapseDetector
from ..rng import rng_state, set_rng_state


class NonFiniteLoss(RuntimeError):
    pass


class StopRequested(Exception):
    """A signal asked the run to stop after the current step."""


class FaultHandling:
    """Checkpoints and resume, signals and the all-ranks checks of :class:`fastjepa.trainer.Trainer`."""

    def _resume(self) -> None:
        meta = self.cfg["meta"]
        path = Path(meta["read_checkpoint"]) if meta["read_checkpoint"] else self.latest
        if not path.is_absolute() and not path.exists():
            path = self.out / path
        if path == self.latest and not path.exists() and self.prev.is_file():
            # a crash between the two renames of a checkpoint write on a file system without hard links
            self._say(f"fastjepa: {self.latest.name} is missing; resuming from {self.prev.name}")
            path = self.prev
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path} (train into {self.out} first, or set meta.read_checkpoint)")
        ckpt = read_checkpoint(path, trust=self.trust_checkpoint)
        # everything is checked before anything is used: counters and RNG states, the
        # architecture the run was trained with, then every tensor against its destination
        extra = check_resume_state(path, ckpt, epochs=self.cfg["optimization"]["epochs"], ipe=self.ipe)
        if isinstance(extra.get("config"), dict):
            check_same_architecture(path, extra["config"], self.cfg)
        if self.fsdp:
            from ..fsdp import load_full_state

            check_checkpoint(path, ckpt, self.model, self.optimizer)
            try:
                load_full_state(self.model, self.optimizer, ckpt)
            except (RuntimeError, KeyError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CheckpointError(f"checkpoint {path} does not fit this model (FSDP2 resume): {type(exc).__name__}: {first}") from exc
        else:
            restore_checkpoint(path, ckpt, self.model, self.optimizer, self.scaler)
        self.epoch = int(ckpt["epoch"])
        self.next_itr = int(extra.get("next_itr", 0))
        self._check_same_batches(path, ckpt)
        self.step = int(extra.get("step", self.epoch * self.ipe + self.next_itr))
        self.images_seen = int(extra.get("images_seen", 0))
        loss = ckpt.get("loss")
        if isinstance(loss, float) and loss == loss:
            self.last_loss = loss  # an epoch resumed after its last step reports the loss it ended with
        if "health" in extra:  # the detector's history and the best checkpoint's score go on
            state = extra["health"]
            hc = self.cfg["health"]
            self.collapse = CollapseDetector(hc["rankme_fraction"], hc["std_floor"], hc["patience"], state["detector"])
            self.best_rankme = float(state["best_rankme"])
        if "rng" in extra:
            set_rng_state(extra["rng"])
            # mid-epoch, the uninterrupted run made this epoch's loader iterator before the
            # checkpoint (it draws the DataLoader's base seed from the global RNG): set the
            # state again once the resumed run has made its own (see fit)
            self._rng_after_loader = extra["rng"] if self.next_itr > 0 else None
        self.collator.set_reference_counter(self.step)  # mask.compat=reference: its counter, one batch a step
        self.resumed_from = path
        self._say(f"resumed from {path}: epoch {self.epoch}, iteration {self.next_itr}, step {self.step}")

    def _check_same_batches(self, path: Path, ckpt: dict) -> None:
        """A checkpoint written mid-epoch counts that epoch's progress in batches of its own
        size: resumed with another global batch, the rest of the epoch would repeat or skip
        images and the step counter would outrun the schedules. Refused with one line."""
        if self.next_itr == 0:
            return
        then = (ckpt.get("batch_size"), ckpt.get("world_size", 1))
        now = (self.cfg["data"]["batch_size"], self.dist.world_size)
        if then[0] is not None and (int(then[0]) * int(then[1] or 1)) != now[0] * now[1]:
            raise CheckpointError(
                f"checkpoint {path} stopped mid-epoch (iteration {self.next_itr}) with data.batch_size={then[0]} on "
                f"{then[1]} process(es); this run has data.batch_size={now[0]} on {now[1]}: resume with the same global "
                "batch, or from a checkpoint written at the end of an epoch"
            )

    def _checkpoint(self, *, epoch: int, next_itr: int, extra_name: str | None = None) -> Path | None:
        # never write non-finite weights over a good checkpoint (a finite loss can still
        # come with an inf gradient, e.g. on the last step of an epoch)
        if not self._finite_on_every_rank(list(self.model.parameters())):
            raise NonFiniteLoss(
                f"the weights became non-finite by step {self.step}; not writing them over {self.latest}"
                + (" (the last good checkpoint)" if self.latest.exists() else "")
            )
        states = None
        if self.fsdp:  # gathering the full state is a collective: every rank takes part
            from ..fsdp import full_state

            states = full_state(self.model, self.optimizer)
        if not self.dist.is_main:
            return None
        extra = {
            "step": self.step,
            "next_itr": next_itr,
            "images_seen": self.images_seen,
            "rng": rng_state(),
            "config": self.cfg,
            "health": {"detector": self.collapse.state(), "best_rankme": self._best_score(epoch_end=next_itr == 0),
                       "rankme": self.last_rankme},
        }  # fmt: skip
        kwargs = dict(
            epoch=epoch,
            loss=self.last_loss,
            batch_size=self.cfg["data"]["batch_size"],
            world_size=self.dist.world_size,
            lr=self.lr_sched.value(max(self.step, 1)),
            extra=extra,
        )
        # keep the last two: latest -> prev only once the new file is complete on disk
        def save(path: Path) -> None:
            if states is not None:
                save_states(path, states, self.scaler, **kwargs)
            else:
                save_checkpoint(path, self.model, self.optimizer, self.scaler, **kwargs)

        tmp = self.out / f".{self.tag}-next.pth.tar"
        save(tmp)
        if self.latest.exists():
            keep_as(self.latest, self.prev)  # latest stays in place until the new one replaces it
        os.replace(tmp, self.latest)
        fsync_dir(self.out)
        if extra_name:
            save(self.out / extra_name)
        if extra["health"]["best_rankme"] > self.best_rankme:
            self.best_rankme = extra["health"]["best_rankme"]
            keep_as_copy(self.latest, self.best, save)
            self._say(f"fastjepa: {self.best.name} is epoch {epoch} (target RankMe {self.best_rankme:.2f}, the highest so far)")
        return self.latest

    def _best_score(self, *, epoch_end: bool) -> float:
        """The score of <tag>-best.pth.tar: the target RankMe of the epoch's last log step
        (every epoch's last iteration is one), for an epoch-end checkpoint; the best so far
        otherwise (a mid-epoch stop is never kept as best)."""
        if (
            epoch_end
            and self.cfg["health"]["keep_best"]
            and self.cfg["health"]["enabled"]
            and math.isfinite(self.last_rankme)
            and self.last_rankme > self.best_rankme
        ):
            return self.last_rankme
        return self.best_rankme

    def _finite_on_every_rank(self, tensors: list[torch.Tensor]) -> bool:
        """True on every rank iff every element of ``tensors`` is finite on every rank (FSDP2
        shards are checked locally; one host sync, plus one all-reduce under torchrun)."""
        if self.fsdp:
            from ..fsdp import local

            tensors = local(tensors)
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        if self.dist.enabled:
            finite = not any_rank(not finite, self.dist, self.device)
        return finite

    def _remove_partial_writes(self) -> None:
        """Delete what a killed checkpoint write left: ``.<tag>-next.pth.tar``, the
        ``.*.tmp`` files of atomic_save and ``.*.link`` files, all of this run's tag."""
        for p in self.out.glob(f".*{self.tag}-*"):
            if p.is_file() and (p.name == f".{self.tag}-next.pth.tar" or p.name.endswith((".tmp", ".link"))):
                p.unlink()
                self._say(f"fastjepa: removed {p.name}, left by an interrupted checkpoint write")

    def _install_signals(self):
        previous = {}

        def handler(signum, frame):
            if self.stop_signal is not None:  # second signal: leave now
                print(f"\nfastjepa: second {signal.Signals(signum).name}, exiting immediately", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self.stop_signal = signum
            print(
                f"\nfastjepa: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
                "(send it again to exit at once)",
                file=sys.stderr,
                flush=True,
            )

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _check_ranks_agree(self) -> None:
        """Every rank must hold the same weights after data-parallel training."""
        import torch.distributed as dist

        from ..fsdp import local

        params = local([p.detach().float() for p in self.model.parameters()])
        digest = torch.stack([p.double().sum() for p in params] + [p.double().abs().sum() for p in params])
        gathered = [torch.zeros_like(digest) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, digest)
        if self.fsdp:  # shards differ by design; the gathered full weights are checked at save time
            self._say(f"fastjepa: FSDP2 run finished on {self.dist.world_size} ranks")
            return
        if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError("data-parallel ranks ended with different weights: this is a bug, please report it")
        self._say(f"fastjepa: parameters identical across {self.dist.world_size} ranks")

"""Checkpoints and resume: :class:`Checkpointer`, a part of :class:`fastjepa.training.trainer.Trainer`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
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
)
from ..distributed import DistInfo
from ..rng import rng_state
from .step import finite_on_every_rank


class NonFiniteLoss(RuntimeError):
    """The loss (``optimization.nan_policy=stop``) or the weights became non-finite."""


@dataclass
class Resumed:
    """What a checkpoint gives back to resume a run: where it was (``path``), its counters,
    the loss it ended with (None where it has none), the collapse detector's state (None
    where the checkpoint has none) and the RNG states (None where it has none)."""

    path: Path
    epoch: int
    next_itr: int
    step: int
    images_seen: int
    loss: float | None
    detector: dict | None
    rng: dict | None


class Checkpointer:
    """A run's checkpoints in ``out``: ``<tag>-latest.pth.tar`` (written atomically; the one
    before kept as ``<tag>-prev.pth.tar``), periodic ``<tag>-ep<N>.pth.tar`` files, and
    ``<tag>-best.pth.tar``: the epoch checkpoint with the highest target RankMe (with
    ``keep_best``). Every rank calls :meth:`save` (its checks and an FSDP2 gather are
    collectives); rank 0 writes. ``say`` prints a line (rank 0's console)."""

    def __init__(
        self,
        out: Path,
        tag: str,
        *,
        dist: DistInfo,
        device: torch.device,
        say,
        fsdp: bool = False,
        keep_best: bool = False,
        trust: bool = False,
    ):
        self.out, self.tag, self.dist, self.device, self.say = Path(out), tag, dist, device, say
        self.fsdp, self.keep_best, self.trust = fsdp, keep_best, trust
        self.latest = self.out / f"{tag}-latest.pth.tar"
        self.prev = self.out / f"{tag}-prev.pth.tar"
        self.best = self.out / f"{tag}-best.pth.tar"
        self.best_rankme = float("-inf")  # the score of <tag>-best.pth.tar

    def resume(self, model, optimizer, scaler, *, cfg: dict, ipe: int, path: str | os.PathLike | None = None) -> Resumed:
        """Load a checkpoint (``path``, relative to ``out`` where it is not found as given; by
        default ``<tag>-latest.pth.tar``, or ``-prev`` where a crash left no latest) into
        ``model``, ``optimizer`` and ``scaler``, everything checked first; returns its counters."""
        path = Path(path) if path else self.latest
        if not path.is_absolute() and not path.exists():
            path = self.out / path
        if path == self.latest and not path.exists() and self.prev.is_file():
            # a crash between the two renames of a checkpoint write on a file system without hard links
            self.say(f"fastjepa: {self.latest.name} is missing; resuming from {self.prev.name}")
            path = self.prev
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path} (train into {self.out} first, or set meta.read_checkpoint)")
        ckpt = read_checkpoint(path, trust=self.trust)
        # everything is checked before anything is used: counters and RNG states, the
        # architecture the run was trained with, then every tensor against its destination
        extra = check_resume_state(path, ckpt, epochs=cfg["optimization"]["epochs"], ipe=ipe)
        if isinstance(extra.get("config"), dict):
            check_same_architecture(path, extra["config"], cfg)
        if self.fsdp:
            from ..fsdp import load_full_state

            check_checkpoint(path, ckpt, model, optimizer)
            try:
                load_full_state(model, optimizer, ckpt)
            except (RuntimeError, KeyError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CheckpointError(f"checkpoint {path} does not fit this model (FSDP2 resume): {type(exc).__name__}: {first}") from exc
        else:
            restore_checkpoint(path, ckpt, model, optimizer, scaler)
        epoch = int(ckpt["epoch"])
        next_itr = int(extra.get("next_itr", 0))
        self._check_same_batches(path, ckpt, next_itr, cfg["data"]["batch_size"])
        loss = ckpt.get("loss")
        detector = None
        if "health" in extra:  # the detector's history and the best checkpoint's score go on
            detector = extra["health"]["detector"]
            self.best_rankme = float(extra["health"]["best_rankme"])
        return Resumed(
            path=path,
            epoch=epoch,
            next_itr=next_itr,
            step=int(extra.get("step", epoch * ipe + next_itr)),
            images_seen=int(extra.get("images_seen", 0)),
            loss=loss if isinstance(loss, float) and loss == loss else None,
            detector=detector,
            rng=extra.get("rng"),
        )

    def _check_same_batches(self, path: Path, ckpt: dict, next_itr: int, batch_size: int) -> None:
        """A checkpoint written mid-epoch counts that epoch's progress in batches of its own
        size: resumed with another global batch, the rest of the epoch would repeat or skip
        images and the step counter would outrun the schedules. Refused with one line."""
        if next_itr == 0:
            return
        then = (ckpt.get("batch_size"), ckpt.get("world_size", 1))
        now = (batch_size, self.dist.world_size)
        if then[0] is not None and (int(then[0]) * int(then[1] or 1)) != now[0] * now[1]:
            raise CheckpointError(
                f"checkpoint {path} stopped mid-epoch (iteration {next_itr}) with data.batch_size={then[0]} on "
                f"{then[1]} process(es); this run has data.batch_size={now[0]} on {now[1]}: resume with the same global "
                "batch, or from a checkpoint written at the end of an epoch"
            )

    def save(
        self,
        model,
        optimizer,
        scaler,
        *,
        cfg: dict,
        epoch: int,
        next_itr: int,
        step: int,
        images_seen: int,
        loss: float,
        lr: float,
        detector: dict,
        rankme: float,
        extra_name: str | None = None,
    ) -> Path | None:
        """Write ``<tag>-latest.pth.tar`` (and ``extra_name`` in ``out``, and ``-best`` where an
        epoch ends with the highest target RankMe ``rankme`` so far) with the run's counters,
        RNG states, config and the collapse ``detector``'s state. Raises
        :class:`NonFiniteLoss` rather than write non-finite weights. Returns the latest path
        on rank 0, None elsewhere."""
        # never write non-finite weights over a good checkpoint (a finite loss can still
        # come with an inf gradient, e.g. on the last step of an epoch)
        if not finite_on_every_rank(list(model.parameters()), self.dist, self.device, fsdp=self.fsdp):
            raise NonFiniteLoss(
                f"the weights became non-finite by step {step}; not writing them over {self.latest}"
                + (" (the last good checkpoint)" if self.latest.exists() else "")
            )
        states = None
        if self.fsdp:  # gathering the full state is a collective: every rank takes part
            from ..fsdp import full_state

            states = full_state(model, optimizer)
        if not self.dist.is_main:
            return None
        extra = {
            "step": step,
            "next_itr": next_itr,
            "images_seen": images_seen,
            "rng": rng_state(),
            "config": cfg,
            "health": {"detector": detector, "best_rankme": self._best_score(rankme, epoch_end=next_itr == 0), "rankme": rankme},
        }
        kwargs = dict(
            epoch=epoch,
            loss=loss,
            batch_size=cfg["data"]["batch_size"],
            world_size=self.dist.world_size,
            lr=lr,
            extra=extra,
        )

        # keep the last two: latest -> prev only once the new file is complete on disk
        def save(path: Path) -> None:
            if states is not None:
                save_checkpoint(path, states, None, scaler, **kwargs)
            else:
                save_checkpoint(path, model, optimizer, scaler, **kwargs)

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
            self.say(f"fastjepa: {self.best.name} is epoch {epoch} (target RankMe {self.best_rankme:.3f}, the highest so far)")
        return self.latest

    def _best_score(self, rankme: float, *, epoch_end: bool) -> float:
        """The score of <tag>-best.pth.tar: the target RankMe of the epoch's last log step
        (every epoch's last iteration is one), for an epoch-end checkpoint; the best so far
        otherwise (a mid-epoch stop is never kept as best)."""
        if epoch_end and self.keep_best and math.isfinite(rankme) and rankme > self.best_rankme:
            return rankme
        return self.best_rankme

    def remove_partial_writes(self) -> None:
        """Delete what a killed checkpoint write left: ``.<tag>-next.pth.tar``, the
        ``.*.tmp`` files of atomic_save and ``.*.link`` files, all of this run's tag."""
        for p in self.out.glob(f".*{self.tag}-*"):
            if p.is_file() and (p.name == f".{self.tag}-next.pth.tar" or p.name.endswith((".tmp", ".link"))):
                p.unlink()
                self.say(f"fastjepa: removed {p.name}, left by an interrupted checkpoint write")

"""The I-JEPA training loop (docs/design.md §5): ``Trainer(cfg, output).fit()``.

The loop is here; it has its parts, from :mod:`fastjepa.training`: a
:class:`~fastjepa.training.step.Step` (the optimizer step), a
:class:`~fastjepa.training.checkpointing.Checkpointer`, a
:class:`~fastjepa.training.stopping.Stopper` (signals, NaN policy, collapse, cross-rank
agreement), a :class:`~fastjepa.training.logs.RunLog` and the time budget's plan.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..architecture import check_model_fits
from ..build import build_model, pick_device
from ..config import dump_config
from ..data import build_dataset, loader_options
from ..distributed import DistInfo, ResumableSampler, any_rank, ddp_device_kwargs, rank_device
from ..masks import MaskCollator
from ..rng import seed_everything, set_rng_state
from . import time_budget
from .checkpointing import Checkpointer, NonFiniteLoss
from .logs import RunLog
from .optim import autocast_dtype, make_optimizer
from .runfolder import RunFolderError, RunLock, claim
from .step import Step
from .stopping import Stopper, StopRequested, check_ranks_agree

__all__ = ["Trainer"]


class Trainer:
    """One run: ``Trainer(cfg, output).fit()``. See ``python -m fastjepa.train --help``."""

    def __init__(
        self,
        cfg: dict,
        output: str | os.PathLike,
        *,
        resume: bool = False,
        quiet: bool = False,
        dist: DistInfo | None = None,
        trust_checkpoint: bool = False,
        overwrite: bool = False,
    ):
        """``trust_checkpoint``: resume even from a checkpoint that needs more than a
        weights-only load (it may run code; see :func:`fastjepa.checkpoint.read_checkpoint`).
        ``overwrite``: a fresh run may replace the checkpoints of another run in ``output``
        (else refused: :mod:`fastjepa.training.runfolder`)."""
        self.cfg, self.out = cfg, Path(output)
        self.trust_checkpoint = trust_checkpoint
        self.dist = dist or DistInfo()
        self.quiet = quiet or not sys.stderr.isatty()
        meta, data, opt = cfg["meta"], cfg["data"], cfg["optimization"]
        kind = pick_device(meta["device"]).type
        # the one device of this process (cuda:LOCAL_RANK), current before anything is built on it
        self.device = rank_device(kind, self.dist.local_rank, torch.cuda.device_count() if kind == "cuda" else None)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # Triton launches and FSDP2 use the current device
        self.reference_step = meta["reference_step"]  # the reference computation (not the ops backend, mask.compat or EMA mode)
        self.fsdp = bool(meta["fsdp"] and self.dist.enabled)
        self.tag = cfg["logging"]["write_tag"]
        self.log = RunLog(self.out, cfg, self.dist, self.device, quiet=self.quiet)
        hc = cfg["health"]
        self.checkpointer = Checkpointer(
            self.out, self.tag, dist=self.dist, device=self.device, say=self.log.say, fsdp=self.fsdp,
            keep_best=bool(hc["keep_best"] and hc["enabled"]), trust=trust_checkpoint,
        )  # fmt: skip
        self.latest, self.prev, self.best = self.checkpointer.latest, self.checkpointer.prev, self.checkpointer.best
        self.resume, self.overwrite = resume, overwrite
        self._lock: RunLock | None = None
        self._claim_output(hold=False)  # refuse a busy or occupied folder before building anything
        self.stopper = Stopper(cfg, self.dist, self.log.say)
        self.last_rankme = float("nan")  # the last log step's target RankMe (mean over ranks)

        check_model_fits(cfg, training=True)  # before anything is allocated
        seed_everything(meta["seed"])
        self.model = build_model(cfg).to(self.device)
        if meta["activation_checkpointing"]:
            self.model.encoder.grad_checkpointing = self.model.predictor.grad_checkpointing = True
        if meta["compile"]:
            for blocks in (self.model.encoder.blocks, self.model.predictor.predictor_blocks, self.model.target_encoder.blocks):
                for blk in blocks:
                    blk.compile()
        self._wrap_distributed()  # before the optimizer: FSDP2 replaces the parameters with sharded ones
        self.optimizer = make_optimizer(self.model, self.device, self.reference_step)
        self.amp_dtype = autocast_dtype(meta["use_bfloat16"], self.device, self.reference_step)
        # bf16 needs no loss scaling; the reference runs a GradScaler anyway (kept for its step).
        self.scaler = torch.amp.GradScaler("cuda") if (self.amp_dtype is not None and self.reference_step) else None

        # data
        self.dataset = build_dataset(data, split="train", device=self.device)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(0, seed=meta["seed"])
        self.sampler = ResumableSampler(len(self.dataset), data["batch_size"], self.dist, seed=meta["seed"])
        self.collator = MaskCollator.from_config(cfg, rank=self.dist.rank, world_size=self.dist.world_size)
        self.ipe = self.sampler.batches_per_epoch
        self.stepper = Step(
            self.model, self.optimizer, cfg, ipe=self.ipe, device=self.device, dist=self.dist, dataset=self.dataset,
            amp_dtype=self.amp_dtype, scaler=self.scaler, reference_step=self.reference_step, fsdp=self.fsdp,
        )  # fmt: skip

        self.epoch, self.next_itr, self.step = 0, 0, 0
        self.last_loss = float("nan")
        self._rng_after_loader = None
        self.images_seen = 0
        # optimization.time_budget_s: fewer epochs where steps are slow
        self.plan = time_budget.plan(
            cfg, self.out, self.ipe, lambda: time_budget.measure_step_seconds(self.stepper, self.dataset), resume=resume
        )
        if self.plan is not None and self.plan.steps is not None:  # not one epoch fits: a step count in epoch 1
            opt["warmup"] = opt["warmup"] * self.plan.steps / (self.ipe * opt["epochs"])  # the same share of the run
            opt["epochs"], opt["budget_steps"] = 1, self.plan.steps  # config.yaml records the choice
            self.stepper.build_schedules()
        elif self.plan is not None and self.plan.epochs != opt["epochs"]:
            opt["epochs"] = self.plan.epochs  # the resolved config (config.yaml) records the choice
            opt["warmup"] = min(opt["warmup"], self.plan.epochs * opt["ipe_scale"])
            self.stepper.build_schedules()
        if resume:
            self._resume()

    @property
    def skip_on_device(self) -> bool:
        """``nan_policy=skip`` is decided on the device (fused AdamW, no GradScaler)."""
        return self.stepper.skip_on_device

    @property
    def best_rankme(self) -> float:
        """The target RankMe of ``<tag>-best.pth.tar`` (-inf: none yet)."""
        return self.checkpointer.best_rankme

    @property
    def collapse_reason(self) -> str | None:
        """What the collapse detector said when it stopped the run (None: it did not)."""
        return self.stopper.collapse_reason

    def _resume(self) -> None:
        meta = self.cfg["meta"]
        r = self.checkpointer.resume(self.model, self.optimizer, self.scaler, cfg=self.cfg, ipe=self.ipe, path=meta["read_checkpoint"])
        self.epoch, self.next_itr, self.step, self.images_seen = r.epoch, r.next_itr, r.step, r.images_seen
        if r.loss is not None:
            self.last_loss = r.loss  # an epoch resumed after its last step reports the loss it ended with
        if r.detector is not None:  # the detector's history goes on
            self.stopper.restore_detector(r.detector)
        if r.rng is not None:
            set_rng_state(r.rng)
            # mid-epoch, the uninterrupted run made this epoch's loader iterator before the
            # checkpoint (it draws the DataLoader's base seed from the global RNG): set the
            # state again once the resumed run has made its own (see fit)
            self._rng_after_loader = r.rng if self.next_itr > 0 else None
        self.collator.set_reference_counter(self.step)  # mask.compat=reference: its counter, one batch a step
        self.resumed_from = r.path
        self.log.say(f"resumed from {r.path}: epoch {self.epoch}, iteration {self.next_itr}, step {self.step}")

    def _save(self, *, next_itr: int, extra_name: str | None = None) -> None:
        self.checkpointer.save(
            self.model, self.optimizer, self.scaler, cfg=self.cfg, epoch=self.epoch, next_itr=next_itr, step=self.step,
            images_seen=self.images_seen, loss=self.last_loss, lr=self.stepper.lr_sched.value(max(self.step, 1)),
            detector=self.stopper.collapse.state(), rankme=self.last_rankme, extra_name=extra_name,
        )  # fmt: skip

    def _log_step(self, pending: list[dict], ips: float, elapsed: float) -> bool:
        """Log the steps in ``pending`` (one host read), let the stopper judge them; True:
        stop after this step (every rank alike)."""
        if not pending:
            return self.stopper.stop_between_log_steps()
        r = self.log.read(pending, self.stopper.vote(self.device))  # under torchrun: the stop agreement rides on it
        stop = self.stopper.judge(r)
        self.last_loss = r.losses[-1]
        rankmes = [h["target_rankme"] for h in r.health if h is not None]
        if rankmes:
            self.last_rankme = rankmes[-1]  # the best checkpoint's score
        self.log.write(r, ips, elapsed)
        return stop

    def _claim_output(self, *, hold: bool) -> None:
        """Rank 0 checks (and with ``hold`` locks) the output folder; under torchrun every
        rank learns its answer, so a refusal stops all of them with rank 0's one line."""
        error = None
        if self.dist.is_main:
            try:
                self._lock = claim(self.out, self.tag, resume=self.resume, overwrite=self.overwrite, hold=hold, say=self.log.say)
            except RunFolderError as exc:
                error = exc
        agree = self.dist.enabled and torch.distributed.is_available() and torch.distributed.is_initialized()
        if agree and any_rank(error is not None, self.dist, self.device) and error is None:
            error = RunFolderError(f"rank 0 refused the output folder {self.out}")
        if error is not None:
            raise error

    def _release_output(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _wrap_distributed(self) -> None:
        if not self.dist.enabled:
            return
        if self.cfg["meta"]["fsdp"]:
            from ..fsdp import shard_ijepa

            shard_ijepa(self.model, self.device)
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        kwargs = ddp_device_kwargs(self.device)  # cuda:LOCAL_RANK: device_ids=[LOCAL_RANK], output_device=LOCAL_RANK
        self.model.encoder = DDP(self.model.encoder, **kwargs)
        self.model.predictor = DDP(self.model.predictor, **kwargs)

    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, self.next_itr)
        self.collator.set_epoch(self.epoch, self.next_itr)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        data = self.cfg["data"]
        return DataLoader(
            self.dataset,
            batch_size=data["batch_size"],
            sampler=self.sampler,
            collate_fn=self.collator,
            drop_last=True,
            **loader_options(data, self.dataset, self.device),
        )

    def fit(self) -> dict:
        """Train; the output folder is locked while it runs. Returns the run's summary."""
        self._claim_output(hold=True)  # held until fit returns: one run at a time in this folder
        try:
            return self._fit()
        finally:
            self._release_output()

    def _fit(self) -> dict:
        cfg = self.cfg
        log_freq, epochs = cfg["logging"]["log_freq"], cfg["optimization"]["epochs"]
        max_steps = cfg["meta"]["max_steps"]
        if self.dist.is_main:
            self.checkpointer.remove_partial_writes()
        self.log.open_scalars()  # first: "wandb is not installed" before any file is written
        if self.dist.is_main:
            dump_config(cfg, self.out / "config.yaml")
        self.log.open_csv(self.step)
        self.stopper.install()
        eff = cfg["data"]["batch_size"] * self.dist.world_size
        self.log.say(
            f"fastjepa: {cfg['meta']['model_name']} on {self.device} ({self.dist.world_size} process(es)), "
            f"{len(self.dataset)} images, {self.ipe} iterations/epoch, batch {cfg['data']['batch_size']} per process "
            f"(effective {eff}), output {self.out}"
        )
        if self.plan is not None:
            self.log.say(self.plan.describe())
        t_start = time.perf_counter()
        pending: list[dict] = []
        status, stopped_by = "done", None
        cut = cfg["optimization"]["budget_steps"]
        want_health = cfg["health"]["enabled"]
        try:
            while self.epoch < epochs and (cut is None or self.step < cut):
                loader = self._loader()
                self.log.open_bar(epoch=self.epoch + 1, epochs=epochs, total=self.ipe, initial=self.next_itr)
                t_last, n_since = time.perf_counter(), 0
                batches = iter(loader)
                if self._rng_after_loader is not None:
                    set_rng_state(self._rng_after_loader)
                    self._rng_after_loader = None
                for itr, (udata, masks_enc, masks_pred) in enumerate(batches, start=self.next_itr):
                    t0 = time.perf_counter()
                    imgs, masks_enc, masks_pred = self.stepper.to_device(udata, masks_enc, masks_pred)
                    log_now = (itr % log_freq == 0) or itr == self.ipe - 1
                    with self.stepper.backend():
                        r = self.stepper.step(
                            imgs, masks_enc, masks_pred, index=self.step, want_grads=log_now, want_health=log_now and want_health
                        )
                    pending.append(
                        dict(epoch=self.epoch + 1, itr=itr, step=self.step, loss=r.loss, lr=r.lr, wd=r.wd, momentum=r.momentum,
                             mask_enc=masks_enc[0].size(1), mask_pred=masks_pred[0].size(1), t0=t0, grads=r.grads,
                             skipped=r.skipped, health=r.health)
                    )  # fmt: skip
                    self.step += 1
                    self.next_itr = itr + 1
                    self.images_seen += imgs.size(0) * self.dist.world_size
                    n_since += imgs.size(0) * self.dist.world_size
                    # no host read between log steps: the losses, skip flags and gradient norms
                    # wait on the device, and the log step reads them all at once
                    stop = False
                    if log_now:
                        now = time.perf_counter()
                        ips = n_since / max(now - t_last, 1e-9)
                        stop = self._log_step(pending, ips, now - t_last)  # under torchrun: the stop agreement
                        pending, t_last, n_since = [], now, 0
                    else:
                        stop = self.stopper.stop_between_log_steps()  # one process: nothing to agree on, stop after this step
                    self.log.advance_bar()
                    at_max = max_steps is not None and self.step >= max_steps
                    if stop or at_max or (cut is not None and self.step >= cut):
                        self._log_step(pending, float("nan"), 0.0)
                        pending = []
                        stopped_by = ("collapse" if self.collapse_reason else "signal") if stop else "max_steps" if at_max else "budget"
                        raise StopRequested
                self._log_step(pending, float("nan"), 0.0)
                pending = []
                self.log.close_bar()
                self.epoch += 1
                self.next_itr = 0
                freq = cfg["logging"]["checkpoint_freq"]
                periodic = f"{self.tag}-ep{self.epoch}.pth.tar" if (self.epoch % freq == 0 or self.epoch == epochs) else None
                self._save(next_itr=0, extra_name=periodic)
                skipped = getattr(self.dataset, "num_skipped", 0)
                self.log.say(
                    f"epoch {self.epoch}/{epochs} done: loss {self.last_loss:.4f}, {self.images_seen} images seen"
                    + (f", {skipped} unreadable image(s) skipped so far" if skipped else "")
                )
        except StopRequested:
            self._save(next_itr=self.next_itr)
            status = {"signal": "interrupted", "max_steps": "max_steps", "budget": "done", "collapse": "collapsed"}[stopped_by]
            if stopped_by == "budget":
                self.log.say(f"fastjepa: time budget: stopped after {self.next_itr} of {self.ipe} steps of epoch {self.epoch + 1} "
                             f"(optimization.budget_steps={cut})")  # fmt: skip
        except NonFiniteLoss as exc:
            status = "non_finite"
            raise NonFiniteLoss(
                f"{exc}; stopping. The last good checkpoint is {self.latest if self.latest.exists() else 'none (no epoch finished)'}"
                " — resume from it with --resume, perhaps with a lower optimization.lr, or set optimization.nan_policy=skip"
            ) from None
        finally:
            self.stopper.uninstall()
            self.log.close()
        if self.dist.enabled:
            check_ranks_agree(self.model, self.dist, self.log.say, fsdp=self.fsdp)
        wall = time.perf_counter() - t_start
        summary = {
            "status": status,
            "epochs": self.epoch,
            "step": self.step,
            "images_seen": self.images_seen,
            "wall_time_s": wall,
            "final_loss": self.last_loss,
            "output": str(self.out),
            "checkpoint": str(self.latest),
            "best_checkpoint": str(self.best) if self.best.is_file() else None,
            "best_rankme": self.best_rankme if self.best.is_file() else None,
            "collapse": self.collapse_reason,
            "csv": str(self.out / "log.csv"),
        }
        if status == "interrupted":
            # under torchrun only one rank may have received the signal; the others stopped with it
            signame = signal.Signals(self.stopper.signal).name if self.stopper.signal is not None else "a signal to another rank"
            self.log.say(f"fastjepa: stopped by {signame} at step {self.step}; checkpoint {self.latest}; continue with --resume")
        return summary

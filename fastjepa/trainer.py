"""The I-JEPA training loop (docs/design.md §5): build, step, log, checkpoint, resume, stop cleanly."""

from __future__ import annotations

import csv
import inspect
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from . import models, time_budget
from .checkpoint import (
    CheckpointError,
    fsync_dir,
    keep_as,
    load_checkpoint,
    numpy_rng_from_plain,
    numpy_rng_to_plain,
    read_checkpoint,
    save_checkpoint,
    save_states,
)
from .config import ConfigError, dump_config
from .data import batch_to_device, build_dataset, loader_options
from .distributed import DistInfo, ResumableSampler, all_reduce_sum, any_rank, ddp_device_kwargs, rank_device
from .ijepa import IJEPA
from .masks import MaskCollator
from .ops import use_attention, use_backend
from .ops._dispatch import cpu_has_bf16
from .schedulers import CosineWD, LinearMomentum, WarmupCosineLR

CSV_COLUMNS = (
    "epoch", "itr", "step", "loss", "lr", "wd", "momentum", "imgs_per_sec",
    "mask_enc", "mask_pred", "ms_per_itr", "mem_gb", "grad_first", "grad_last",
)  # fmt: skip


class NonFiniteLoss(RuntimeError):
    pass


class StopRequested(Exception):
    """A signal asked the run to stop after the current step."""


# -- construction


def pick_device(name: str, setting: str = "meta.device={}") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` as a device; ``cuda`` with none visible is a
    :class:`ConfigError` naming ``setting`` (how the caller's user spells it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = f" (this torch, {torch.__version__}, is a CPU build)" if torch.version.cuda is None else ""
        raise ConfigError(
            f"{setting.format('cuda')}, but no CUDA device is visible here{why}: "
            f"set {setting.format('cpu')} (or {setting.format('auto')})"
        )
    return torch.device(name)


def build_model(cfg: dict) -> IJEPA:
    meta, data, mask = cfg["meta"], cfg["data"], cfg["mask"]
    factory = getattr(models, meta["model_name"])
    allowed = set(inspect.signature(models.VisionTransformer).parameters) - {"kwargs", "img_size", "patch_size"}
    unknown = sorted(set(meta["model_kwargs"]) - allowed)
    if unknown:
        raise ConfigError(f"meta.model_kwargs: unknown key(s) {unknown}; expected some of {sorted(allowed)} (YAML needs 'key: value' with a space)")
    try:
        encoder = factory(patch_size=mask["patch_size"], img_size=data["crop_size"], **meta["model_kwargs"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"meta.model_kwargs={meta['model_kwargs']}: {exc}") from None
    heads = meta["pred_num_heads"] or encoder.num_heads
    if meta["pred_emb_dim"] % heads != 0:
        raise ConfigError(
            f"meta.pred_emb_dim={meta['pred_emb_dim']} is not divisible by the predictor's {heads} heads "
            f"({'meta.pred_num_heads' if meta['pred_num_heads'] else 'the encoder' + chr(39) + 's, as the reference'}); "
            "change meta.pred_emb_dim or set meta.pred_num_heads"
        )
    predictor = models.vit_predictor(
        num_patches=encoder.patch_embed.num_patches,
        embed_dim=encoder.embed_dim,
        predictor_embed_dim=meta["pred_emb_dim"],
        depth=meta["pred_depth"],
        num_heads=heads,
    )
    return IJEPA(encoder, predictor)


def param_groups(model: IJEPA) -> list[dict]:
    """The reference's four groups: encoder / predictor × (decayed, no-decay biases & 1-D)."""

    def split(module: nn.Module):
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim == 1 or name.endswith("bias") else decay).append(p)
        return decay, no_decay

    enc_d, enc_n = split(model.encoder)
    pred_d, pred_n = split(model.predictor)
    return [
        {"params": enc_d},
        {"params": pred_d},
        {"params": enc_n, "WD_exclude": True, "weight_decay": 0.0},
        {"params": pred_n, "WD_exclude": True, "weight_decay": 0.0},
    ]


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # torch >= 2.4 has a fused AdamW kernel for both


def make_optimizer(model: IJEPA, device: torch.device, reference: bool) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. fastjepa: the fused kernel (one pass over each
    parameter) on CUDA and on the CPU — on the CPU ``foreach`` is a per-tensor loop, 3-4x
    slower than fused for vit_tiny's 6 M parameters (measured) —, ``foreach`` elsewhere.
    The reference step: the per-parameter loop, as the reference code gets by default."""
    kwargs: dict[str, Any] = {}
    if not reference:
        kwargs = {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {"foreach": True}
    return torch.optim.AdamW(param_groups(model), **kwargs)


def autocast_dtype(use_bfloat16: bool, device: torch.device, reference: bool) -> torch.dtype | None:
    """bf16 autocast on CUDA (docs/design.md §5), and on CPUs with bf16 matrix units — where it pays
    (measured 1.4-1.5x on AVX512-BF16) — except for the reference step, which runs fp32 off
    CUDA as the reference code does. None: fp32."""
    if not use_bfloat16:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and not reference and cpu_has_bf16():
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states of Python, NumPy and torch (and CUDA), in types a
    weights-only load accepts (NumPy's key as a tensor; Python's state is a tuple of ints)."""
    state = {"python": random.getstate(), "numpy": numpy_rng_to_plain(np.random.get_state()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(numpy_rng_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the trainer


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
    ):
        """``trust_checkpoint``: resume even from a checkpoint that needs more than a
        weights-only load (it may run code; see :func:`fastjepa.checkpoint.read_checkpoint`)."""
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
        self.reference = meta["reference_step"]
        self.fsdp = bool(meta["fsdp"] and self.dist.enabled)
        self.tag = cfg["logging"]["write_tag"]
        self.latest = self.out / f"{self.tag}-latest.pth.tar"
        self.prev = self.out / f"{self.tag}-prev.pth.tar"

        seed_everything(meta["seed"])
        self.model = build_model(cfg).to(self.device)
        if meta["activation_checkpointing"]:
            self.model.encoder.grad_checkpointing = self.model.predictor.grad_checkpointing = True
        if meta["compile"]:
            for blocks in (self.model.encoder.blocks, self.model.predictor.predictor_blocks, self.model.target_encoder.blocks):
                for blk in blocks:
                    blk.compile()
        self._wrap_distributed()  # before the optimizer: FSDP2 replaces the parameters with sharded ones
        self.optimizer = make_optimizer(self.model, self.device, self.reference)
        self.amp_dtype = autocast_dtype(meta["use_bfloat16"], self.device, self.reference)
        # bf16 needs no loss scaling; the reference runs a GradScaler anyway (kept for its step).
        self.scaler = torch.amp.GradScaler("cuda") if (self.amp_dtype is not None and self.reference) else None
        # nan_policy=skip decided on the device: the fused AdamW skips its update (and its
        # step count) where its found_inf flag is set, the EMA lerps with weight 0 — no host
        # read. The reference step (per-parameter AdamW, GradScaler) decides on the host.
        self.skip_on_device = self.scaler is None and bool(self.optimizer.defaults.get("fused"))
        self.last_skipped: torch.Tensor | None = None  # the last step's skip flag (1.0: skipped), on the device

        # data
        self.dataset = build_dataset(data, split="train", device=self.device)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(0, seed=meta["seed"])
        self.sampler = ResumableSampler(len(self.dataset), data["batch_size"], self.dist, seed=meta["seed"])
        self.collator = MaskCollator.from_config(cfg, rank=self.dist.rank, world_size=self.dist.world_size)
        self.ipe = self.sampler.batches_per_epoch
        self._build_schedules()

        self.epoch, self.next_itr, self.step = 0, 0, 0
        self.last_loss = float("nan")
        self.stop_signal: int | None = None
        self._rng_after_loader = None
        nan_at = os.environ.get("FASTJEPA_TEST_NAN_AT")  # "RANK:STEP": a NaN loss there (fault tests in subprocesses)
        self._nan_at = tuple(int(v) for v in nan_at.split(":")) if nan_at else None
        self.images_seen = 0
        self.plan = time_budget.plan(self, resume=resume)  # optimization.time_budget_s: fewer epochs where steps are slow
        if self.plan is not None and self.plan.epochs != opt["epochs"]:
            opt["epochs"] = self.plan.epochs  # the resolved config (config.yaml) records the choice
            opt["warmup"] = min(opt["warmup"], self.plan.epochs * opt["ipe_scale"])
            self._build_schedules()
        if resume:
            self._resume()

    def _build_schedules(self) -> None:
        opt = self.cfg["optimization"]
        total = int(opt["epochs"] * self.ipe * opt["ipe_scale"])
        warmup = int(opt["warmup"] * self.ipe)
        self.lr_sched = WarmupCosineLR(opt["start_lr"], opt["lr"], opt["final_lr"], warmup, total)
        self.wd_sched = CosineWD(opt["weight_decay"], opt["final_weight_decay"], total)
        self.mom_sched = LinearMomentum(opt["ema"][0], opt["ema"][1], total)

    # -- setup helpers

    def _wrap_distributed(self) -> None:
        if not self.dist.enabled:
            return
        if self.cfg["meta"]["fsdp"]:
            from .fsdp import shard_ijepa

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
        if self.fsdp:
            from .fsdp import load_full_state

            ckpt = read_checkpoint(path, trust=self.trust_checkpoint)
            try:
                load_full_state(self.model, self.optimizer, ckpt)
            except (RuntimeError, KeyError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CheckpointError(f"checkpoint {path} does not fit this model (FSDP2 resume): {type(exc).__name__}: {first}") from exc
        else:
            ckpt = load_checkpoint(path, self.model, self.optimizer, self.scaler, trust=self.trust_checkpoint)
        extra = ckpt.get("fastjepa", {})
        self.epoch = int(ckpt["epoch"])
        self.next_itr = int(extra.get("next_itr", 0))
        self.step = int(extra.get("step", self.epoch * self.ipe + self.next_itr))
        self.images_seen = int(extra.get("images_seen", 0))
        if "rng" in extra:
            set_rng_state(extra["rng"])
            # mid-epoch, the uninterrupted run made this epoch's loader iterator before the
            # checkpoint (it draws the DataLoader's base seed from the global RNG): set the
            # state again once the resumed run has made its own (see fit)
            self._rng_after_loader = extra["rng"] if self.next_itr > 0 else None
        self.collator.set_reference_counter(self.step)  # mask.compat=reference: its counter, one batch a step
        self.resumed_from = path
        self._say(f"resumed from {path}: epoch {self.epoch}, iteration {self.next_itr}, step {self.step}")

    # -- output

    def _say(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    _bar = None

    def _open_csv(self):
        path = self.out / "log.csv"
        rows = []
        if path.is_file():  # keep only rows up to the resumed step (a crash may have logged past it)
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) < self.step]
        f = open(path, "w", newline="")
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
        f.flush()
        return f, writer

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
            from .fsdp import full_state

            states = full_state(self.model, self.optimizer)
        if not self.dist.is_main:
            return None
        extra = {
            "step": self.step,
            "next_itr": next_itr,
            "images_seen": self.images_seen,
            "rng": rng_state(),
            "config": self.cfg,
        }
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
        return self.latest

    def _finite_on_every_rank(self, tensors: list[torch.Tensor]) -> bool:
        """True on every rank iff every element of ``tensors`` is finite on every rank (FSDP2
        shards are checked locally; one host sync, plus one all-reduce under torchrun)."""
        if self.fsdp:
            from .fsdp import local

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

    # -- signals

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

    # -- the step

    def _set_schedules(self) -> tuple[float, float, float]:
        lr = self.lr_sched.value(self.step + 1)
        wd = self.wd_sched.value(self.step + 1)
        mom = self.mom_sched.value(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if not group.get("WD_exclude", False):
                group["weight_decay"] = wd
        return lr, wd, mom

    def _batch_to_device(self, udata, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor]):
        """A collated batch on this process's device (asynchronous from pinned memory); uint8
        image crops are finished there (float, normalise, flip: data.batch_to_device)."""
        imgs = batch_to_device(udata, self.device, self.dataset)
        masks_enc = [m.to(self.device, non_blocking=True) for m in masks_enc]
        masks_pred = [m.to(self.device, non_blocking=True) for m in masks_pred]
        return imgs, masks_enc, masks_pred

    def _backend_context(self):
        if self.reference:
            return _Both(use_backend("reference"), use_attention("math"))
        return nullcontext()

    def train_step(self, imgs: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor], want_grads: bool = False):
        """One optimizer step over ``grad_accum`` micro-batches. Returns (loss tensor, grad
        stats tensor or None, (lr, wd, momentum)); the skip flag of ``nan_policy=skip`` is
        left in ``self.last_skipped``. On the device, with no host sync (the reference step
        excepted: its GradScaler and its skip decision read on the host, as the reference)."""
        accum = self.cfg["optimization"]["grad_accum"]
        lr, wd, mom = self._set_schedules()
        B = imgs.size(0)
        micro = B // accum
        total = torch.zeros((), device=self.device)
        for a in range(accum):
            sl = slice(a * micro, (a + 1) * micro)
            sync = nullcontext()
            if self.fsdp:
                for net in (self.model.encoder, self.model.predictor):
                    net.set_requires_gradient_sync(a == accum - 1)
            elif accum > 1 and a < accum - 1 and self.dist.enabled:
                sync = _Both(self.model.encoder.no_sync(), self.model.predictor.no_sync())
            with sync, torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                loss = self.model(imgs[sl], [m[sl] for m in masks_enc], [m[sl] for m in masks_pred]) / accum
                if self._nan_at == (self.dist.rank, self.step):  # fault-test hook (FASTJEPA_TEST_NAN_AT)
                    loss = loss * float("nan")
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach().float()
        skip_flag, skip_now = None, False
        if self.cfg["optimization"]["nan_policy"] == "skip":
            # a non-finite loss, or a finite one with non-finite gradients; under DDP/FSDP all
            # ranks skip together (one rank's flag is all-reduced to all)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if self.skip_on_device:
                skip_flag = self._non_finite_flag([total, *grads])
            else:  # one host sync per step
                skip_now = not self._finite_on_every_rank([total, *grads])
                skip_flag = torch.full((), float(skip_now), device=self.device)
        self.last_skipped = skip_flag
        grads = self._grad_stats() if want_grads and not skip_now else None
        clip = self.cfg["optimization"]["clip_grad"]
        if not skip_now:
            if self.scaler is not None:
                if clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                if clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                device_skip = skip_flag is not None and self.skip_on_device
                if device_skip:  # read by the fused AdamW on the device (as GradScaler passes it)
                    self.optimizer.found_inf = skip_flag
                try:
                    self.optimizer.step()
                finally:
                    if device_skip:
                        del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        if not skip_now:
            self.model.update_target(mom, mode="reference" if self.reference else "foreach", skip=skip_flag if self.skip_on_device else None)
        return total, grads, (lr, wd, mom)

    def _non_finite_flag(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """A one-element fp32 tensor on the device: 1.0 if any element of ``tensors`` is
        non-finite on any rank, else 0.0 — computed without a host sync (one multi-tensor
        check per dtype, plus a one-element all-reduce under torchrun)."""
        if self.fsdp:
            from .fsdp import local

            tensors = local(tensors)
        found = torch.zeros((), dtype=torch.float32, device=self.device)
        one = torch.ones((), dtype=torch.float32, device=self.device)
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            if t.numel():
                groups.setdefault((t.device, t.dtype), []).append(t.reshape(-1) if t.dim() == 0 else t)
        for group in groups.values():
            # GradScaler's check: sets found to 1 at any inf/NaN; the "unscale" by 1 leaves values as they are
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return found

    def _grad_stats(self) -> torch.Tensor | None:
        """(first qkv, last qkv, min, max) gradient norms over the encoder's weight matrices,
        as the reference's grad_stats line: a (4,) fp32 tensor on the device (no host read;
        the log step reads it with the losses). Under FSDP2 the norms of the full gradients,
        from the shards' squared norms summed over ranks (one all-reduce)."""
        names, grads = [], []
        for name, p in self.model.encoder.named_parameters():
            if p.grad is None or name.endswith(".bias") or p.ndim == 1:
                continue
            names.append(name)
            grads.append(p.grad.detach())
        if not grads:
            return None
        if self.fsdp:
            from .fsdp import local

            squares = torch.stack(torch._foreach_norm(local(grads))).float().square()
            norms = all_reduce_sum(squares, self.dist).sqrt()
        else:
            norms = torch.stack(torch._foreach_norm(grads)).float()
        qkv = [i for i, n in enumerate(names) if "qkv" in n]
        nan = torch.full((), float("nan"), device=norms.device)
        first, last = (norms[qkv[0]], norms[qkv[-1]]) if qkv else (nan, nan)
        return torch.stack([first, last, norms.min(), norms.max()])

    # -- the loop

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        log_freq, epochs = cfg["logging"]["log_freq"], cfg["optimization"]["epochs"]
        max_steps = cfg["meta"]["max_steps"]
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._remove_partial_writes()
        tb = _TensorBoard(self.out, cfg) if self.dist.is_main else None  # first: "wandb is not installed" before any file is written
        if self.dist.is_main:
            dump_config(cfg, self.out / "config.yaml")
        csv_file, writer = self._open_csv() if self.dist.is_main else (None, None)
        previous = self._install_signals()
        eff = cfg["data"]["batch_size"] * self.dist.world_size
        self._say(
            f"fastjepa: {cfg['meta']['model_name']} on {self.device} ({self.dist.world_size} process(es)), "
            f"{len(self.dataset)} images, {self.ipe} iterations/epoch, batch {cfg['data']['batch_size']} per process "
            f"(effective {eff}), output {self.out}"
        )
        if self.plan is not None:
            self._say(self.plan.describe())
        t_start = time.perf_counter()
        pending: list[dict] = []
        status, stopped_by = "done", None
        try:
            while self.epoch < epochs:
                loader = self._loader()
                self._bar = tqdm(
                    total=self.ipe,
                    initial=self.next_itr,
                    desc=f"epoch {self.epoch + 1}/{epochs}",
                    disable=self.quiet or not self.dist.is_main,
                    dynamic_ncols=True,
                    leave=False,
                )
                t_last, n_since = time.perf_counter(), 0
                batches = iter(loader)
                if self._rng_after_loader is not None:
                    set_rng_state(self._rng_after_loader)
                    self._rng_after_loader = None
                for itr, (udata, masks_enc, masks_pred) in enumerate(batches, start=self.next_itr):
                    t0 = time.perf_counter()
                    imgs, masks_enc, masks_pred = self._batch_to_device(udata, masks_enc, masks_pred)
                    log_now = (itr % log_freq == 0) or itr == self.ipe - 1
                    with self._backend_context():
                        loss, grads, (lr, wd, mom) = self.train_step(imgs, masks_enc, masks_pred, want_grads=log_now)
                    pending.append(
                        dict(epoch=self.epoch + 1, itr=itr, step=self.step, loss=loss, lr=lr, wd=wd, momentum=mom,
                             mask_enc=masks_enc[0].size(1), mask_pred=masks_pred[0].size(1), t0=t0, grads=grads,
                             skipped=self.last_skipped)
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
                        stop = self._flush(pending, writer, csv_file, tb, ips, now - t_last)  # under torchrun: the stop agreement
                        pending, t_last, n_since = [], now, 0
                    elif not self.dist.enabled:
                        stop = self.stop_signal is not None  # one process: nothing to agree on, stop after this step
                    self._bar.update(1)
                    if stop or (max_steps is not None and self.step >= max_steps):
                        self._flush(pending, writer, csv_file, tb, float("nan"), 0.0)
                        pending = []
                        stopped_by = "signal" if stop else "max_steps"
                        raise StopRequested
                self._flush(pending, writer, csv_file, tb, float("nan"), 0.0)
                pending = []
                self._bar.close()
                self._bar = None
                self.epoch += 1
                self.next_itr = 0
                freq = cfg["logging"]["checkpoint_freq"]
                periodic = f"{self.tag}-ep{self.epoch}.pth.tar" if (self.epoch % freq == 0 or self.epoch == epochs) else None
                self._checkpoint(epoch=self.epoch, next_itr=0, extra_name=periodic)
                skipped = getattr(self.dataset, "num_skipped", 0)
                self._say(
                    f"epoch {self.epoch}/{epochs} done: loss {self.last_loss:.4f}, {self.images_seen} images seen"
                    + (f", {skipped} unreadable image(s) skipped so far" if skipped else "")
                )
        except StopRequested:
            self._checkpoint(epoch=self.epoch, next_itr=self.next_itr)
            status = "interrupted" if stopped_by == "signal" else "max_steps"
        except NonFiniteLoss as exc:
            status = "non_finite"
            raise NonFiniteLoss(
                f"{exc}; stopping. The last good checkpoint is {self.latest if self.latest.exists() else 'none (no epoch finished)'}"
                " — resume from it with --resume, perhaps with a lower optimization.lr, or set optimization.nan_policy=skip"
            ) from None
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            for sig, h in previous.items():
                signal.signal(sig, h)
            if csv_file is not None:
                csv_file.close()
            if tb is not None:
                tb.close()
        if self.dist.enabled:
            self._check_ranks_agree()
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
            "csv": str(self.out / "log.csv"),
        }
        if status == "interrupted":
            # under torchrun only one rank may have received the signal; the others stopped with it
            signame = signal.Signals(self.stop_signal).name if self.stop_signal is not None else "a signal to another rank"
            self._say(f"fastjepa: stopped by {signame} at step {self.step}; checkpoint {self.latest}; continue with --resume")
        return summary

    def _check_ranks_agree(self) -> None:
        """Every rank must hold the same weights after data-parallel training."""
        import torch.distributed as dist

        from .fsdp import local

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

    def _flush(self, pending: list[dict], writer, csv_file, tb, ips: float, elapsed: float) -> bool:
        """Log the steps in ``pending`` after one host read of everything they left on the
        device: the losses (their mean over ranks), the skip flags, the gradient norms — and,
        under torchrun, whether any rank was asked to stop, which rides on the same
        all-reduce. Raises :class:`NonFiniteLoss` at the first non-finite loss (of any rank;
        ``nan_policy=stop``) before logging it. Returns True when a rank was asked to stop.
        Every rank calls it at the same steps (it holds a collective under torchrun)."""
        if not pending:
            return self.stop_signal is not None and not self.dist.enabled
        n = len(pending)
        losses = torch.stack([p["loss"].reshape(()) for p in pending]).double()  # float64: a sum over ranks cannot overflow
        if self.dist.enabled:
            stop_flag = torch.full((1,), 0.0 if self.stop_signal is None else 1.0, dtype=torch.float64, device=losses.device)
            reduced = all_reduce_sum(torch.cat([losses, stop_flag]), self.dist)
        else:
            reduced = losses
        skips = [p["skipped"].reshape(1) for p in pending if p["skipped"] is not None]
        grads = [p["grads"].reshape(4) for p in pending if p["grads"] is not None]
        parts = [reduced, *(torch.cat(t).double() for t in (skips, grads) if t)]
        values = torch.cat(parts).tolist()  # the one host read
        world = self.dist.world_size
        loss_values = [v / world for v in values[:n]]
        stop = values[n] > 0 if self.dist.enabled else self.stop_signal is not None
        rest = values[n + int(self.dist.enabled) :]
        skipped = [p["skipped"] is not None and rest.pop(0) > 0 for p in pending] if skips else [False] * n
        grad_rows = [tuple(rest.pop(0) for _ in range(4)) if p["grads"] is not None else None for p in pending]
        if self.cfg["optimization"]["nan_policy"] == "stop":
            # the mean over ranks is non-finite iff some rank's loss is: every rank stops here, at the same step
            bad = next((p for p, v in zip(pending, loss_values) if not math.isfinite(v)), None)
            if bad is not None:
                raise NonFiniteLoss(f"the loss became non-finite at step {bad['step']} (epoch {bad['epoch']}, iteration {bad['itr']})")
        for p, v, sk in zip(pending, loss_values, skipped):
            if sk:
                self._say(f"step {p['step']}: non-finite loss or gradients (mean loss over ranks {v}), skipped the update "
                          "(optimization.nan_policy=skip)")  # fmt: skip
        self.last_loss = loss_values[-1]
        if not self.dist.is_main:
            return stop
        ms = 1000.0 * elapsed / n if elapsed > 0 else float("nan")
        mem = self._mem_gb()
        for p, v, g in zip(pending, loss_values, grad_rows):
            g = g or (float("nan"),) * 4
            row = dict(epoch=p["epoch"], itr=p["itr"], step=p["step"], loss=f"{v:.6f}", lr=f"{p['lr']:.6e}", wd=f"{p['wd']:.6e}",
                       momentum=f"{p['momentum']:.6f}", imgs_per_sec=f"{ips:.2f}", mask_enc=p["mask_enc"], mask_pred=p["mask_pred"],
                       ms_per_itr=f"{ms:.2f}", mem_gb=f"{mem:.3f}", grad_first=f"{g[0]:.3e}", grad_last=f"{g[1]:.3e}")  # fmt: skip
            writer.writerow(row)
            if tb is not None:
                tb.log(p["step"], loss=v, lr=p["lr"], wd=p["wd"], momentum=p["momentum"], imgs_per_sec=ips, mask_enc=p["mask_enc"],
                       mask_pred=p["mask_pred"], mem_gb=mem)  # fmt: skip
        csv_file.flush()
        last = pending[-1]
        if math.isfinite(ips):
            self._say(
                "[%d, %5d] loss: %.3f masks: %.1f %.1f [wd: %.2e] [lr: %.2e] [mem: %.2e] (%.1f ms)"  # noqa: UP031 — the reference's format
                % (last["epoch"], last["itr"], sum(loss_values) / n, last["mask_enc"], last["mask_pred"], last["wd"], last["lr"],
                   mem * 1024, ms)  # fmt: skip
            )
            if grad_rows[-1] is not None:
                self._say("[%d, %5d] grad_stats: [%.2e %.2e] (%.2e, %.2e)" % (last["epoch"], last["itr"], *grad_rows[-1]))  # noqa: UP031
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{loss_values[-1]:.4f}", img_s=f"{ips:.0f}")
        return stop

    def _mem_gb(self) -> float:
        """Peak memory allocated on this process's GPU, GiB (0 off CUDA)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0


class _Both:
    """Enter two context managers as one."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __enter__(self):
        self.a.__enter__()
        self.b.__enter__()

    def __exit__(self, *exc):
        self.b.__exit__(*exc)
        return self.a.__exit__(*exc)


class _TensorBoard:
    """TensorBoard scalars when tensorboard is installed and ``logging.tensorboard``; W&B
    when installed and ``logging.wandb``. Silent no-op otherwise."""

    def __init__(self, out: Path, cfg: dict):
        self.tb = self.wandb = None
        if cfg["logging"]["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None
        if cfg["logging"]["wandb"]:
            try:
                import wandb
            except ImportError as exc:
                raise ConfigError("logging.wandb=true, but wandb is not installed: pip install 'fastjepa[wandb]'") from exc
            self.wandb = wandb.init(project=cfg["logging"]["wandb_project"], config=cfg, dir=str(out))

    def log(self, step: int, **values) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

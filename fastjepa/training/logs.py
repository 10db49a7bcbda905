"""What a run says and records: console lines, ``log.csv``, TensorBoard and W&B scalars."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import torch

from .. import health
from ..config import ConfigError
from ..distributed import all_reduce_sum
from .checkpointing import NonFiniteLoss

CSV_COLUMNS = (
    "epoch", "itr", "step", "loss", "lr", "wd", "momentum", "imgs_per_sec",
    "mask_enc", "mask_pred", "ms_per_itr", "mem_gb", "grad_first", "grad_last",
    *health.HEALTH_COLUMNS,  # at log steps; empty between them
)  # fmt: skip
NH = len(health.HEALTH_COLUMNS)


class RunLog:
    """The console, the CSV and the scalar loggers of :class:`fastjepa.trainer.Trainer`."""

    _bar = None  # the epoch's progress bar while one is shown

    def _say(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

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

    def _flush(self, pending: list[dict], writer, csv_file, tb, ips: float, elapsed: float) -> bool:
        """Log the steps in ``pending`` after one host read of everything they left on the
        device: the losses and the health metrics (their means over ranks), the skip flags,
        the gradient norms — and, under torchrun, whether any rank was asked to stop, which
        rides on the same all-reduce. Raises :class:`NonFiniteLoss` at the first non-finite
        loss (of any rank; ``nan_policy=stop``) before logging it. Returns True when a rank
        was asked to stop, or the collapse detector stops the run (``meta.on_collapse=stop``;
        it judges the all-reduced values, so every rank decides alike). Every rank calls it
        at the same steps (it holds a collective under torchrun)."""
        if not pending:
            return self.stop_signal is not None and not self.dist.enabled
        n = len(pending)
        losses = torch.stack([p["loss"].reshape(()) for p in pending]).double()  # float64: a sum over ranks cannot overflow
        # the RankMe SVDs run here, just before the read (on CUDA an SVD waits for the device
        # itself; here that is the wait the read below makes anyway)
        healths = [self._health_row(p["health"]) for p in pending if p.get("health") is not None]
        nh = len(healths) * NH
        if healths:
            losses = torch.cat([losses, *healths])
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
        health_values = [v / world for v in values[n : n + nh]]
        health_rows = [dict(zip(health.HEALTH_COLUMNS, (health_values.pop(0) for _ in range(NH)))) if p.get("health") is not None else None
                       for p in pending]  # fmt: skip
        stop = values[n + nh] > 0 if self.dist.enabled else self.stop_signal is not None
        rest = values[n + nh + int(self.dist.enabled) :]
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
        stop = self._watch_health(pending, health_rows) or stop
        if not self.dist.is_main:
            return stop
        ms = 1000.0 * elapsed / n if elapsed > 0 else float("nan")
        mem = self._mem_gb()
        for p, v, g, hr in zip(pending, loss_values, grad_rows, health_rows):
            g = g or (float("nan"),) * 4
            row = dict(epoch=p["epoch"], itr=p["itr"], step=p["step"], loss=f"{v:.6f}", lr=f"{p['lr']:.6e}", wd=f"{p['wd']:.6e}",
                       momentum=f"{p['momentum']:.6f}", imgs_per_sec=f"{ips:.2f}", mask_enc=p["mask_enc"], mask_pred=p["mask_pred"],
                       ms_per_itr=f"{ms:.2f}", mem_gb=f"{mem:.3f}", grad_first=f"{g[0]:.3e}", grad_last=f"{g[1]:.3e}")  # fmt: skip
            if hr is not None:
                row.update({k: f"{x:.6g}" for k, x in hr.items()})
            writer.writerow(row)
            if tb is not None:
                tb.log(p["step"], loss=v, lr=p["lr"], wd=p["wd"], momentum=p["momentum"], imgs_per_sec=ips, mask_enc=p["mask_enc"],
                       mask_pred=p["mask_pred"], mem_gb=mem, **(hr or {}))  # fmt: skip
        csv_file.flush()
        last, hl = pending[-1], health_rows[-1]
        if math.isfinite(ips):
            field = f" [rankme: {hl['target_rankme']:.1f} std: {hl['target_std']:.2e}]" if hl is not None else ""
            self._say(
                "[%d, %5d] loss: %.3f masks: %.1f %.1f [wd: %.2e] [lr: %.2e] [mem: %.2e] (%.1f ms)"  # noqa: UP031 — the reference's format
                % (last["epoch"], last["itr"], sum(loss_values) / n, last["mask_enc"], last["mask_pred"], last["wd"], last["lr"],
                   mem * 1024, ms) + field  # fmt: skip
            )
            if grad_rows[-1] is not None:
                self._say("[%d, %5d] grad_stats: [%.2e %.2e] (%.2e, %.2e)" % (last["epoch"], last["itr"], *grad_rows[-1]))  # noqa: UP031
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{loss_values[-1]:.4f}", img_s=f"{ips:.0f}")
        return stop

    def _health_row(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One log step's health metrics, in :data:`fastjepa.health.HEALTH_COLUMNS` order, as
        a float64 tensor on the device. The RankMe columns are RankMe's formula on the
        batch-centred pooled features (:func:`fastjepa.health.effective_rank` with
        ``center=True``, the quantity evaluation reports as ``feature_effective_rank``): the
        uncentred form is dominated by the mean feature every image shares after the final
        LayerNorm, and moves little while the spread collapses (docs/eval.md)."""
        t_std, c_std, p_std, cos = tensors["stats"].double().unbind()
        t_rank = health.effective_rank(tensors["target"], center=True).double()
        c_rank = health.effective_rank(tensors["context"], center=True).double()
        return torch.stack([t_rank, t_std, c_rank, c_std, p_std, cos])

    def _watch_health(self, pending: list[dict], health_rows: list[dict | None]) -> bool:
        """Feed the collapse detector; keep the last target RankMe (the best checkpoint's
        score). True when the detector fired and ``meta.on_collapse=stop``."""
        stop = False
        for p, hr in zip(pending, health_rows):
            if hr is None:
                continue
            self.last_rankme = hr["target_rankme"]
            warning = self.collapse.update(p["step"], hr["target_rankme"], hr["target_std"])
            if warning is None:
                continue
            if self.cfg["meta"]["on_collapse"] == "stop":
                self.collapse_reason = warning
                stop = True
                self._say(f"fastjepa: {warning} — stopping (meta.on_collapse=stop)")
            else:
                self._say(f"fastjepa: {warning} (meta.on_collapse=stop would stop here)")
        return stop

    def _mem_gb(self) -> float:
        """Peak memory allocated on this process's GPU, GiB (0 off CUDA)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0


class ScalarLoggers:
    """The run's scalar loggers: TensorBoard when tensorboard is installed and
    ``logging.tensorboard``; W&B when installed and ``logging.wandb``. A no-op without either."""

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

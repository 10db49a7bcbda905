"""What a run says and records: console lines, ``log.csv``, TensorBoard and W&B scalars."""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import health
from ..config import ConfigError
from ..distributed import DistInfo, all_reduce_sum

CSV_COLUMNS = (
    "epoch", "itr", "step", "loss", "lr", "wd", "momentum", "imgs_per_sec",
    "mask_enc", "mask_pred", "ms_per_itr", "mem_gb", "grad_first", "grad_last",
    *health.HEALTH_COLUMNS,  # at log steps; empty between them
)  # fmt: skip
NH = len(health.HEALTH_COLUMNS)


@dataclass
class Readout:
    """A log step's rows after its one host read: the ``pending`` step records (see
    :meth:`fastjepa.training.trainer.Trainer.fit`) with, per row, the loss and health metrics (means
    over ranks), the skip flag, the gradient norms (first qkv, last qkv, min, max) or None;
    and the sum of the ranks' stop votes (None with no vote: one process)."""

    pending: list[dict]
    losses: list[float]
    health: list[dict | None]
    skipped: list[bool]
    grads: list[tuple | None]
    votes: float | None


class RunLog:
    """What a run says and records: its console (rank 0), ``log.csv``, TensorBoard / W&B
    scalars. It reports; the decisions are the :class:`fastjepa.training.stopping.Stopper`'s."""

    def __init__(self, out: Path, cfg: dict, dist: DistInfo, device: torch.device, *, quiet: bool = False):
        self.out, self.cfg, self.dist, self.device, self.quiet = Path(out), cfg, dist, device, quiet
        self.bar = None  # the epoch's progress bar while one is shown
        self.scalars: ScalarLoggers | None = None
        self._csv = self._writer = None

    def say(self, msg: str) -> None:
        """Print a line on rank 0's console (above the progress bar while one is shown)."""
        if not self.dist.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def open_bar(self, *, epoch: int, epochs: int, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=f"epoch {epoch}/{epochs}",
            disable=self.quiet or not self.dist.is_main,
            dynamic_ncols=True,
            leave=False,
        )

    def advance_bar(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def open_scalars(self) -> None:
        """The scalar loggers (rank 0): first, so that "wandb is not installed" comes before any file is written."""
        if self.dist.is_main:
            self.scalars = ScalarLoggers(self.out, self.cfg)

    def open_csv(self, step: int) -> None:
        """Open ``log.csv`` (rank 0), keeping only the rows before ``step`` (a resumed run; a
        crash may have logged past its checkpoint)."""
        if not self.dist.is_main:
            return
        path = self.out / "log.csv"
        rows = []
        if path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) < step]
        f = open(path, "w", newline="")
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
        f.flush()
        self._csv, self._writer = f, writer

    def close(self) -> None:
        self.close_bar()
        if self._csv is not None:
            self._csv.close()
            self._csv = self._writer = None
        if self.scalars is not None:
            self.scalars.close()
            self.scalars = None

    def read(self, pending: list[dict], vote: torch.Tensor | None = None) -> Readout:
        """One host read of everything the steps in ``pending`` left on the device: the
        losses and the health metrics (their means over ranks), the skip flags, the gradient
        norms — and ``vote`` (a rank's stop vote), summed over ranks on the same all-reduce.
        Every rank calls it at the same steps (under torchrun it holds a collective)."""
        n = len(pending)
        losses = torch.stack([p["loss"].reshape(()) for p in pending]).double()  # float64: a sum over ranks cannot overflow
        # the RankMe SVDs run here, just before the read (on CUDA an SVD waits for the device
        # itself; here that is the wait the read below makes anyway)
        healths = [self.health_row(p["health"]) for p in pending if p.get("health") is not None]
        nh = len(healths) * NH
        if healths:
            losses = torch.cat([losses, *healths])
        if self.dist.enabled:
            reduced = all_reduce_sum(torch.cat([losses, vote]) if vote is not None else losses, self.dist)
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
        voted = self.dist.enabled and vote is not None
        votes = values[n + nh] if voted else None
        rest = values[n + nh + int(voted) :]
        skipped = [p["skipped"] is not None and rest.pop(0) > 0 for p in pending] if skips else [False] * n
        grad_rows = [tuple(rest.pop(0) for _ in range(4)) if p["grads"] is not None else None for p in pending]
        return Readout(pending, loss_values, health_rows, skipped, grad_rows, votes)

    def write(self, r: Readout, ips: float, elapsed: float) -> None:
        """Rank 0: the rows in ``log.csv`` and the scalar loggers; at a log step (finite
        ``ips``: images/s since the last) the console lines, as the reference prints them."""
        if not self.dist.is_main:
            return
        n = len(r.pending)
        ms = 1000.0 * elapsed / n if elapsed > 0 else float("nan")
        mem = self.mem_gb()
        tb = self.scalars
        for p, v, g, hr in zip(r.pending, r.losses, r.grads, r.health):
            g = g or (float("nan"),) * 4
            row = dict(epoch=p["epoch"], itr=p["itr"], step=p["step"], loss=f"{v:.6f}", lr=f"{p['lr']:.6e}", wd=f"{p['wd']:.6e}",
                       momentum=f"{p['momentum']:.6f}", imgs_per_sec=f"{ips:.2f}", mask_enc=p["mask_enc"], mask_pred=p["mask_pred"],
                       ms_per_itr=f"{ms:.2f}", mem_gb=f"{mem:.3f}", grad_first=f"{g[0]:.3e}", grad_last=f"{g[1]:.3e}")  # fmt: skip
            if hr is not None:
                row.update({k: f"{x:.6g}" for k, x in hr.items()})
            self._writer.writerow(row)
            if tb is not None:
                tb.log(p["step"], loss=v, lr=p["lr"], wd=p["wd"], momentum=p["momentum"], imgs_per_sec=ips, mask_enc=p["mask_enc"],
                       mask_pred=p["mask_pred"], mem_gb=mem, **(hr or {}))  # fmt: skip
        self._csv.flush()
        last, hl = r.pending[-1], r.health[-1]
        if math.isfinite(ips):
            field = f" [rankme: {hl['target_rankme']:.3f} std: {hl['target_std']:.2e}]" if hl is not None else ""
            self.say(
                "[%d, %5d] loss: %.3f masks: %.1f %.1f [wd: %.2e] [lr: %.2e] [mem: %.2e] (%.1f ms)"  # noqa: UP031 — the reference's format
                % (last["epoch"], last["itr"], sum(r.losses) / n, last["mask_enc"], last["mask_pred"], last["wd"], last["lr"],
                   mem * 1024, ms) + field  # fmt: skip
            )
            if r.grads[-1] is not None:
                self.say("[%d, %5d] grad_stats: [%.2e %.2e] (%.2e, %.2e)" % (last["epoch"], last["itr"], *r.grads[-1]))  # noqa: UP031
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{r.losses[-1]:.4f}", img_s=f"{ips:.0f}")

    def health_row(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One log step's health metrics, in :data:`fastjepa.health.HEALTH_COLUMNS` order, as
        a float64 tensor on the device. The RankMe columns are RankMe as published
        (:func:`fastjepa.health.rankme`: the pooled features as they are, not centred). The
        centred form measures the differences between images, and under bf16 autocast those
        sit near the residual stream's rounding: it then counts rounding noise, and rises
        while the representation collapses (docs/eval.md, "Why RankMe is not centred")."""
        t_std, c_std, p_std, cos = tensors["stats"].double().unbind()
        t_rank = health.rankme(tensors["target"]).double()
        c_rank = health.rankme(tensors["context"]).double()
        return torch.stack([t_rank, t_std, c_rank, c_std, p_std, cos])

    def mem_gb(self) -> float:
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

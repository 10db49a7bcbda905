"""One I-JEPA optimizer step (docs/design.md §5): :class:`Step`, a part of :class:`fastjepa.training.trainer.Trainer`."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch

from .. import health, ops
from ..data import batch_to_device
from ..distributed import DistInfo, all_reduce_sum, any_rank
from ..models import set_reference_numerics
from ..models.ijepa import local_shard
from ..ops import use_attention, use_backend
from ..schedulers import CosineWD, LinearMomentum, WarmupCosineLR


def finite_on_every_rank(tensors: list[torch.Tensor], dist: DistInfo, device: torch.device, *, fsdp: bool = False) -> bool:
    """True on every rank iff every element of ``tensors`` is finite on every rank (FSDP2
    shards are checked locally; one host sync, plus one all-reduce under torchrun)."""
    if fsdp:
        tensors = [local_shard(t) for t in tensors]
    finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
    if dist.enabled:
        finite = not any_rank(not finite, dist, device)
    return finite


@dataclass
class StepResult:
    """What one optimizer step leaves, on the device (no host read): the loss (mean over
    its micro-batches), the gradient statistics (``want_grads``; see :meth:`Step.grad_stats`),
    the schedules' values it used, the ``nan_policy=skip`` flag (1.0: skipped; None
    without that policy) and the health tensors (``want_health``; see :meth:`Step.health_tensors`)."""

    loss: torch.Tensor
    grads: torch.Tensor | None
    lr: float
    wd: float
    momentum: float
    skipped: torch.Tensor | None = None
    health: dict[str, torch.Tensor] | None = None


class Step:
    """The optimizer step of a run: schedules, micro-batches, the skip decision on the
    device, the EMA update, the gradient statistics and the health tensors.

    ``model`` (an :class:`fastjepa.ijepa.IJEPA`, wrapped for DDP/FSDP2 as the run needs),
    ``optimizer`` and ``scaler`` (a GradScaler or None) are trained in place; ``cfg`` is the
    run's resolved config; ``ipe`` its iterations per epoch (for the schedules); ``dataset``
    finishes uint8 crops on the device (:meth:`to_device`). ``reference_step``
    (``meta.reference_step``): the reference ops and math attention in :meth:`backend`, the
    model set to the reference numerics (:func:`fastjepa.models.set_reference_numerics`)
    and the per-parameter EMA."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: dict,
        *,
        ipe: int,
        device: torch.device,
        dist: DistInfo,
        dataset=None,
        amp_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        reference_step: bool = False,
        fsdp: bool = False,
    ):
        self.model, self.optimizer, self.cfg, self.ipe = model, optimizer, cfg, ipe
        self.device, self.dist, self.dataset = device, dist, dataset
        self.amp_dtype, self.scaler, self.reference_step, self.fsdp = amp_dtype, scaler, reference_step, fsdp
        # nan_policy=skip decided on the device: the fused AdamW skips its update (and its
        # step count) where its found_inf flag is set, the EMA lerps with weight 0 — no host
        # read. The reference step (per-parameter AdamW, GradScaler) decides on the host.
        self.skip_on_device = scaler is None and bool(optimizer.defaults.get("fused"))
        if reference_step:  # the reference's numerics too: fp32 pos-embed and mask token under autocast
            set_reference_numerics(model)
        self.build_schedules()

    def build_schedules(self) -> None:
        """The lr, weight-decay and EMA-momentum schedules from ``cfg["optimization"]`` (again
        after the time budget changed its epochs, warmup or step cut)."""
        opt = self.cfg["optimization"]
        cut = opt["budget_steps"]  # a run cut within its first epoch: the schedules span its steps
        total = int((cut if cut is not None else opt["epochs"] * self.ipe) * opt["ipe_scale"])
        warmup = int(opt["warmup"] * self.ipe)
        self.lr_sched = WarmupCosineLR(opt["start_lr"], opt["lr"], opt["final_lr"], warmup, total)
        self.wd_sched = CosineWD(opt["weight_decay"], opt["final_weight_decay"], total)
        self.mom_sched = LinearMomentum(opt["ema"][0], opt["ema"][1], total)

    def _set_schedules(self, index: int) -> tuple[float, float, float]:
        lr = self.lr_sched.value(index + 1)
        wd = self.wd_sched.value(index + 1)
        mom = self.mom_sched.value(index)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if not group.get("WD_exclude", False):
                group["weight_decay"] = wd
        return lr, wd, mom

    def to_device(self, udata, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor]):
        """A collated batch on this process's device (asynchronous from pinned memory); uint8
        image crops are finished there (float, normalise, flip: data.batch_to_device)."""
        imgs = batch_to_device(udata, self.device, self.dataset)
        masks_enc = [m.to(self.device, non_blocking=True) for m in masks_enc]
        masks_pred = [m.to(self.device, non_blocking=True) for m in masks_pred]
        return imgs, masks_enc, masks_pred

    def backend(self) -> ExitStack:
        """The ops context of a step: the reference step runs the reference ops and math
        attention (which implementations run; its numerics are the model's, set at
        construction); fastjepa's, as set."""
        stack = ExitStack()
        if self.reference_step:
            stack.enter_context(use_backend("reference"))
            stack.enter_context(use_attention("math"))
        return stack

    def step(
        self,
        imgs: torch.Tensor,
        masks_enc: list[torch.Tensor],
        masks_pred: list[torch.Tensor],
        *,
        index: int,
        want_grads: bool = False,
        want_health: bool = False,
    ) -> StepResult:
        """Optimizer step number ``index`` (0-based; it places the step on the schedules) over
        ``grad_accum`` micro-batches. With ``want_health``, the health tensors of the whole
        batch (see :meth:`health_tensors`). On the device, with no host sync (the reference
        step excepted: its GradScaler and its skip decision read on the host, as the reference)."""
        accum = self.cfg["optimization"]["grad_accum"]
        lr, wd, mom = self._set_schedules(index)
        B = imgs.size(0)
        micro = B // accum
        total = torch.zeros((), device=self.device)
        tensors = None
        outputs: dict = {}
        hooks = self.health_hooks(outputs) if want_health else []
        try:
            for a in range(accum):
                sl = slice(a * micro, (a + 1) * micro)
                total += self._micro_step(imgs[sl], [m[sl] for m in masks_enc], [m[sl] for m in masks_pred], a, accum)
        finally:
            for h in hooks:
                h.remove()
        if want_health and {"target", "context", "pred"} <= set(outputs):
            last = slice((accum - 1) * micro, accum * micro)
            tensors = self.health_tensors(outputs, [m[last] for m in masks_pred], len(masks_enc))
        grads, skipped = self._update(total, want_grads, mom)
        return StepResult(total, grads, lr, wd, mom, skipped, tensors)

    def _micro_step(self, imgs: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor], a: int, accum: int):
        """Forward and backward of micro-batch ``a`` of ``accum``; returns its detached fp32 loss share."""
        sync = ExitStack()  # DDP: no gradient all-reduce before the last micro-batch
        if self.fsdp:
            for net in (self.model.encoder, self.model.predictor):
                net.set_requires_gradient_sync(a == accum - 1)
        elif accum > 1 and a < accum - 1 and self.dist.enabled:
            sync.enter_context(self.model.encoder.no_sync())
            sync.enter_context(self.model.predictor.no_sync())
        with sync, torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.model(imgs, masks_enc, masks_pred) / accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach().float()

    def _update(self, total: torch.Tensor, want_grads: bool, mom: float):
        """The skip decision, gradient statistics, optimizer step and EMA after the
        micro-batches. Returns (gradient statistics or None, skip flag or None)."""
        skip_flag, skip_now = None, False
        if self.cfg["optimization"]["nan_policy"] == "skip":
            # a non-finite loss, or a finite one with non-finite gradients; under DDP/FSDP all
            # ranks skip together (one rank's flag is all-reduced to all)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if self.skip_on_device:
                skip_flag = self._non_finite_flag([total, *grads])
            else:  # one host sync per step
                skip_now = not finite_on_every_rank([total, *grads], self.dist, self.device, fsdp=self.fsdp)
                skip_flag = torch.full((), float(skip_now), device=self.device)
        grads = self.grad_stats() if want_grads and not skip_now else None
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
            self.model.update_target(mom, mode="reference" if self.reference_step else "foreach", skip=skip_flag if self.skip_on_device else None)
        return grads, skip_flag

    def health_hooks(self, outputs: dict) -> list:
        """Forward hooks on the target encoder, the context encoder and the predictor: each
        micro-batch's output pooled (mean token, fp32) into ``outputs["<name>_pooled"]``, and
        the last micro-batch's (detached) tokens in ``outputs[name]``."""
        hooks = []
        for name, net in (("target", self.model.target_encoder), ("context", self.model.encoder), ("pred", self.model.predictor)):

            def keep(_net, _args, out, name=name):
                out = out.detach()
                outputs.setdefault(f"{name}_pooled", []).append(health.pooled(out))
                outputs[name] = out

            hooks.append(net.register_forward_hook(keep))
        return hooks

    def health_tensors(self, outputs: dict, masks_pred: list[torch.Tensor], nenc: int) -> dict[str, torch.Tensor]:
        """What the log step needs for the health metrics, on the device (no host read):
        the pooled target and context features of the whole batch (every micro-batch), at
        most ``health.max_rows`` rows each (the log step takes their RankMe: a fixed cost),
        and a (4,) tensor of the target std, the context std, the predictor outputs' std and
        the prediction-target cosine.

        Each std is over the rows of pooled features (one per image; for the context encoder
        one per image and context block; for the predictor, one per predicted block), per
        dimension, averaged. The cosine is per predicted token of the last micro-batch,
        against the layer-normed target tokens the loss compares it with."""
        rows = self.cfg["health"]["max_rows"]
        target, context, pred = (torch.cat(outputs[f"{k}_pooled"]) for k in ("target", "context", "pred"))
        with torch.no_grad():
            tokens = ops.target_tokens(outputs["target"], masks_pred, nenc)  # (npred·nenc·b, Kt, D)
        stats = torch.stack([
            health.spread(target), health.spread(context), health.spread(pred), health.pred_target_cosine(outputs["pred"], tokens),
        ])  # fmt: skip
        return {"target": target[:rows], "context": context[:rows], "stats": stats}

    def _non_finite_flag(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """A one-element fp32 tensor on the device: 1.0 if any element of ``tensors`` is
        non-finite on any rank, else 0.0 — computed without a host sync (one multi-tensor
        check per dtype, plus a one-element all-reduce under torchrun)."""
        if self.fsdp:
            tensors = [local_shard(t) for t in tensors]
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

    def grad_stats(self) -> torch.Tensor | None:
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
            squares = torch.stack(torch._foreach_norm([local_shard(g) for g in grads])).float().square()
            norms = all_reduce_sum(squares, self.dist).sqrt()
        else:
            norms = torch.stack(torch._foreach_norm(grads)).float()
        qkv = [i for i, n in enumerate(names) if "qkv" in n]
        nan = torch.full((), float("nan"), device=norms.device)
        first, last = (norms[qkv[0]], norms[qkv[-1]]) if qkv else (nan, nan)
        return torch.stack([first, last, norms.min(), norms.max()])

"""Benchmark one training step, fastjepa vs the reference path (pytest-benchmark).

    pytest benchmarks/bench_train_step.py                      # times each step
    pytest benchmarks/bench_train_step.py --benchmark-disable  # CI: each case once, as a check

A tiny CPU configuration (it says nothing about speed; ``train_step_table.py`` measures
the issue's configurations): fastjepa's default step vs the reference step
(``meta.reference_step=true``: reference ops, math attention, per-parameter EMA,
non-fused AdamW). Before timing, both paths must give the same loss on the same batch,
and the FLOP count used for MFU must equal PyTorch's own FLOP counter on the model.
"""

from __future__ import annotations

import tempfile

import flops
import pytest
import torch
from _common import DEVICE  # sets TRITON_INTERPRET on CPU; puts the checkout on sys.path

from fastjepa.config import load_config
from fastjepa.ops import use_attention, use_backend
from fastjepa.training.trainer import Trainer

TINY = ["data.dataset=synthetic", "data.synthetic_samples=16", "data.crop_size=32", "data.batch_size=8", "mask.patch_size=8",
        "mask.min_keep=0", "meta.model_name=vit_tiny", "meta.model_kwargs={depth: 2, embed_dim: 64, num_heads: 2}",
        "meta.pred_depth=2", "meta.pred_emb_dim=32", "logging.probe=false", "logging.plots=false", "logging.tensorboard=false",
        f"meta.device={DEVICE.type}", "meta.use_bfloat16=true"]  # fmt: skip
PATHS = {"fastjepa": [], "reference": ["meta.reference_step=true", "mask.compat=reference"]}


def _trainer(path: str) -> Trainer:
    cfg = load_config(None, [*TINY, *PATHS[path]])
    with tempfile.TemporaryDirectory() as tmp:
        return Trainer(cfg, tmp, quiet=True)


def _batch(tr: Trainer):
    udata, me, mp = next(iter(tr._loader()))
    x = udata[0] if isinstance(udata, (list, tuple)) else udata
    return x.to(tr.device), [m.to(tr.device) for m in me], [m.to(tr.device) for m in mp]


def _loss(tr: Trainer, batch) -> torch.Tensor:
    with torch.no_grad(), tr.stepper.backend(), torch.autocast(tr.device.type, dtype=tr.amp_dtype or torch.float32,
                                                                 enabled=tr.amp_dtype is not None):  # fmt: skip
        return tr.model(*batch).float()


def test_paths_agree_before_timing():
    fast, ref = _trainer("fastjepa"), _trainer("reference")  # same seed: same initial weights
    batch = _batch(fast)
    tol = dict(rtol=3e-2, atol=1e-3) if fast.amp_dtype is not None else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_loss(fast, batch), _loss(ref, batch), **tol)


def test_flop_count_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    tr = _trainer("fastjepa")
    imgs, me, mp = _batch(tr)
    with use_backend("reference"), use_attention("math"), FlopCounterMode(display=False) as counter:
        tr.model(imgs, me, mp).backward()
    tr.model.zero_grad(set_to_none=True)
    counted = flops.step_flops(flops.shape_of(tr.model, imgs.size(0), me, mp))["total"]
    assert counted == counter.get_total_flops()


def test_measured_peak_is_positive():
    r = flops.measured_peak_flops(DEVICE, torch.float32, n=256, seconds=0.05)
    assert r["flops_per_s"] > 0 and r["runs"] >= 5


@pytest.mark.parametrize("path", list(PATHS))
def test_train_step(benchmark, path):
    tr = _trainer(path)
    batch = _batch(tr)

    def step():
        with tr.stepper.backend():
            loss = tr.stepper.step(*batch, index=0).loss
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss)
    B = batch[0].size(0)
    benchmark.extra_info["images_per_step"] = B
    benchmark.extra_info["gflops_per_step"] = flops.step_flops(flops.shape_of(tr.model, B, batch[1], batch[2]))["total"] / 1e9

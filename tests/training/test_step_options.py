"""Step options give the same step as the plain one, on the CPU.

* ``meta.compile`` (``torch.compile`` of each block) and ``meta.activation_checkpointing``
  give the plain model's loss and gradients;
* the EMA as one ``torch._foreach_lerp_`` equals the reference's per-parameter loop;
* bf16 never gets a GradScaler on the fastjepa path; the reference step keeps one (CUDA).
"""

import copy
import math

import pytest
import torch

from fastjepa.config import load_config
from fastjepa.ops import cpu_has_bf16
from fastjepa.training.trainer import Trainer

from .._tiny import TINY, tiny_ijepa_batch
from ._cuda import cuda_batch, cuda_trainer


def _model_and_batch(depth=2):
    return tiny_ijepa_batch(depth=depth)


def _steps(model, batch, n=2):
    """``n`` optimizer steps (AdamW, EMA); returns each step's loss and the first step's grads."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, first = [], None
    for _ in range(n):
        loss = model(*batch)
        loss.backward()
        if first is None:
            first = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_target(0.99)
        losses.append(loss.detach())
    return torch.stack(losses), first


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys() and "predictor.mask_token" in ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=atol, msg=k)


def test_activation_checkpointing_same_loss_and_grads():
    model, batch = _model_and_batch()
    ckpt = copy.deepcopy(model)
    ckpt.encoder.grad_checkpointing = ckpt.predictor.grad_checkpointing = True
    _assert_same(_steps(ckpt, batch), _steps(model, batch), rtol=0, atol=0)  # recomputation is bitwise the same on CPU


@pytest.mark.slow  # 35-50 s cold on 2 shared cores (inductor compiles C++); seconds with a warm inductor cache
def test_compiled_blocks_same_loss_and_grads():
    torch._dynamo.reset()
    model, batch = _model_and_batch(depth=1)
    comp = copy.deepcopy(model)
    for blocks in (comp.encoder.blocks, comp.predictor.predictor_blocks, comp.target_encoder.blocks):
        for blk in blocks:
            blk.compile()
    # inductor fuses and reorders fp32 reductions: same function, rounding-level differences
    _assert_same(_steps(comp, batch, n=2), _steps(model, batch, n=2), rtol=1e-4, atol=1e-5)


def test_block_compiles_to_one_graph():
    """No graph breaks in a block (the attention dispatch included), so compiling pays."""
    from fastjepa.models.vision_transformer import Block

    for grad in (True, False):  # without grad: the target encoder (ops.linear_gelu's fused path when eager)
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(Block(48, 2, qkv_bias=True))(torch.randn(2, 7, 48))
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
        assert explained.graph_count == 1


def test_ema_foreach_equals_reference_loop():
    model, _ = _model_and_batch()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    ref = copy.deepcopy(model)
    for m in (0.996, 0.9991, 1.0, 0.0):
        model.update_target(m, mode="foreach")
        ref.update_target(m, mode="reference")
        for (n, a), b in zip(model.target_encoder.named_parameters(), ref.target_encoder.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"momentum {m}: {n}")
    for a, b in zip(model.target_encoder.parameters(), model.encoder.parameters()):  # m = 0 copies
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mode='fused'"):
        model.update_target(0.99, mode="fused")


def _trainer(tmp_path, *extra):
    cfg = load_config(None, [*TINY, "meta.device=cpu", *extra])
    return Trainer(cfg, tmp_path, quiet=True)


@pytest.mark.parametrize("reference", [False, True])
def test_bf16_flag_off_cuda_is_fp32_without_scaler(tmp_path, reference):
    """On the CPU ``meta.use_bfloat16`` means bf16 autocast only where the CPU has bf16
    matrix units and never for the reference step; no GradScaler either way."""
    tr = _trainer(tmp_path, "meta.use_bfloat16=true", f"meta.reference_step={str(reference).lower()}")
    expected = torch.bfloat16 if (cpu_has_bf16() and not reference) else None
    assert tr.amp_dtype is expected and tr.scaler is None
    imgs, me, mp = next(iter(tr._loader()))
    with tr.stepper.backend():
        loss = tr.stepper.step(imgs[0] if isinstance(imgs, (list, tuple)) else imgs, me, mp, index=0).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_fastjepa_optimizer_is_fused_reference_is_per_parameter(tmp_path):
    fast = _trainer(tmp_path / "a")
    ref = _trainer(tmp_path / "b", "meta.reference_step=true")
    assert fast.optimizer.defaults["fused"] is True
    assert not ref.optimizer.defaults.get("foreach") and not ref.optimizer.defaults.get("fused")
    # the reference step runs the model with the reference numerics (fp32 pos-embed and mask token)
    assert all(net.reference_numerics for net in (ref.model.encoder, ref.model.predictor, ref.model.target_encoder))
    assert not any(net.reference_numerics for net in (fast.model.encoder, fast.model.predictor, fast.model.target_encoder))


def test_fused_adamw_steps_match_the_per_parameter_optimizer():
    """Three AdamW steps with the fused CPU kernel (fastjepa) and the per-parameter loop
    (reference step) from the same start, grads and param groups (wd and no-wd groups):
    same parameters and optimizer state to fp32 rounding."""
    from fastjepa.build import build_model
    from fastjepa.training.optim import make_optimizer

    cfg = load_config(None, TINY)
    a = build_model(cfg)
    b = copy.deepcopy(a)
    start = [p.detach().clone() for p in a.parameters()]
    fused = make_optimizer(a, torch.device("cpu"), reference_step=False)
    loop = make_optimizer(b, torch.device("cpu"), reference_step=True)
    assert fused.defaults["fused"] is True and not loop.defaults.get("fused")
    for opt in (fused, loop):
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = 1e-2, (0.0 if g.get("WD_exclude") else 0.05)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a.parameters() if p.requires_grad]
        for model, opt in ((a, fused), (b, loop)):
            for p, g in zip([p for p in model.parameters() if p.requires_grad], grads):
                p.grad = g.clone()
            opt.step()
    moved = 0
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), start):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(pa.requires_grad and not torch.equal(pa, p0))
    assert moved > 10  # the steps did something
    for pa, pb in zip(a.parameters(), b.parameters()):
        if pa.requires_grad:
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fused.state[pa][key], loop.state[pb][key], rtol=1e-5, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("reference", [False, True])
def test_bf16_on_cuda_scaler_only_for_reference(tmp_path, reference):
    cfg = load_config(
        None, [*TINY, "meta.device=cuda", "meta.use_bfloat16=true", f"meta.reference_step={str(reference).lower()}"]
    )
    tr = Trainer(cfg, tmp_path, quiet=True)
    assert tr.amp_dtype is torch.bfloat16
    assert (tr.scaler is not None) == reference
    assert tr.optimizer.defaults.get("fused") is (None if reference else True)


@pytest.mark.gpu
def test_three_bf16_steps_of_fastjepa_and_the_reference_from_the_same_start(tmp_path):
    """Same seed (so the same initial weights), the same three batches and masks: both paths
    give finite losses within bf16 tolerance of each other, and both move the EMA target."""
    fast = cuda_trainer(tmp_path / "fast")
    ref = cuda_trainer(tmp_path / "ref", "meta.reference_step=true")
    assert ref.scaler is not None and fast.scaler is None  # the reference step keeps its GradScaler
    for (name, a), b in zip(fast.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(a, b), name
    batches = [cuda_batch(fast, first) for first in (0, 8, 16)]
    losses = {}
    for name, t in (("fast", fast), ("ref", ref)):
        start = [p.detach().clone() for p in t.model.target_encoder.parameters()]
        values = []
        for i, b in enumerate(batches):
            with t.stepper.backend():
                loss = t.stepper.step(*b, index=i).loss
            values.append(loss.item())
        losses[name] = values
        moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(t.model.target_encoder.parameters(), start))
        assert moved > 0, f"{name}: the EMA target did not move"
        assert all(p.dtype == torch.float32 for p in t.model.parameters())  # bf16 activations, fp32 weights
    assert all(math.isfinite(v) for v in losses["fast"] + losses["ref"]), losses
    # bf16 keeps 8 significant bits (relative spacing 2^-7 ≈ 0.8%): the paths round differently
    # (fastjepa's residual stream is bf16, the reference's fp32), so allow a few spacings
    for a, b in zip(losses["fast"], losses["ref"]):
        assert a == pytest.approx(b, rel=2e-2), losses

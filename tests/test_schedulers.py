"""LR / WD / EMA schedules at chosen steps (docs/design.md §5)."""

import math

import pytest

from fastjepa.schedulers import CosineWD, LinearMomentum, WarmupCosineLR

IPE, EPOCHS, WARMUP = 10, 30, 4  # published-style: warmup 4 epochs of 10 iterations
TOTAL, W = EPOCHS * IPE, WARMUP * IPE


def test_lr_warmup_and_cosine():
    s = WarmupCosineLR(start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6, warmup_steps=W, T_max=TOTAL)
    assert s.value(1) == pytest.approx(2e-4 + (1 / W) * (1e-3 - 2e-4))  # the first step (counter starts at 1)
    assert s.value(W // 2) == pytest.approx(2e-4 + 0.5 * (1e-3 - 2e-4))
    assert s.value(W) == pytest.approx(1e-3)  # warmup end = peak
    mid = W + (TOTAL - W) // 2
    assert s.value(mid) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.value(TOTAL) == pytest.approx(1e-6)  # the end


def test_wd_cosine_increases():
    s = CosineWD(ref_wd=0.04, final_wd=0.4, T_max=TOTAL)
    assert s.value(0) == pytest.approx(0.04)
    assert s.value(TOTAL // 2) == pytest.approx(0.22)
    assert s.value(TOTAL) == pytest.approx(0.4)
    assert all(s.value(t) <= 0.4 for t in range(0, 2 * TOTAL, 7))  # never past the final value
    d = CosineWD(ref_wd=0.4, final_wd=0.04, T_max=TOTAL)
    assert d.value(TOTAL // 2) == pytest.approx(0.22)
    assert all(d.value(t) >= 0.04 for t in range(0, 2 * TOTAL, 7))


def test_momentum_linear_first_step_exact():
    s = LinearMomentum(0.996, 1.0, TOTAL)
    assert s.value(0) == 0.996
    assert s.value(TOTAL // 2) == pytest.approx(0.998)
    assert s.value(TOTAL) == pytest.approx(1.0)

"""The learning-rate schedule, by hand: warm-up, then constant, linear or cosine decay toward 0. The first
step after warm-up runs at the peak and the last one still at a positive lr (progress counts from 0, as
the decay of transformers' get_linear_schedule_with_warmup)."""

import math

import pytest

from orchestrator.methods.schedules import lr_factor


def test_warmup_then_constant():
    assert [lr_factor(s, 4, 10, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_decay_starts_at_the_peak_and_ends_above_zero():
    # warm-up 2 of 6 steps: 1/2, 1; then 4 decay steps at progress 0, 1/4, 2/4, 3/4: 1, 0.75, 0.5, 0.25
    assert [lr_factor(s, 2, 6, "linear") for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    # no warm-up: the first step uses the peak lr, the last 1/4 of it
    assert [lr_factor(s, 0, 4, "linear") for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_cosine_decay():
    # no warm-up, 4 steps: progress 0, 1/4, 2/4, 3/4 -> (1 + cos(pi p)) / 2
    expected = [0.5 * (1 + math.cos(math.pi * p)) for p in (0.0, 0.25, 0.5, 0.75)]
    assert [lr_factor(s, 0, 4, "cosine") for s in range(4)] == pytest.approx(expected)
    assert lr_factor(0, 0, 4, "cosine") == 1.0
    assert lr_factor(2, 0, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(3, 0, 4, "cosine") == pytest.approx((1 - math.sqrt(0.5)) / 2)  # cos(3π/4) = -√½


def test_every_step_of_a_decaying_stage_trains():
    for schedule in ("linear", "cosine"):
        for warmup, total in ((0, 1), (0, 40), (5, 40), (39, 40)):
            factors = [lr_factor(s, warmup, total, schedule) for s in range(total)]
            assert min(factors) > 0 and max(factors) == 1.0, (schedule, warmup, total)


def test_degenerate_budgets_and_bad_names():
    assert lr_factor(0, 5, 3, "linear") == pytest.approx(0.2)  # still warming up
    assert lr_factor(7, 5, 3, "linear") == 1.0  # no decay phase when warm-up covers the stage
    assert lr_factor(9, 0, 4, "linear") == 0.0  # past the stage's end the decay stays at its end
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_factor(3, 0, 10, "step")

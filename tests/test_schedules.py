"""The learning-rate schedule, by hand: warm-up, then constant, linear or cosine decay to 0."""

import math

import pytest

from orchestrator.methods.schedules import lr_factor


def test_warmup_then_constant():
    assert [lr_factor(s, 4, 10, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_decay_reaches_zero_at_the_last_step():
    # warm-up 2 of 6 steps: 1/2, 1; then 4 decay steps: 1 - 1/4, 1 - 2/4, 1 - 3/4, 0
    assert [lr_factor(s, 2, 6, "linear") for s in range(6)] == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert [lr_factor(s, 0, 4, "linear") for s in range(4)] == pytest.approx([0.75, 0.5, 0.25, 0.0])


def test_cosine_decay():
    # no warm-up, 4 steps: progress 1/4, 2/4, 3/4, 1 -> (1 + cos(pi p)) / 2
    expected = [0.5 * (1 + math.cos(math.pi * p)) for p in (0.25, 0.5, 0.75, 1.0)]
    assert [lr_factor(s, 0, 4, "cosine") for s in range(4)] == pytest.approx(expected)
    assert lr_factor(1, 0, 4, "cosine") == pytest.approx(0.5)


def test_degenerate_budgets_and_bad_names():
    assert lr_factor(0, 5, 3, "linear") == pytest.approx(0.2)  # still warming up
    assert lr_factor(7, 5, 3, "linear") == 1.0  # no decay phase when warm-up covers the stage
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_factor(3, 0, 10, "step")

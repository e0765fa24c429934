"""The Δ intervals and the collapse rule of the tables (METHODS §6), against hand-computed values."""

import math

import numpy as np
import pytest

from orchestrator.methods.metrics import collapsed
from orchestrator.reporting.uncertainty import metric_of_errors, paired_delta


def test_metrics_of_errors_by_hand():
    errors = np.array([[1.0, 3.0, np.nan], [0.0, 4.0, 2.0]])  # NaN: an excluded parse failure
    assert metric_of_errors(errors, "mae", 0.5).tolist() == [2.0, 2.0]
    gm = metric_of_errors(errors, "gm", 0.5)  # exp(mean(log max(e, 0.5)))
    assert gm[0] == pytest.approx(math.sqrt(3.0)) and gm[1] == pytest.approx((0.5 * 4 * 2) ** (1 / 3))
    with pytest.raises(ValueError, match="unknown metric"):
        metric_of_errors(errors, "rmse", 0.5)


def test_a_constant_difference_has_a_degenerate_interval():
    rng = np.random.default_rng(1)
    ref = rng.uniform(0, 10, size=(3, 40))
    delta = paired_delta(ref + 2.0, ref, "mae", 0.5)  # every item 2 worse, every seed: Δ is 2 in every resample
    assert delta.estimate == pytest.approx(2.0) and delta.low == pytest.approx(2.0) and delta.high == pytest.approx(2.0)
    assert delta.resolved
    same = paired_delta(ref, ref, "gm", 0.5)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and not same.resolved


def test_two_items_one_seed_by_hand():
    """One seed, items with differences 1 and 3: a resample of the two items has mean 1, 2 or 3 (with
    probability 1/4, 1/2, 1/4), so the 2.5th and 97.5th percentiles are 1 and 3; the estimate is 2."""
    row, ref = np.array([[2.0, 5.0]]), np.array([[1.0, 2.0]])
    delta = paired_delta(row, ref, "mae", 0.5)
    assert (delta.estimate, delta.low, delta.high) == (2.0, 1.0, 3.0) and delta.resolved


def test_seed_noise_widens_the_interval_and_can_leave_it_unresolved():
    """Two seeds that disagree in sign (Δ +1 and −1 on every item): resampling the seeds gives −1, 0 or +1,
    so the interval is [−1, 1] and contains 0: unresolved."""
    ref = np.zeros((2, 30))
    row = np.stack([np.full(30, 1.0), np.full(30, -1.0)]) + 5.0
    delta = paired_delta(row, ref + 5.0, "mae", 0.5)
    assert delta.estimate == 0.0 and (delta.low, delta.high) == (-1.0, 1.0) and not delta.resolved
    with pytest.raises(ValueError, match="same shape|one shape"):
        paired_delta(row, ref[:1], "mae", 0.5)


def test_collapse_rule():
    targets = np.arange(10.0)
    assert collapsed(np.full(10, 66.0), targets) == "1 distinct prediction"
    assert collapsed(np.array([5.0, 6.0] * 5), targets) == "2 distinct predictions"
    narrow = 50.0 + np.arange(10) * 0.01  # 10 values, but std 0.029 against a label std of 2.87
    assert collapsed(narrow, targets) == "prediction std / label std 0.010"
    assert collapsed(targets[::-1].copy(), targets) is None
    assert collapsed(np.array([1.0, 2.0, 3.0, np.nan]), np.array([1.0, 2.0, 3.0, 4.0])) is None  # NaN ignored

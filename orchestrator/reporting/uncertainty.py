"""Signal or noise (METHODS §6, pure numpy): the Δ between two rows of a table with a 95% interval from a
paired bootstrap over test items and seeds. (Whether a model collapsed is methods.metrics.collapsed.)

Every cell of a sweep scores the same evaluation items, so the pairing is exact: a resample draws the
region's items with replacement (the same items for both rows and every seed) and the shared seeds with
replacement, and recomputes the metric (GM too) inside each resample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def metric_of_errors(errors: np.ndarray, metric: str, floor: float) -> np.ndarray:
    """MAE or GM over the last axis of absolute errors (NaN = an item the parse-failure policy excluded);
    GM = exp(mean(log(max(|e|, floor)))), the floor being half the label resolution (METHODS §2)."""
    if metric == "mae":
        return np.nanmean(errors, axis=-1)
    if metric == "gm":
        return np.exp(np.nanmean(np.log(np.maximum(errors, floor)), axis=-1))
    raise ValueError(f"unknown metric {metric!r}; allowed: mae, gm")


@dataclass(frozen=True)
class Delta:
    estimate: float  # mean over the shared seeds of metric(row, seed) − metric(reference, seed)
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes 0: the difference is larger than the seeds' and the items' noise."""
        return self.low > 0 or self.high < 0


def paired_delta(row_errors: np.ndarray, ref_errors: np.ndarray, metric: str, floor: float, *,
                 resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Delta:
    """Δ of two rows from their absolute errors, both [seeds, items] with the same seeds and items in the
    same order, and its percentile-bootstrap interval (items and seeds resampled with replacement)."""
    if row_errors.shape != ref_errors.shape or row_errors.ndim != 2 or 0 in row_errors.shape:
        raise ValueError(f"errors must be two non-empty [seeds, items] arrays of one shape, got "
                         f"{row_errors.shape} and {ref_errors.shape}")
    seeds, items = row_errors.shape
    estimate = float(np.mean(metric_of_errors(row_errors, metric, floor) - metric_of_errors(ref_errors, metric, floor)))
    rng = np.random.default_rng(seed)
    item_draws = rng.integers(0, items, size=(resamples, items))
    seed_draws = rng.integers(0, seeds, size=(resamples, seeds))
    # per seed and resample: the metric of both rows on the same resampled items -> [seeds, resamples]
    per_seed = np.stack([metric_of_errors(row_errors[s][item_draws], metric, floor)
                         - metric_of_errors(ref_errors[s][item_draws], metric, floor) for s in range(seeds)])
    deltas = per_seed[seed_draws.T, np.arange(resamples)].mean(axis=0)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(deltas, [tail, 100 - tail])
    return Delta(estimate, float(low), float(high))

"""The deep-imbalanced-regression protocol's shared primitives (METHODS §2), pure numpy.

Data building and evaluation both call these, so a sample's bin and shot region are computed
one way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

REGIONS = ("many", "medium", "few")


def label_bins(values, label_step: float) -> np.ndarray:
    """Bin index of each label: floor(value / label_step). The epsilon keeps 0.3/0.1 in bin 3."""
    arr = np.asarray(values, dtype=np.float64)
    return np.floor(arr / float(label_step) + 1e-9).astype(np.int64)


def bin_counts(train_values, label_step: float) -> dict[int, int]:
    """Training samples per bin: the counts that define the shot regions."""
    bins, counts = np.unique(label_bins(train_values, label_step), return_counts=True)
    return {int(b): int(c) for b, c in zip(bins, counts)}


def region_of_count(count: int, many: int = 100, few: int = 20) -> str:
    """many: more than `many` training samples; few: fewer than `few`; medium: in between."""
    if count > many:
        return "many"
    if count < few:
        return "few"
    return "medium"


def shot_regions(values, counts: Mapping[int, int], label_step: float, many: int = 100, few: int = 20) -> np.ndarray:
    """Region name of each value, from the training counts of its bin (unseen bins are few-shot)."""
    return np.array(
        [region_of_count(counts.get(int(b), 0), many, few) for b in label_bins(values, label_step)],
        dtype=object,
    )

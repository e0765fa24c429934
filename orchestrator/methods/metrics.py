"""Deep-imbalanced-regression metrics per shot region (METHODS §2), pure numpy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from orchestrator.data.protocol import bin_counts, shot_regions
from orchestrator.methods.answers import parse_answer, resolve_parse_failures

REGIONS = ("all", "many", "medium", "few")
COLLAPSE_DISTINCT = 3  # fewer distinct predictions than this ...
COLLAPSE_STD_RATIO = 0.05  # ... or a prediction std below this fraction of the label std: collapsed (METHODS §6)


def _constant(x: np.ndarray) -> bool:
    # max == min, not std == 0: the float std of [0.1, 0.1, 0.1] is 1e-17, not 0.
    return len(x) == 0 or bool(np.ptp(x) == 0)


def pearson(x, y) -> float:
    """Pearson correlation; NaN with fewer than 2 samples or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or _constant(x) or _constant(y):
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x, y) -> float:
    """Pearson correlation of the average ranks (ties share their mean rank)."""
    from scipy.stats import rankdata  # lazy: rewards imports this module and must stay light

    if len(x) < 2:
        return float("nan")
    return pearson(rankdata(x), rankdata(y))


def _region_errors(errors: np.ndarray, floor: float) -> dict[str, float]:
    if len(errors) == 0:
        return {"mae": float("nan"), "gm": float("nan"), "count": 0.0}
    return {
        "mae": float(errors.mean()),
        "gm": float(np.exp(np.log(np.maximum(errors, floor)).mean())),
        "count": float(len(errors)),
    }


def dir_metrics(
    preds, targets, train_targets, *, label_step: float = 1.0, many: int = 100, few: int = 20
) -> dict[str, float]:
    """`{region}/{mae,gm,count}` for region in all/many/medium/few (regions from the TRAINING counts
    per bin), plus all/rmse, pearson, spearman, ccc, std_ratio (population std pred / std target, the
    regression-to-the-mean diagnostic), exact, and distinct_predictions (how many different values the
    predictions take: a model that collapsed to one answer has 1). Empty region: mae and gm NaN, count 0."""
    from orchestrator.methods.metrics import ccc  # lazy: rewards imports parse_answer from here

    preds = np.asarray(preds, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if preds.shape != targets.shape or preds.ndim != 1:
        raise ValueError(f"preds {preds.shape} and targets {targets.shape} differ in shape (or are not 1-D)")
    errors = np.abs(preds - targets)
    floor = label_step / 2
    regions = shot_regions(targets, bin_counts(train_targets, label_step), label_step, many, few)
    out: dict[str, float] = {}
    for region in REGIONS:
        sel = np.ones(len(errors), bool) if region == "all" else regions == region
        out.update({f"{region}/{k}": v for k, v in _region_errors(errors[sel], floor).items()})
    n = len(errors)
    nan = float("nan")
    out["all/rmse"] = float(np.sqrt((errors**2).mean())) if n else nan
    out["all/pearson"] = pearson(preds, targets)
    out["all/spearman"] = spearman(preds, targets)
    out["all/ccc"] = ccc(preds.tolist(), targets.tolist()) if n else nan
    out["all/std_ratio"] = nan if _constant(targets) else float(preds.std() / targets.std())
    out["all/exact"] = float((errors < floor).mean()) if n else nan
    out["all/distinct_predictions"] = float(len(np.unique(preds)))
    return out


def evaluate_texts(texts, targets, train_targets, *, label_step, many, few, policy, label_min, label_max, seed=0):
    """Parse every completion, apply the parse-failure policy, compute dir_metrics on the kept
    predictions, and add `all/parse_fail_rate` (over ALL samples). Returns (metrics, parsed values)."""
    parsed = [parse_answer(t) for t in texts]
    preds, kept = resolve_parse_failures(parsed, targets, policy, label_min, label_max, seed)
    targets = np.asarray(targets, dtype=np.float64)
    metrics = dir_metrics(preds[kept], targets[kept], train_targets, label_step=label_step, many=many, few=few)
    metrics["all/parse_fail_rate"] = float(np.mean([p is None for p in parsed])) if parsed else float("nan")
    return metrics, parsed


def ccc(x: Sequence[float], y: Sequence[float]) -> float:
    """Concordance correlation 2·cov / (var x + var y + (μx − μy)²), population statistics.
    0.0 for empty input, a zero denominator or a non-finite result."""
    n = len(x)
    if n == 0 or n != len(y):
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x) / n
    vy = sum((b - my) ** 2 for b in y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / n
    denom = vx + vy + (mx - my) ** 2
    if denom == 0:
        return 0.0
    value = 2 * cov / denom
    return value if math.isfinite(value) else 0.0


def collapsed(predictions: np.ndarray, targets: np.ndarray) -> str | None:
    """Why a model's predictions count as collapsed (fewer than 3 distinct values, or their std below 5%
    of the labels' std: the model answers nearly one number whatever the input), else None."""
    kept = np.isfinite(predictions)
    distinct = len(np.unique(predictions[kept]))
    if distinct < COLLAPSE_DISTINCT:
        return f"{distinct} distinct prediction{'s' if distinct != 1 else ''}"
    label_std = float(np.std(targets[kept]))
    ratio = float(np.std(predictions[kept])) / label_std if label_std > 0 else float("nan")
    if ratio < COLLAPSE_STD_RATIO:
        return f"prediction std / label std {ratio:.3f}"
    return None

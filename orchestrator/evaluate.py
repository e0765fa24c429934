"""Parsing model output and the DIR metrics (METHODS §1–2), pure numpy.

Malformed output is data: `parse_answer` returns None for it and the parse-failure policy decides
what that sample counts as.
"""

from __future__ import annotations

import math
import re

import numpy as np
from scipy.stats import rankdata

from orchestrator.data.protocol import bin_counts, shot_regions

ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
PARSE_POLICIES = ("penalty", "exclude", "random")


def parse_answer(text) -> float | None:
    """The first number inside the LAST `<answer>...</answer>` block; None for anything else."""
    if not isinstance(text, str):
        return None
    blocks = ANSWER_BLOCK.findall(text)
    if not blocks:
        return None
    match = NUMBER.search(blocks[-1])
    if match is None:
        return None
    try:
        value = float(match.group())
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def format_answer(value: float, decimals: int = 0) -> str:
    """The completion the model is trained to write: `<answer>42</answer>`."""
    text = f"{int(round(value))}" if decimals == 0 else f"{value:.{decimals}f}"
    return f"<answer>{text}</answer>"


def resolve_parse_failures(parsed, targets, policy: str, label_min: float, label_max: float, seed: int = 0):
    """(predictions, kept mask). penalty: the label-range end farthest from the target (the worst error);
    exclude: dropped from the metrics; random: uniform over the label range (the official CCC-GRPO code)."""
    if policy not in PARSE_POLICIES:
        raise ValueError(f"unknown parse-failure policy {policy!r}; allowed: {', '.join(PARSE_POLICIES)}")
    targets = np.asarray(targets, dtype=np.float64)
    failed = np.array([p is None for p in parsed], dtype=bool)
    preds = np.array([np.nan if p is None else float(p) for p in parsed], dtype=np.float64)
    kept = np.ones(len(preds), dtype=bool)
    if policy == "penalty":
        worst = np.where(np.abs(targets - label_min) >= np.abs(targets - label_max), label_min, label_max)
        preds[failed] = worst[failed]
    elif policy == "random":
        preds[failed] = np.random.default_rng(seed).uniform(label_min, label_max, size=int(failed.sum()))
    else:
        kept = ~failed
    return preds, kept


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def concordance(x: np.ndarray, y: np.ndarray) -> float:
    """CCC with population statistics; 0 when undefined (same rule as the CCC reward)."""
    from orchestrator.rewards import ccc

    return ccc(x.tolist(), y.tolist())


def _region_errors(errors: np.ndarray, floor: float) -> dict[str, float]:
    if len(errors) == 0:
        return {"mae": float("nan"), "gm": float("nan"), "count": 0.0}
    return {
        "mae": float(errors.mean()),
        "gm": float(np.exp(np.log(np.maximum(errors, floor)).mean())),
        "count": float(len(errors)),
    }


def dir_metrics(preds, targets, train_targets, *, label_step: float = 1.0, many: int = 100, few: int = 20) -> dict[str, float]:
    """MAE, GM (errors floored at label_step/2) and count per region all/many/medium/few, plus on all:
    RMSE, Pearson, Spearman, CCC, std ratio (regression-to-the-mean diagnostic), exact-hit rate."""
    preds = np.asarray(preds, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if preds.shape != targets.shape:
        raise ValueError(f"preds {preds.shape} and targets {targets.shape} differ in shape")
    errors = np.abs(preds - targets)
    floor = label_step / 2
    regions = shot_regions(targets, bin_counts(train_targets, label_step), label_step, many, few)
    out: dict[str, float] = {}
    for region in ("all", "many", "medium", "few"):
        sel = np.ones(len(errors), bool) if region == "all" else regions == region
        out.update({f"{region}/{k}": v for k, v in _region_errors(errors[sel], floor).items()})
    n = len(errors)
    out["all/rmse"] = float(np.sqrt((errors**2).mean())) if n else float("nan")
    out["all/pearson"] = pearson(preds, targets)
    out["all/spearman"] = pearson(rankdata(preds), rankdata(targets)) if n else float("nan")
    out["all/ccc"] = concordance(preds, targets) if n else float("nan")
    out["all/std_ratio"] = float(preds.std() / targets.std()) if n and targets.std() > 0 else float("nan")
    out["all/exact"] = float((errors < floor).mean()) if n else float("nan")
    return out


def evaluate_texts(texts, targets, train_targets, *, label_step, many, few, policy, label_min, label_max, seed=0):
    """Parse every completion, apply the parse-failure policy, compute the DIR metrics.
    Returns (metrics with `all/parse_fail_rate`, parsed values with None for failures)."""
    parsed = [parse_answer(t) for t in texts]
    preds, kept = resolve_parse_failures(parsed, targets, policy, label_min, label_max, seed)
    targets = np.asarray(targets, dtype=np.float64)
    metrics = dir_metrics(preds[kept], targets[kept], train_targets, label_step=label_step, many=many, few=few)
    metrics["all/parse_fail_rate"] = float(np.mean([p is None for p in parsed])) if parsed else float("nan")
    return metrics, parsed

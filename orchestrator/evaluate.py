"""Parsing model output and the DIR metrics (METHODS §1–2), pure numpy.

Malformed output is data, never an exception: `parse_answer` returns None for it and the
parse-failure policy decides what that sample counts as.

Choices where METHODS is silent:
- The number grammar is ``[+-]? digits [. digits] [e[+-]digits]`` (also ``.5`` and ``5.``); a comma ends
  a number (``1,234`` reads as 1), and ``nan`` / ``inf`` are not numbers.
- Only complete ``<answer>...</answer>`` blocks count (tags are case-sensitive); an unclosed tag is no block.
- ``exact`` is the rate of |e| < label_step / 2 (a hit at the label resolution); GM floors |e| at the
  same half step so an exact hit does not collapse it to 0.
- Correlations are NaN when either side has zero variance (or fewer than 2 samples); CCC follows the
  reward's rules (0.0 when undefined) so the metric and the reward agree.
"""

from __future__ import annotations

import math
import re

import numpy as np

from orchestrator.data.protocol import bin_counts, shot_regions

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
PARSE_POLICIES = ("penalty", "exclude", "random")
REGIONS = ("all", "many", "medium", "few")


# --------------------------------------------------------------------------- parsing


def _last_block(text: str) -> str | None:
    """The last of the blocks `ANSWER_RE.findall` would give, in linear time: the regex retries from every
    unclosed `<answer>`, which is quadratic in a long completion full of them (90,000 characters: 26 s)."""
    open_tag, close_tag = "<answer>", "</answer>"
    last, pos = None, 0
    while (start := text.find(open_tag, pos)) >= 0:
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            break  # no later block can close either
        last, pos = text[start + len(open_tag) : end], end + len(close_tag)
    return last


def parse_answer(text) -> float | None:
    """The first number inside the LAST complete `<answer>...</answer>` block; None for anything else
    (no block, no number, a non-finite value, a non-string input)."""
    if not isinstance(text, str):
        return None
    block = _last_block(text)
    if block is None:
        return None
    match = NUMBER_RE.search(block)
    if match is None:
        return None
    try:
        value = float(match.group())
    except (ValueError, OverflowError):  # the grammar should prevent this; malformed text must not crash
        return None
    return value if math.isfinite(value) else None  # a 400-digit number overflows to inf


def format_answer(value: float, decimals: int = 0) -> str:
    """The completion SFT trains on: `<answer>42</answer>`; no decimal point when decimals == 0."""
    if not math.isfinite(value):
        raise ValueError(f"cannot format a non-finite answer: {value}")
    if decimals < 0:
        raise ValueError(f"decimals must be >= 0, got {decimals}")
    text = f"{round(value):d}" if decimals == 0 else f"{value:.{decimals}f}"
    return f"<answer>{text}</answer>"


def resolve_parse_failures(parsed, targets, policy: str, label_min: float, label_max: float, seed: int = 0):
    """(predictions, kept mask), both numpy arrays of len(parsed). Parse failures become:
    penalty: the label-range end farther from the target (the worst error; label_min on a tie);
    exclude: dropped (kept False); random: uniform over [label_min, label_max] (the official CCC-GRPO code)."""
    if policy not in PARSE_POLICIES:
        raise ValueError(f"unknown parse-failure policy {policy!r}; allowed: {', '.join(PARSE_POLICIES)}")
    targets = np.asarray(targets, dtype=np.float64)
    if len(parsed) != len(targets):
        raise ValueError(f"{len(parsed)} parsed values but {len(targets)} targets")
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


# --------------------------------------------------------------------------- metrics


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


def dir_metrics(preds, targets, train_targets, *, label_step: float = 1.0, many: int = 100, few: int = 20) -> dict[str, float]:
    """`{region}/{mae,gm,count}` for region in all/many/medium/few (regions from the TRAINING counts
    per bin), plus all/rmse, pearson, spearman, ccc, std_ratio (population std pred / std target, the
    regression-to-the-mean diagnostic) and exact. Empty region: mae and gm NaN, count 0."""
    from orchestrator.rewards import ccc  # lazy: rewards imports parse_answer from here

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

"""The answer format: parse a completion, format a target, handle parse failures (METHODS §1)."""

from __future__ import annotations

import math
import re
from decimal import Decimal

import numpy as np

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A number: digits with optional thousands separators (1,234,567: comma groups of exactly three digits, not
# followed by another digit or comma-digit, so "1,23" and "1,2345" are not grouped and read as 1, the first
# number, as METHODS §1 takes it), a decimal part, an exponent.
NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?!,?\d)(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
PARSE_POLICIES = ("penalty", "exclude", "random")


def _last_block(text: str) -> str | None:
    """The last of the blocks `ANSWER_RE.findall` would give, in linear time: the regex retries from every
    unclosed `<answer>`, which is quadratic in a long completion full of them: one such completion would
    stall its training or evaluation step for many seconds."""
    open_tag, close_tag = "<answer>", "</answer>"
    last, pos = None, 0
    while (start := text.find(open_tag, pos)) >= 0:
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            break  # no later block can close either
        last, pos = text[start + len(open_tag) : end], end + len(close_tag)
    return last


def parse_answer(text) -> float | None:
    """The first number inside the LAST complete `<answer>...</answer>` block, thousands separators read
    (`1,234` is 1234); None for anything else (no block, no number, a non-finite value, a non-string input)."""
    if not isinstance(text, str):
        return None
    block = _last_block(text)
    if block is None:
        return None
    match = NUMBER_RE.search(block)
    if match is None:
        return None
    try:
        value = float(match.group().replace(",", ""))
    except (ValueError, OverflowError):  # the grammar should prevent this; malformed text must not crash
        return None
    return value if math.isfinite(value) else None  # a 400-digit number overflows to inf


def answer_decimals(label_step: float) -> int:
    """Decimals that write every multiple of the label step: 0 for 1 or 500, 1 for 0.5 or 2.5, 2 for 0.25.
    SFT writes its targets at this resolution, so a dataset binned at 0.5 is taught 2.5, not a rounded 2."""
    exponent = Decimal(repr(float(label_step))).normalize().as_tuple().exponent
    return max(0, -int(exponent))


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

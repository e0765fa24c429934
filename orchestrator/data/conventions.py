"""What every dataset source shares: split names, the answer instruction, DataError."""

from __future__ import annotations

ANSWER_INSTRUCTION = "Answer with <answer>NUMBER</answer>."
SPLIT_NAMES = ("train", "val", "test")


class DataError(ValueError):
    """Bad or unusable data, named by dataset, split, column or row."""

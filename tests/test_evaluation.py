"""Evaluation inside the workers, without a model: which items a run scores, and what it logs of them."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch

from orchestrator.config import load_run_config
from orchestrator.stages import evaluation


class FakeDataset:
    """100 test items with ids 1000..1099, targets 0..99, every one in the `many` region."""

    label_step, label_min, label_max, many, few = 1.0, 0.0, 99.0, 1, 1

    def load(self, split):
        n = 100
        return pa.table({"id": np.arange(1000, 1000 + n), "prompt": [f"p{i}" for i in range(n)],
                         "target": np.arange(n, dtype=np.float64), "region": ["many"] * n})

    def train_targets(self):
        return np.arange(100, dtype=np.float64)


def answers_of(table) -> list[str]:
    """Every item answered with its own target."""
    return [f"<answer>{t:g}</answer>" for t in table.column("target").to_pylist()]


def evaluated_ids(monkeypatch, *overrides) -> list[int]:
    cfg = load_run_config(overrides=["eval.splits=[test]", "eval.max_samples=10", *overrides])
    ctx = SimpleNamespace(cfg=cfg, dataset=FakeDataset(), rank=0, world_size=1)
    monkeypatch.setattr(evaluation, "generate_split", lambda ctx, model, table: answers_of(table))
    _, predictions = evaluation.evaluate_model(ctx, torch.nn.Linear(1, 1))
    return predictions["test"].column("id").to_pylist()


def test_every_seed_of_a_sweep_scores_the_same_items(monkeypatch):
    """The eval.max_samples subset is drawn with the data seed, not the run seed (METHODS §6): the seeds of a
    cell, and every cell, score the same items, so their differences pair item by item."""
    first = evaluated_ids(monkeypatch, "seed=1")
    assert len(first) == 10 and len(set(first)) == 10
    assert evaluated_ids(monkeypatch, "seed=2") == first
    assert evaluated_ids(monkeypatch, "seed=2", "data.seed=5") != first  # another split seed, other items

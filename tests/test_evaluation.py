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


def predictions_of(scored: list[float]) -> dict[str, pa.Table]:
    n = len(scored)
    table = pa.table({"id": np.arange(n), "target": np.linspace(10, 100, n), "region": ["many"] * n})
    texts = [f"<answer>{v:g}</answer>" for v in scored]
    return {"test": evaluation.prediction_table(table, texts, scored, scored, 1.0)}


def test_a_run_whose_test_predictions_collapsed_is_tagged_with_the_reason():
    from orchestrator.tracking.conventions import COLLAPSE_REASON_TAG, COLLAPSED_TAG

    assert evaluation.collapse_tags(predictions_of([66.0] * 20)) == {
        COLLAPSED_TAG: "true", COLLAPSE_REASON_TAG: "1 distinct prediction"}
    # three values, but a spread of 0.1 against labels spread over 10..100: std ratio far below 0.05
    narrow = evaluation.collapse_tags(predictions_of([66.0] * 18 + [66.1, 66.2]))
    assert narrow[COLLAPSED_TAG] == "true" and narrow[COLLAPSE_REASON_TAG].startswith("prediction std / label std")
    assert evaluation.collapse_tags(predictions_of(list(np.linspace(10, 100, 20)))) == {COLLAPSED_TAG: "false"}
    assert evaluation.collapse_tags({}) == {}  # no test split evaluated: nothing to say


def test_the_worker_tags_the_run_when_it_logs_the_evaluation(tmp_path):
    from orchestrator.runtime.worker import Worker
    from orchestrator.stages.timing import Stopwatch
    from orchestrator.tracking.conventions import COLLAPSED_TAG

    class Logger:
        def __init__(self):
            self.tags = {}

        def set_tag(self, key, value):
            self.tags[key] = value

        def log_metrics(self, metrics, step):
            pass

        def log_artifact(self, path, folder):
            pass

        def close(self, timeout):
            pass

    logger = Logger()
    worker = Worker(cfg=load_run_config(), rank=0, world_size=1, device=None, model=None, tokenizer=None,
                    dataset=FakeDataset(), processor=None, logger=logger, timings={})
    worker.finish_logging({"test/all/mae": 1.0}, predictions_of([66.0] * 20), 10, Stopwatch({}), 1.0)
    assert logger.tags[COLLAPSED_TAG] == "true"

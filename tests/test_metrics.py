"""Parser, parse-failure policies and DIR metrics against hand-computed values."""

import math

import numpy as np
import pytest

from orchestrator.methods.answers import answer_decimals, format_answer, parse_answer, resolve_parse_failures
from orchestrator.methods.metrics import dir_metrics, evaluate_texts


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>42</answer>", 42.0),
        ("I think <answer> 7.5 </answer>", 7.5),
        ("<answer>1</answer> then <answer>2</answer>", 2.0),  # the last block wins
        ("<answer>-3.5 or 4</answer>", -3.5),  # the first number inside it
        ("<answer>1e3</answer>", 1000.0),
        ("<answer>rating: 63</answer>", 63.0),
        ("<answer>1,234</answer>", 1234.0),  # thousands separators: groups of three digits
        ("<answer>$12,345,678.50</answer>", 12345678.5),
        ("<answer>-1,000</answer>", -1000.0),
        ("<answer>1,23</answer>", 1.0),  # not a thousands group: the first number, 1
        ("<answer>1,2345</answer>", 1.0),
        ("<answer>1,234,56</answer>", 1.0),  # a malformed group anywhere: no grouping at all
        ("<answer>12, 34</answer>", 12.0),  # a list: the first number
        ("<answer>1234,567</answer>", 1234.0),  # a group needs 1-3 leading digits
        ("", None),
        ("no tags 42", None),
        ("<answer></answer>", None),
        ("<answer>abc</answer>", None),
        ("<answer>nan</answer>", None),
        ("<answer>inf</answer>", None),
        ("<answer>" + "9" * 400 + "</answer>", None),  # overflows to inf
        ("<answer>42", None),  # unclosed
        (None, None),
        (42, None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_format_answer_round_trips():
    assert format_answer(63.0) == "<answer>63</answer>"
    assert format_answer(2.25, decimals=1) == "<answer>2.2</answer>"
    assert parse_answer(format_answer(17)) == 17.0


@pytest.mark.parametrize("label_step, decimals", [(1, 0), (500, 0), (10, 0), (0.5, 1), (0.1, 1), (2.5, 1),
                                                   (0.25, 2), (0.001, 3), (1e-5, 5)])
def test_answer_decimals_follow_the_label_step(label_step, decimals):
    assert answer_decimals(label_step) == decimals


def test_sft_targets_are_written_at_the_label_resolution():
    """A token objective writes each target with the decimals its dataset's label step implies: 2.5 at step 0.5
    is taught as 2.5 (not banker's-rounded to 2), 4,250 dollars at step 500 as 4250."""
    from types import SimpleNamespace

    import pyarrow as pa

    from orchestrator.config import SFTStage
    from orchestrator.methods.objectives.base import build_objective
    from orchestrator.modeling.models import build_digit_tokenizer

    tok = build_digit_tokenizer()
    table = pa.table({"prompt": ["a", "b"], "target": [2.5, 7.0]})

    def taught(label_step):
        objective = build_objective(SFTStage(loss="ce"), None)
        objective.prepare(None, SimpleNamespace(label_step=label_step))
        return [tok.decode([t for t in labels if t >= 0][:-1]) for _, labels in objective.encode(tok, table, str)]

    assert taught(0.5) == ["<answer>2.5</answer>", "<answer>7.0</answer>"]
    assert taught(1.0) == ["<answer>2</answer>", "<answer>7</answer>"]
    table = pa.table({"prompt": ["a"], "target": [4250.0]})
    assert taught(500.0) == ["<answer>4250</answer>"]


def test_parse_failure_policies():
    parsed = [10.0, None, None]
    targets = [10.0, 20.0, 90.0]
    preds, kept = resolve_parse_failures(parsed, targets, "penalty", 10.0, 100.0)
    assert preds.tolist() == [10.0, 100.0, 10.0] and kept.all()  # the farther end of [10, 100]
    preds, kept = resolve_parse_failures(parsed, targets, "exclude", 10.0, 100.0)
    assert kept.tolist() == [True, False, False]
    preds, _ = resolve_parse_failures(parsed, targets, "random", 10.0, 100.0, seed=3)
    again, _ = resolve_parse_failures(parsed, targets, "random", 10.0, 100.0, seed=3)
    assert preds.tolist() == again.tolist() and all(10 <= p <= 100 for p in preds)
    with pytest.raises(ValueError, match="unknown parse-failure policy"):
        resolve_parse_failures(parsed, targets, "ignore", 0, 1)


def test_dir_metrics_by_hand():
    # training counts: label 1 x5 (many with many=4), label 2 x3 (medium), label 3 x1 (few with few=2)
    train = [1] * 5 + [2] * 3 + [3]
    targets = [1, 1, 2, 3]
    preds = [1, 3, 2.5, 7]  # errors 0, 2, 0.5, 4
    m = dir_metrics(preds, targets, train, label_step=1.0, many=4, few=2)
    assert m["all/mae"] == pytest.approx(6.5 / 4)
    assert m["many/mae"] == pytest.approx(1.0) and m["many/count"] == 2
    assert m["medium/mae"] == pytest.approx(0.5) and m["few/mae"] == pytest.approx(4.0)
    # GM floors errors at 0.5: exp(mean(log [0.5, 2, 0.5, 4])) = (0.5*2*0.5*4)^(1/4) = 2^(1/4)
    assert m["all/gm"] == pytest.approx(2 ** 0.25)
    assert m["many/gm"] == pytest.approx(1.0)  # sqrt(0.5 * 2)
    assert m["all/rmse"] == pytest.approx(math.sqrt((0 + 4 + 0.25 + 16) / 4))
    assert m["all/exact"] == pytest.approx(0.25)  # only |e| < 0.5 counts
    # population std ratio: std([1,3,2.5,7]) / std([1,1,2,3])
    assert m["all/std_ratio"] == pytest.approx(np.std(preds) / np.std(targets))
    assert m["all/pearson"] == pytest.approx(np.corrcoef(preds, targets)[0, 1])
    # spearman: ranks of preds [1,3,2,4], of targets [1.5,1.5,3,4]
    assert m["all/spearman"] == pytest.approx(np.corrcoef([1, 3, 2, 4], [1.5, 1.5, 3, 4])[0, 1])


def test_distinct_predictions_count_the_values_the_model_answered():
    """The collapse diagnostic (METHODS §6): how many different values the scored predictions take."""
    assert dir_metrics([66, 66, 66, 66], [10, 40, 70, 100], [10])["all/distinct_predictions"] == 1
    assert dir_metrics([1, 3, 2.5, 7, 3], [1, 1, 2, 3, 3], [1])["all/distinct_predictions"] == 4
    assert dir_metrics([], [], [1.0])["all/distinct_predictions"] == 0
    # with the penalty policy a parse failure is scored as a label-range end: a value the metrics saw
    m, _ = evaluate_texts(["<answer>20</answer>", "<answer>20</answer>", "??"], [10, 20, 30], [10, 20, 30],
                          label_step=1, many=100, few=20, policy="penalty", label_min=10, label_max=40)
    assert m["all/distinct_predictions"] == 2


def test_ccc_in_metrics_by_hand():
    # x = [1,2,3], y = [2,3,4]: vars 2/3 each, cov 2/3, mean gap 1 -> 2*(2/3)/(2/3+2/3+1) = 4/7
    m = dir_metrics([1, 2, 3], [2, 3, 4], [2, 3, 4])
    assert m["all/ccc"] == pytest.approx(4 / 7)


def test_empty_regions_and_degenerate_inputs():
    m = dir_metrics([5.0, 5.0], [5.0, 5.0], [5.0] * 200)
    assert m["many/count"] == 2 and m["few/count"] == 0 and math.isnan(m["few/mae"])
    assert math.isnan(m["all/pearson"]) and math.isnan(m["all/std_ratio"])
    assert m["all/gm"] == pytest.approx(0.5)  # exact hits do not collapse GM to 0
    empty = dir_metrics([], [], [1.0])
    assert empty["all/count"] == 0 and math.isnan(empty["all/mae"])
    with pytest.raises(ValueError, match="differ in shape"):
        dir_metrics([1.0], [1.0, 2.0], [1.0])


def test_evaluate_texts_counts_parse_failures():
    texts = ["<answer>10</answer>", "garbage", "<answer>30</answer>", ""]
    m, parsed = evaluate_texts(
        texts, [10, 20, 30, 40], [10, 20, 30, 40], label_step=1, many=100, few=20,
        policy="exclude", label_min=10, label_max=40,
    )
    assert parsed == [10.0, None, 30.0, None]
    assert m["all/parse_fail_rate"] == 0.5 and m["all/count"] == 2 and m["all/mae"] == 0.0
    m, _ = evaluate_texts(
        texts, [10, 20, 30, 40], [10, 20, 30, 40], label_step=1, many=100, few=20,
        policy="penalty", label_min=10, label_max=40,
    )
    # penalties: target 20 -> 40 (|e| 20), target 40 -> 10 (|e| 30)
    assert m["all/count"] == 4 and m["all/mae"] == pytest.approx(50 / 4)

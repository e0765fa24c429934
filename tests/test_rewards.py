"""GRPO rewards against hand-computed values, including the degenerate cases."""

import pytest

from orchestrator.config import GRPOStage
from orchestrator.methods.metrics import ccc
from orchestrator.methods.rewards import (
    RewardContext,
    accuracy_reward,
    batch_ccc_rewards,
    compute_rewards,
    format_reward,
    mae_reward,
    resolve_reward,
    substitute_parse_failures,
)


def test_ccc_by_hand():
    # x=[1,2,3], y=[2,3,4]: var 2/3 each, cov 2/3, (mean gap)^2 = 1 -> (4/3)/(7/3) = 4/7
    assert ccc([1, 2, 3], [2, 3, 4]) == pytest.approx(4 / 7)
    assert ccc([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert ccc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert ccc([], []) == 0.0
    assert ccc([5, 5], [5, 5]) == 0.0  # zero denominator
    assert ccc([5], [7]) == 0.0  # var 0, cov 0, gap 4 -> 0 / 4
    assert ccc([1, float("nan")], [1, 2]) == 0.0  # non-finite


def test_batch_ccc_rewards_by_hand():
    # B=2, G=2. m_1 = (2+4)/2 = 3 for prompt 1 (target 3).
    # prompt 0, sample 1.0: x=[1, 3], y=[1, 3] -> CCC 1
    # prompt 0, sample 3.0: x=[3, 3], y=[1, 3] -> var x 0, var y 1, cov 0 -> 0
    # prompt 1, m_0 = 2: sample 2: x=[2, 2], y=[3, 1] -> 0; sample 4: x=[4, 2], y=[3, 1]:
    #   mx 3, my 2, var 1 and 1, cov 1, gap 1 -> 2/(1+1+1) = 2/3
    out = batch_ccc_rewards([[1.0, 3.0], [2.0, 4.0]], [1.0, 3.0])
    assert out[0] == pytest.approx([1.0, 0.0])
    assert out[1] == pytest.approx([0.0, 2 / 3])


def test_batch_ccc_parse_failures_and_degenerate_batches():
    # A None sample gets 0 and is excluded from its prompt's mean: m_0 = 1 (only the parsed one).
    out = batch_ccc_rewards([[1.0, None], [2.0, 4.0]], [1.0, 3.0])
    assert out[0][1] == 0.0
    # prompt 1 sample 4: x=[4, 1], y=[3, 1]: mx 2.5 my 2, var 2.25 and 1, cov 1.5, gap .25 -> 3/3.5
    assert out[1][1] == pytest.approx(3 / 3.5)
    # a prompt with no parsed sample contributes no mean: prompt 0 sees only itself
    lone = batch_ccc_rewards([[5.0, 7.0], [None, None]], [6.0, 1.0])
    assert lone[1] == [0.0, 0.0]
    assert lone[0] == [0.0, 0.0]  # one-element vectors: zero variance, cov 0 -> 0
    assert batch_ccc_rewards([[None, None]], [1.0]) == [[0.0, 0.0]]  # all failures
    same = batch_ccc_rewards([[5.0, 5.0], [5.0, 5.0]], [5.0, 5.0])  # all-equal predictions and targets
    assert same == [[0.0, 0.0], [0.0, 0.0]]


def test_pointwise_rewards_by_hand():
    assert mae_reward(30, 50, form="neg_range", label_range=90) == pytest.approx(-20 / 90)
    assert mae_reward(None, 50, form="neg_range", label_range=90) == -1.0
    assert mae_reward(45, 50, form="one_minus_scaled", label_range=90, scale=10) == pytest.approx(0.5)
    assert mae_reward(10, 50, form="one_minus_scaled", label_range=90, scale=10) == 0.0
    assert mae_reward(None, 50, form="one_minus_scaled", label_range=90) == 0.0
    with pytest.raises(ValueError, match="unknown mae reward form"):
        mae_reward(1, 1, form="mse", label_range=1)
    assert accuracy_reward(50, 50) == 1.0 and accuracy_reward(51, 50) == 0.0
    assert accuracy_reward(52, 50, tolerance=2) == 1.0 and accuracy_reward(None, 50) == 0.0
    assert format_reward("<answer>50</answer>", 50.0, 10, 100) == 0.5
    assert format_reward("<answer>500</answer>", 500.0, 10, 100) == 0.0  # outside the label range
    assert format_reward("50", None, 10, 100) == 0.0


def my_constant_reward(ctx):
    """A user reward named by module:function in the tests."""
    return [[1.0] * len(g) for g in ctx.parsed]


def test_weighted_terms_and_user_rewards():
    ctx = RewardContext(
        texts=[["<answer>30</answer>", "x"]], parsed=[[30.0, None]], targets=[50.0],
        label_min=10, label_max=100, stage=GRPOStage(accuracy_tolerance=20),
    )
    terms = [("accuracy", 1.0), ("format", 2.0), ("test_rewards:my_constant_reward", 0.5)]
    total, per_term = compute_rewards(terms, ctx)
    assert per_term["accuracy"] == [[1.0, 0.0]] and per_term["format"] == [[0.5, 0.0]]
    assert total == [[1.0 + 1.0 + 0.5, 0.5]]
    with pytest.raises(ValueError, match="unknown reward 'cc'"):
        resolve_reward("cc")
    with pytest.raises(ValueError, match="cannot import reward"):
        resolve_reward("no_such_module:fn")
    with pytest.raises(ValueError, match="expected \\[2\\]"):
        compute_rewards([("test_rewards:bad_shape", 1.0)], ctx)


def bad_shape(ctx):
    return [[1.0]]


def test_the_range_normalised_mae_reward_never_scores_below_a_parse_failure():
    # |1000 - 50| / 90 is 10.6 ranges away: clipped at -1, what not answering gets
    assert mae_reward(1000, 50, form="neg_range", label_range=90) == -1.0
    assert mae_reward(-5000, 50, form="neg_range", label_range=90) == -1.0
    assert mae_reward(140, 50, form="neg_range", label_range=90) == -1.0  # exactly one range away
    assert mae_reward(95, 50, form="neg_range", label_range=90) == pytest.approx(-0.5)


def test_accuracy_by_default_is_a_hit_within_half_the_label_step():
    """The `exact` metric's rule, |ŷ − y| < label_step / 2: on prices binned at 500, 4,200 for 4,000 is a hit and
    4,250 or 4,300 is not; an explicit tolerance keeps its own rule, |ŷ − y| <= tolerance."""
    ctx = RewardContext(texts=[["a", "b", "c"]], parsed=[[4200.0, 4250.0, 4300.0]], targets=[4000.0],
                        label_min=300, label_max=19000, label_step=500, stage=GRPOStage())
    _, per_term = compute_rewards([("accuracy", 1.0)], ctx)
    assert per_term["accuracy"] == [[1.0, 0.0, 0.0]]
    ctx.stage = GRPOStage(accuracy_tolerance=0)
    assert compute_rewards([("accuracy", 1.0)], ctx)[1]["accuracy"] == [[0.0, 0.0, 0.0]]
    ctx.stage = GRPOStage(accuracy_tolerance=250)
    assert compute_rewards([("accuracy", 1.0)], ctx)[1]["accuracy"] == [[1.0, 1.0, 0.0]]
    assert accuracy_reward(50.4, 50) == 1.0 and accuracy_reward(50.5, 50) == 0.0  # label step 1
    assert accuracy_reward(50.4, 50, tolerance=0) == 0.0


def test_random_parse_failure_substitution_is_seeded_and_in_the_label_range():
    parsed = [[1.0, None], [None, 4.0]]
    assert substitute_parse_failures(parsed, "penalty", 10, 20, seed=(1, 0, 3, 0)) == parsed  # each term's own value
    once = substitute_parse_failures(parsed, "random", 10, 20, seed=(1, 0, 3, 0))
    assert once[0][0] == 1.0 and once[1][1] == 4.0 and 10 <= once[0][1] <= 20 and 10 <= once[1][0] <= 20
    assert once == substitute_parse_failures(parsed, "random", 10, 20, seed=(1, 0, 3, 0))  # same step, same worker
    assert once != substitute_parse_failures(parsed, "random", 10, 20, seed=(1, 0, 4, 0))  # another step
    assert once != substitute_parse_failures(parsed, "random", 10, 20, seed=(1, 0, 3, 1))  # another worker
    assert substitute_parse_failures(parsed, "random", 10, 20, seed=(-7, 0, 0, 0))  # any run seed
    with pytest.raises(ValueError, match="unknown reward parse-failure policy 'exclude'"):
        substitute_parse_failures(parsed, "exclude", 10, 20, seed=(0,))


def test_substituted_failures_are_what_every_reward_term_sees():
    """With `random`, a failed sample is scored as the drawn value by ccc, mae and accuracy, and enters its
    prompt's mean in ccc; format still pays nothing for a completion without a parsable answer."""
    texts, parsed, targets = [["<answer>2</answer>", "oops"], ["<answer>4</answer>", "<answer>1</answer>"]], \
        [[2.0, None], [4.0, 1.0]], [2.0, 3.0]
    drawn = substitute_parse_failures(parsed, "random", 0, 10, seed=(5, 1, 2, 0))
    value = drawn[0][1]
    ctx = RewardContext(texts=texts, parsed=drawn, targets=targets, label_min=0, label_max=10, stage=GRPOStage())
    _, per_term = compute_rewards([("mae", 1.0), ("ccc", 1.0), ("format", 1.0)], ctx)
    assert per_term["mae"][0][1] == pytest.approx(-abs(value - 2.0) / 10)
    # prompt 1's sample 4 against prompt 0's mean (2 + value) / 2
    m0 = (2.0 + value) / 2
    assert per_term["ccc"][1][0] == pytest.approx(ccc([4.0, m0], [3.0, 2.0]))
    assert per_term["ccc"][0][1] == pytest.approx(ccc([value, 2.5], [2.0, 3.0]))
    assert per_term["format"] == [[0.5, 0.0], [0.5, 0.5]]

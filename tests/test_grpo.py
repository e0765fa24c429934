"""GRPO maths against hand-computed values, and the global token-mean invariance."""

import math

import pytest
import torch

from orchestrator.methods.grpo import clipped_policy_loss, group_advantages, grpo_loss_terms, kl_estimate


def test_group_advantages_by_hand():
    # group [1, 3]: mean 2, sample std sqrt(2) -> ±1/(sqrt2 + 1e-4); group [5, 5]: all zero
    a = group_advantages([1.0, 3.0, 5.0, 5.0], 2)
    s = math.sqrt(2) + 1e-4
    assert a.tolist() == pytest.approx([-1 / s, 1 / s, 0.0, 0.0], rel=1e-5)
    assert group_advantages([1.0, 3.0, 5.0, 5.0], 2, scale=False).tolist() == [-1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages([1.0, 2.0], 3)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    r = math.log(0.25) - math.log(0.5)  # = -log 2
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(-r)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(r * r / 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(r) - r - 1)
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_clipping_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5]]))  # ratios 1.5, 1.1, 0.5
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    # A > 0: min(r, clip(r)) = 1.2, 1.1, 0.5 -> loss -1.2, -1.1, -0.5; only the first is clipped
    assert loss.tolist()[0] == pytest.approx([-1.2, -1.1, -0.5])
    assert clipped.tolist() == [[True, False, False]]
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.3)
    # A < 0: min(-r, -clip(r)) with clip to [0.8, 1.3] -> -1.5, -1.1, -0.8 -> loss 1.5, 1.1, 0.8
    assert loss.tolist()[0] == pytest.approx([1.5, 1.1, 0.8])
    assert clipped.tolist() == [[False, False, True]]


def test_ratio_one_makes_clipping_inert_and_kl_added():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.tensor([[1.0, 1.0]])
    out = grpo_loss_terms(logp, logp.detach(), ref, torch.tensor([2.0]), mask, beta=0.1)
    r = math.log(0.25) - math.log(0.5)
    k3 = math.exp(r) - r - 1
    assert out["loss_sum"].item() == pytest.approx(-2.0 * 2 + 0.1 * k3)
    assert out["normaliser"].item() == 2 and out["clip_fraction"].item() == 0.0
    assert out["kl_mean"].item() == pytest.approx(k3 / 2)
    no_ref = grpo_loss_terms(logp, logp.detach(), None, torch.tensor([2.0]), mask, beta=0.1)
    assert no_ref["loss_sum"].item() == pytest.approx(-4.0)


def test_seq_mean_by_hand():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = grpo_loss_terms(logp, logp, None, torch.tensor([1.0, 3.0]), mask, beta=0.0, aggregation="seq_mean")
    # per-token loss = -A; each sequence's token mean is -A; summed: -1 + -3
    assert out["loss_sum"].item() == pytest.approx(-4.0) and out["normaliser"].item() == 2


def test_token_mean_gradient_is_the_same_whole_or_split():
    """Normalising each part's loss_sum by the GLOBAL token count reproduces the whole batch's gradient,
    whatever the split into micro-batches or workers (a per-micro-batch mean would not)."""
    torch.manual_seed(0)
    base = torch.randn(4, 5)
    old = base.detach() - 0.05
    ref = base.detach() + 0.1
    adv = torch.tensor([1.0, -0.5, 2.0, 0.3])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    kw = dict(beta=0.04, kl_estimator="k3", eps_low=0.2, eps_high=0.2, aggregation="token_mean")

    whole = base.clone().requires_grad_(True)
    out = grpo_loss_terms(whole, old, ref, adv, mask, **kw)
    (out["loss_sum"] / out["normaliser"]).backward()

    split = base.clone().requires_grad_(True)
    total = mask.sum()
    for rows in ([0, 1], [2], [3]):  # uneven micro-batches / workers
        part = grpo_loss_terms(split[rows], old[rows], ref[rows], adv[rows], mask[rows], **kw)
        (part["loss_sum"] / total).backward()
    assert torch.allclose(whole.grad, split.grad, atol=1e-7)

    naive = base.clone().requires_grad_(True)
    for rows in ([0, 1], [2], [3]):
        part = grpo_loss_terms(naive[rows], old[rows], ref[rows], adv[rows], mask[rows], **kw)
        (part["loss_sum"] / part["normaliser"] / 3).backward()
    assert not torch.allclose(whole.grad, naive.grad, atol=1e-4)  # the per-micro-batch mean differs


def test_step_statistics_from_two_workers_sums_by_hand():
    from orchestrator.stages.grpo import StepStats

    def step_statistics(summed, world_size, term_names):
        return StepStats.from_vector(summed, term_names).metrics(world_size)

    # worker A rewards [1, 3], worker B rewards [2, 6]: sum 12, sum of squares 50, n 4 -> mean 3,
    # population std sqrt(50/4 - 9) = sqrt(3.5); per-worker means (advantage std 0.8 and 1.2) average to 1.0.
    # One group per worker, B's rewards all agree (1 of 2 groups); each worker took one dynamic-sampling draw and
    # kept no agreeing group; 1 of the 4 completions was truncated; the workers' mean entropies 1.5 and 2.5.
    summed = [12.0, 50.0, 4.0, 2.0, 0.02, 0.1, 1.0, 30.0, 4.0, 8.0, 0.5, 1.0, 2.0, 2.0, 0.0, 1.0, 4.0, 2.0]
    stats = step_statistics(summed, world_size=2, term_names=["ccc"])
    assert stats["reward/mean"] == 3.0
    assert stats["reward/std"] == pytest.approx(math.sqrt(3.5))
    assert stats["advantage/std"] == 1.0 and stats["kl"] == 0.01 and stats["clip_fraction"] == 0.05
    assert stats["parse_fail_rate"] == 0.25 and stats["completion_length"] == 15.0
    assert stats["pred_std_over_label_std"] == 0.5 and stats["loss"] == 0.5 and stats["reward/ccc"] == 0.5
    assert stats["zero_spread_groups"] == 0.5 and stats["dynamic_sampling/draws"] == 1.0
    assert stats["dynamic_sampling/zero_spread_kept"] == 0.0
    assert stats["truncated_rate"] == 0.25 and stats["entropy"] == 2.0
    summed[9] = 0.0  # constant targets: the spread ratio is undefined, not infinite
    assert math.isnan(step_statistics(summed, 2, ["ccc"])["pred_std_over_label_std"])


def score_with(policy: str, seed: int = 7):
    """score_rollout on one worker: prompt 0 (target 20) answered 20 and a parse failure, prompt 1 (target 60) 50
    and 70; the reward is `mae` (−min(1, |e| / 100)) over labels 0..100."""
    from types import SimpleNamespace

    from orchestrator.config import GRPOStage, RunConfig
    from orchestrator.stages.grpo import PromptBatch, Rollout, score_rollout
    from orchestrator.stages.timing import Stopwatch

    stage = GRPOStage(rewards=[{"name": "mae"}], group_size=2, reward_parse_failure=policy)
    dataset = SimpleNamespace(label_min=0.0, label_max=100.0, label_step=1.0)
    ctx = SimpleNamespace(cfg=RunConfig(seed=seed), stage_index=1, rank=0, world_size=1, device=torch.device("cpu"),
                          dataset=dataset)
    batch = PromptBatch(prompt_ids=[[1], [2]], targets=[20.0, 60.0], columns={}, pixels=None)
    texts = [["<answer>20</answer>", "no idea"], ["<answer>50</answer>", "<answer>70</answer>"]]
    rollout = Rollout(completions=[[3]] * 4, texts=texts, parsed=[[20.0, None], [50.0, 70.0]])
    return score_rollout(ctx, stage, batch, rollout, Stopwatch({}), step=3)


def test_the_reward_parse_failure_policy_is_applied_before_the_reward_terms():
    penalty = score_with("penalty")
    assert penalty.per_term["mae"] == [[0.0, -1.0], [-0.1, -0.1]]  # the failure: mae's own value, −1
    drawn = score_with("random").per_term["mae"]
    assert drawn[1] == [-0.1, -0.1] and -1.0 < drawn[0][1] <= 0.0  # the failure scored as a value in [0, 100]
    assert score_with("random").per_term == score_with("random").per_term  # seeded: the same draw again
    assert score_with("random", seed=8).per_term != score_with("random").per_term

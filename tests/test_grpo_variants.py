"""The GRPO variants (advantages, reward combinations, ratios, aggregation, entropy, KL control, truncation)
against hand-computed values."""

import math

import pytest
import torch

from orchestrator.methods.grpo import (
    KL_CONTROLLERS,
    AdaptiveKLParams,
    clip_advantages,
    clipped_policy_loss,
    group_advantages,
    grpo_loss_terms,
    high_entropy_tokens,
    sequence_kl,
    step_advantages,
    zero_spread_groups,
)
from orchestrator.methods.rewards import REWARDS, RewardContext, compute_rewards, overlong_penalty
from orchestrator.modeling.forward import logprobs_of

SQRT2 = math.sqrt(2)


def pair(d: float) -> float:
    """The group-scaled advantage of the larger of two rewards d apart: (d/2) / (|d|/√2 + 1e-4)."""
    return (d / 2) / (abs(d) / SQRT2 + 1e-4)


# --------------------------------------------------------------------------- advantages


def test_leave_one_out_baseline_by_hand():
    # group [1, 3]: 1 is compared with 3 and 3 with 1 -> [-2, 2]; group [5, 5] -> 0
    assert group_advantages([1.0, 3.0, 5.0, 5.0], 2, "none", "leave_one_out").tolist() == [-2.0, 2.0, 0.0, 0.0]
    # G = 3, group [0, 3, 6]: baselines 4.5, 3, 1.5 -> [-4.5, 0, 4.5] = 3/2 x (r - mean); scaled by the group std 3
    loo = group_advantages([0.0, 3.0, 6.0], 3, "group", "leave_one_out")
    assert loo.tolist() == pytest.approx([-4.5 / 3.0001, 0.0, 4.5 / 3.0001])


def test_batch_scaling_divides_by_one_std_over_every_workers_rewards():
    # rewards [1, 3, 5, 5]: group-centred [-1, 1, 0, 0]; the batch's sample std sqrt(11/3)
    std = math.sqrt(11 / 3)
    whole = group_advantages([1.0, 3.0, 5.0, 5.0], 2, "batch")
    assert whole.tolist() == pytest.approx([-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0], rel=1e-6)
    # split over two workers: worker A holds [1, 3]; the other's count, sum and sum of squares come through reduce
    other = [2.0, 10.0, 50.0]
    split = group_advantages([1.0, 3.0], 2, "batch", reduce=lambda v: [a + b for a, b in zip(v, other)])
    assert split.tolist() == pytest.approx(whole[:2].tolist(), rel=1e-6)
    # per group, the same rewards scale differently
    assert group_advantages([1.0, 3.0], 2, "group").tolist() == pytest.approx([-pair(2.0), pair(2.0)])


def test_advantage_clipping_by_hand():
    a = torch.tensor([-3.0, -0.5, 2.0])
    assert clip_advantages(a, -1.0, 1.0).tolist() == [-1.0, -0.5, 1.0]
    assert clip_advantages(a, None, 1.0).tolist() == [-3.0, -0.5, 1.0]
    assert clip_advantages(a, None, None) is a
    clipped = step_advantages(torch.tensor([0.0, 10.0]), {}, {}, 2, scale="none", clip=(-2.0, 3.0))
    assert clipped.tolist() == [-2.0, 3.0]


# format and mae over two groups of two; the weighted sums [0.3, -0.6] and [0.4, 0.2]
FORMAT = [0.5, 0.0, 0.5, 0.5]
MAE = [-0.2, -0.6, -0.1, -0.3]
TOTAL = torch.tensor([f + m for f, m in zip(FORMAT, MAE)])


def test_sum_then_normalise_is_todays_advantage():
    terms, weights = {"format": FORMAT, "mae": MAE}, {"format": 1.0, "mae": 1.0}
    a = step_advantages(TOTAL, terms, weights, 2)
    assert torch.equal(a, group_advantages(TOTAL, 2))
    assert a.tolist() == pytest.approx([pair(0.9), -pair(0.9), pair(0.2), -pair(0.2)], rel=1e-6)


def test_normalise_then_sum_by_hand():
    """Each term scaled within its group: format [+p, -p], [0, 0]; mae [+p, -p], [+p, -p] (p ≈ 1/√2); summed
    [2p, -2p, p, -p], then standardised over the batch: mean 0, sample std p·sqrt(10/3)."""
    terms, weights = {"format": FORMAT, "mae": MAE}, {"format": 1.0, "mae": 1.0}
    a = step_advantages(TOTAL, terms, weights, 2, combination="normalise_then_sum")
    f, m1, m2 = pair(0.5), pair(0.4), pair(0.2)
    summed = [f + m1, -f - m1, m2, -m2]
    std = math.sqrt(sum(x * x for x in summed) / 3)
    assert a.tolist() == pytest.approx([x / (std + 1e-4) for x in summed], rel=1e-6)


def test_normalise_then_sum_makes_a_weight_mean_what_it_says():
    """Scaling a term's values (a reward in other units) leaves the normalised combination unchanged; in the
    summed one the wider term takes over."""
    weights = {"format": 1.0, "mae": 1.0}
    wide = [10 * m for m in MAE]
    wide_total = torch.tensor([f + m for f, m in zip(FORMAT, wide)])
    kw = dict(combination="normalise_then_sum")
    base = step_advantages(TOTAL, {"format": FORMAT, "mae": MAE}, weights, 2, **kw)
    assert step_advantages(wide_total, {"format": FORMAT, "mae": wide}, weights, 2, **kw).tolist() == pytest.approx(
        base.tolist(), rel=1e-3
    )
    assert not torch.allclose(step_advantages(wide_total, {}, weights, 2), step_advantages(TOTAL, {}, weights, 2))


def test_zero_spread_groups_as_each_combination_sees_them():
    weights = {"format": 1.0, "mae": 1.0}
    # group 0: both terms constant; group 1: format varies, mae constant; group 2: the terms cancel in the sum
    fmt, mae = [0.5, 0.5, 0.5, 0.0, 0.5, 0.0], [-0.2, -0.2, -0.1, -0.1, -0.5, 0.0]
    total = [f + m for f, m in zip(fmt, mae)]
    terms = {"format": fmt, "mae": mae}
    assert zero_spread_groups(total, terms, weights, 2).tolist() == [True, False, True]
    assert zero_spread_groups(total, terms, weights, 2, "normalise_then_sum").tolist() == [True, False, False]
    # a term of weight 0 carries no signal
    assert zero_spread_groups(total, terms, {"format": 0.0, "mae": 1.0}, 2, "normalise_then_sum").tolist() == [
        True, True, False
    ]


# --------------------------------------------------------------------------- ratios, clipping, aggregation


def test_sequence_ratio_is_the_completions_geometric_mean_ratio():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.1, 7.0]])).requires_grad_(True)  # the third token is padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    s = math.sqrt(1.5 * 1.1)  # 1.2845
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([1.0]), mask=mask, importance_ratio="sequence")
    assert loss[0, :2].tolist() == pytest.approx([-1.2, -1.2]) and clipped[0, :2].tolist() == [True, True]
    loss, _ = clipped_policy_loss(logp, old, torch.tensor([-1.0]), 0.5, 0.5, mask=mask, importance_ratio="sequence")
    assert loss[0, :2].tolist() == pytest.approx([s, s])
    # the completion's mean loss is s; ds/dlogp_t = s / |y| on its tokens, nothing on padding
    ((loss * mask).sum() / 2).backward()
    assert logp.grad.tolist()[0] == pytest.approx([s / 2, s / 2, 0.0])


def test_dual_clip_bounds_a_negative_advantages_loss():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[5.0, 2.0, 0.5]]))
    loss, _ = clipped_policy_loss(logp, old, torch.tensor([-1.0]), clip_ratio_c=3.0)
    # without it: max(r, clip(r)) = 5, 2, 0.8; the dual clip caps at c·|A| = 3
    assert loss.tolist()[0] == pytest.approx([3.0, 2.0, 0.8])
    loss, _ = clipped_policy_loss(logp, old, torch.tensor([1.0]), clip_ratio_c=3.0)
    assert loss.tolist()[0] == pytest.approx([-1.2, -1.2, -0.5])  # A > 0: untouched


@pytest.mark.parametrize("options", [
    {"importance_ratio": "sequence"}, {"clip_ratio_c": 3.0}, {"importance_ratio": "sequence", "clip_ratio_c": 2.0},
])
def test_at_ratio_one_the_ratio_level_and_dual_clip_change_nothing(options):
    torch.manual_seed(0)
    base = torch.randn(3, 4)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    grads = []
    for kw in ({}, options):
        logp = base.clone().requires_grad_(True)
        out = grpo_loss_terms(logp, logp.detach(), None, adv, mask, beta=0.0, aggregation="seq_mean", **kw)
        out["loss_sum"].backward()
        grads.append((out["loss_sum"].item(), logp.grad))
    assert grads[0][0] == pytest.approx(grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])


def test_constant_normaliser_by_hand():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = grpo_loss_terms(logp, logp, None, torch.tensor([1.0, 3.0]), mask, beta=0.0, aggregation="constant_norm",
                          max_completion_length=4)
    # token sum -(2·1 + 3·3) = -11 over completions × max_new_tokens = 2 × 4, whatever the lengths
    assert out["loss_sum"].item() == pytest.approx(-11.0) and out["normaliser"].item() == 8.0


# --------------------------------------------------------------------------- entropy


def test_entropy_from_the_logits_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], requires_grad=True)
    logp, h = logprobs_of(logits, torch.tensor([[0, 1]]), entropy="detached")
    assert logp.tolist()[0] == pytest.approx([math.log(0.5), math.log(0.25)])
    assert h.tolist()[0] == pytest.approx([math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])
    assert not h.requires_grad
    _, h = logprobs_of(logits, torch.tensor([[0, 1]]), entropy="differentiable")
    h.sum().backward()
    assert logits.grad[0, 0].tolist() == [0.0, 0.0]  # uniform: the entropy's maximum
    assert logits.grad[0, 1, 0] < 0  # sharpening the 0.75 token lowers the entropy
    assert torch.equal(logprobs_of(logits, torch.tensor([[0, 1]])), logp)


def test_high_entropy_tokens_by_hand():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    # the 0.6 quantile of 1..5 is 3.4: the top 40% are 4 and 5
    assert high_entropy_tokens(entropy, torch.ones(1, 5), 0.4).tolist() == [[0, 0, 0, 1, 1]]
    # padding is neither counted nor kept: the 0.6 quantile of 1..4 is 2.8
    assert high_entropy_tokens(entropy, torch.tensor([[1.0, 1, 1, 1, 0]]), 0.4).tolist() == [[0, 0, 1, 1, 0]]


def test_entropy_bonus_and_top_entropy_fraction_in_the_loss():
    logp = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    bonus = grpo_loss_terms(logp, logp, None, torch.tensor([0.0]), mask, beta=0.0, entropy=entropy, entropy_coef=0.1)
    assert bonus["loss_sum"].item() == pytest.approx(-0.1 * 10) and bonus["entropy_mean"].item() == 2.5
    # A = 1: -1 per token, kept on the two highest-entropy tokens only; the KL term stays on all four
    ref = torch.full((1, 4), math.log(0.5))
    top = grpo_loss_terms(logp, logp, ref, torch.tensor([1.0]), mask, beta=0.1, entropy=entropy,
                          top_entropy_fraction=0.5)
    k3 = 0.5 + math.log(2) - 1
    assert top["loss_sum"].item() == pytest.approx(-2.0 + 4 * 0.1 * k3)
    with pytest.raises(ValueError, match="needs the policy's per-token entropy"):
        grpo_loss_terms(logp, logp, None, torch.tensor([1.0]), mask, beta=0.0, top_entropy_fraction=0.5)


# --------------------------------------------------------------------------- KL placement and control


def test_sequence_kl_sums_the_completions_tokens():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert sequence_kl(logp, ref, mask, "k1").tolist() == pytest.approx([math.log(2)])
    assert sequence_kl(logp, ref, mask, "k3").tolist() == pytest.approx([0.5 + math.log(2) - 1])


def test_adaptive_kl_controller_by_hand():
    params = AdaptiveKLParams(kl_target=0.01, kl_horizon=18)
    adaptive = KL_CONTROLLERS["adaptive"]
    # error clipped at ±0.2; n = horizon: β × 1.2 above the target, × 0.8 far below
    assert adaptive(0.1, 0.02, 18, params) == pytest.approx(0.12)
    assert adaptive(0.1, 0.0, 18, params) == pytest.approx(0.08)
    # error 0.1, n/H = 0.5 -> × 1.05
    assert adaptive(0.1, 0.011, 9, params) == pytest.approx(0.105)
    assert KL_CONTROLLERS["fixed"](0.1, 5.0, 18) == 0.1


# --------------------------------------------------------------------------- truncated completions


def test_overlong_penalty_by_hand():
    # max_new_tokens 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10
    assert [overlong_penalty(n, 10, 4) for n in (3, 6, 8, 10)] == [0.0, 0.0, -0.5, -1.0]


def test_the_overlong_reward_reads_the_completions_lengths():
    from orchestrator.config import GRPOStage

    stage = GRPOStage(rewards=[{"name": "mae"}, {"name": "overlong", "weight": 0.5}], max_new_tokens=10,
                      overlong_buffer=4, group_size=2)
    ctx = RewardContext(texts=[["a", "b"]], parsed=[[5.0, 5.0]], targets=[5.0], label_min=0.0, label_max=10.0,
                        stage=stage, lengths=[[6, 9]])
    total, terms = compute_rewards([("mae", 1.0), ("overlong", 0.5)], ctx)
    assert terms["overlong"] == [[0.0, -0.75]] and total == [[0.0, -0.375]]
    assert "DAPO" in REWARDS.entry("overlong").source
    with pytest.raises(ValueError, match="needs the completions' lengths"):
        compute_rewards([("overlong", 1.0)], RewardContext(texts=[["a"]], parsed=[[1.0]], targets=[1.0],
                                                            label_min=0.0, label_max=2.0, stage=stage))


def test_the_stage_refuses_inconsistent_options():
    from orchestrator.config import GRPOStage

    with pytest.raises(ValueError, match="kl_control=adaptive needs kl_target"):
        GRPOStage(kl_control="adaptive")
    with pytest.raises(ValueError, match="advantage_clip_low .* must be below"):
        GRPOStage(advantage_clip_low=1.0, advantage_clip_high=-1.0)
    with pytest.raises(ValueError, match="overlong_buffer .* longer than max_new_tokens"):
        GRPOStage(rewards=[{"name": "overlong"}], max_new_tokens=8, overlong_buffer=9)
    with pytest.raises(ValueError, match="greater than 1"):
        GRPOStage(clip_ratio_c=0.5)


# --------------------------------------------------------------------------- reference refresh, saved and restored


@pytest.mark.usefixtures("process_group")  # a one-process gloo group (tests/conftest.py)
@pytest.mark.parametrize("zero", [0, 2])
def test_a_refreshed_reference_and_its_beta_are_what_a_resume_restores(zero, tmp_path):
    """refresh mixes the policy into the reference (α = 0.5), then copies it (α = 1); the checkpoint files the
    worker writes (its weights, its β) bring back that reference, not the stage's start."""
    import json
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from orchestrator.config import load_run_config
    from orchestrator.engine.deepspeed import build_engine
    from orchestrator.engine.reference import REFERENCE_FILE, REFERENCE_STATE_FILE, ReferencePolicy
    from orchestrator.modeling.models import build_digit_tokenizer, load_model_and_tokenizer
    from orchestrator.stages.grpo import start_reference
    from orchestrator.stages.timing import Stopwatch

    cfg = load_run_config(overrides=[
        f"deepspeed.zero_stage={zero}", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
        "pipeline=sft:ce -> grpo:ccc", "pipeline.1.ref_sync_every=1", "pipeline.1.lr=1e-2",
    ])
    stage = cfg.pipeline[1]
    model, _ = load_model_and_tokenizer(cfg.model, "tiny")
    reference = ReferencePolicy(model, cfg, stage, lora=False)
    start = {k: v.detach().clone() for k, v in reference.model.named_parameters()}
    engine = build_engine(model, stage, cfg)
    ids = torch.tensor([build_digit_tokenizer().encode("<answer>42</answer>", add_special_tokens=False)])
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    policy = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    assert any(not torch.equal(policy[k], start[k]) for k in start)  # the update moved the policy

    reference.refresh(engine, alpha=0.5)
    for name, p in reference.model.named_parameters():
        assert torch.allclose(p, 0.5 * policy[name] + 0.5 * start[name], atol=1e-7)
    reference.refresh(engine)
    assert all(torch.equal(p, policy[name]) for name, p in reference.model.named_parameters())
    reference.kl_coef = 0.0321

    save_file(reference.state_dict(), str(tmp_path / REFERENCE_FILE))  # as Worker.save_checkpoint does
    (tmp_path / REFERENCE_STATE_FILE).write_text(json.dumps(reference.checkpoint_state()))
    fresh, _ = load_model_and_tokenizer(cfg.model, "tiny")
    ctx = SimpleNamespace(cfg=cfg, model=fresh, stopwatch=Stopwatch({}))
    restored = start_reference(ctx, stage, str(tmp_path))
    assert restored.kl_coef == 0.0321
    assert all(torch.equal(p, policy[name]) for name, p in restored.model.named_parameters())
    assert start_reference(ctx, stage, None).kl_coef == stage.beta  # a fresh stage starts at its β


def test_dynamic_sampling_draws_its_extra_prompts_from_a_resumable_stream():
    """Extra draw d of step s on worker r reads B positions of the stage's seeded prompt stream, from
    EXTRA_PROMPTS_START at slot (s·max_draws + d − 1)·world + r: the same prompts whenever the step is rerun, and
    different ones for every (step, draw, worker)."""
    from types import SimpleNamespace

    import numpy as np

    from orchestrator.config import GRPOStage
    from orchestrator.data.collate import stream_indices
    from orchestrator.modeling.models import build_digit_tokenizer
    from orchestrator.stages.grpo import EXTRA_PROMPTS_START, PromptSource

    stage = GRPOStage(micro_batch_size=3, dynamic_sampling=True, dynamic_sampling_max_draws=2)
    tokenizer = build_digit_tokenizer()

    def source(rank: int) -> PromptSource:
        ctx = SimpleNamespace(tokenizer=tokenizer, prompt_text=lambda p: p, rank=rank, world_size=2,
                              image_batch=lambda images, rows: None)
        return PromptSource(ctx, stage, [f"{i}" for i in range(1000)], np.arange(1000.0), {"id": list(range(1000))},
                            None, seed=7)

    drawn = source(1).extra_batch(4, 2)
    slot = (4 * 2 + 2 - 1) * 2 + 1
    assert drawn.indices.tolist() == stream_indices(1000, 7, EXTRA_PROMPTS_START + slot * 3, 3).tolist()
    assert drawn.targets == drawn.indices.astype(float).tolist() and drawn.columns["id"] == drawn.indices.tolist()
    assert source(1).extra_batch(4, 2).indices.tolist() == drawn.indices.tolist()  # a rerun draws the same
    everything = [source(r).extra_batch(s, d).indices.tolist() for s in (4, 5) for d in (1, 2) for r in (0, 1)]
    flat = [i for rows in everything for i in rows]
    assert len(set(flat)) == len(flat)  # no two (step, draw, worker) share a prompt here (one epoch of the stream)

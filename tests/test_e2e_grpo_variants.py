"""End to end: one tiny SFT -> GRPO chain per family of GRPO variants, on 2 Ray Train workers (CPU)."""

import math

import pytest
from mlflow import MlflowClient
from test_e2e_grpo import GRPO_SMALL
from test_e2e_train import make_cfg, metric_history

from orchestrator.runtime.driver import run_training

pytestmark = pytest.mark.e2e


def finished_metrics(out) -> dict[str, float]:
    run = MlflowClient(out.tracking_uri).get_run(out.run_id)
    assert run.info.status == "FINISHED"
    return run.data.metrics


def test_advantage_family(tmp_path, ray_cluster):
    """Batch-std scaling and GDPO's per-term normalisation (both summed over the workers), a leave-one-out
    baseline, clipped advantages, with the CCC batch gathered across workers."""
    cfg = make_cfg(tmp_path, "name=advantage", "pipeline=sft:ce -> grpo:ccc+format", *GRPO_SMALL,
                   "pipeline.1.ccc_scope=global", "pipeline.1.scale_rewards=batch",
                   "pipeline.1.advantage_baseline=leave_one_out", "pipeline.1.reward_combination=normalise_then_sum",
                   "pipeline.1.advantage_clip_low=-1.5", "pipeline.1.advantage_clip_high=1.5")
    m = finished_metrics(run_training(cfg))
    assert 0 < m["train/advantage/std"] <= 1.5
    assert 0 <= m["train/zero_spread_groups"] <= 1 and "train/dynamic_sampling/draws" not in m
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["test/all/mae"])


def test_dynamic_sampling(tmp_path, ray_cluster):
    """A reward that most groups agree on (a 5-point accuracy): the workers draw further prompts together, each
    keeps its B prompts (the global CCC-style batch stays 2 x 3), and the draws are logged."""
    cfg = make_cfg(tmp_path, "name=dynamic", "pipeline=sft:ce -> grpo:accuracy", *GRPO_SMALL,
                   "pipeline.1.accuracy_tolerance=5", "pipeline.1.ccc_scope=global",
                   "pipeline.1.dynamic_sampling=true", "pipeline.1.dynamic_sampling_max_draws=2")
    out = run_training(cfg)
    m = finished_metrics(out)
    assert m["train/effective_batch_prompts"] == 6
    draws = [v for _, v in metric_history(out.tracking_uri, out.run_id, "train/dynamic_sampling/draws")]
    assert len(draws) == 2 and all(0 <= d <= 2 for d in draws) and max(draws) > 0
    spread = [v for _, v in metric_history(out.tracking_uri, out.run_id, "train/zero_spread_groups")]
    assert max(spread) > 0
    assert 0 <= m["train/dynamic_sampling/zero_spread_kept"] <= 1


def test_aggregation_and_ratio_family(tmp_path, ray_cluster):
    """Dr. GRPO's constant normaliser, GSPO's sequence ratio and dual clipping, with two updates per rollout so the
    ratio moves."""
    cfg = make_cfg(tmp_path, "name=aggregation", "pipeline=sft:ce -> grpo:mae", *GRPO_SMALL,
                   "pipeline.1.loss_aggregation=constant_norm", "pipeline.1.importance_ratio=sequence",
                   "pipeline.1.clip_ratio_c=3", "pipeline.1.num_iterations=2", "pipeline.1.epsilon_low=0.0003",
                   "pipeline.1.epsilon_high=0.0004")
    m = finished_metrics(run_training(cfg))
    assert m["train/clip_fraction"] > 0  # the second update's ratio leaves GSPO's narrow band
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["test/all/mae"])


def test_entropy_and_truncation_family(tmp_path, ray_cluster):
    """An entropy bonus on the 50% highest-entropy tokens, truncated completions masked, DAPO's overlong penalty."""
    cfg = make_cfg(tmp_path, "name=entropy", "pipeline=sft:ce -> grpo:mae+overlong", *GRPO_SMALL,
                   "pipeline.1.entropy_coef=0.01", "pipeline.1.top_entropy_fraction=0.5",
                   "pipeline.1.mask_truncated_completions=true", "pipeline.1.overlong_buffer=12")
    m = finished_metrics(run_training(cfg))
    assert m["train/entropy"] > 0
    assert 0 <= m["train/truncated_rate"] <= 1 and -1 <= m["train/reward/overlong"] <= 0
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["test/all/mae"])


def test_kl_in_the_reward_with_adaptive_beta_and_a_refreshed_reference_resumes(tmp_path, ray_cluster):
    """The KL in the reward, β adaptive, the reference synced to the policy after every step; interrupted after
    GRPO step 2 and resumed. The synced reference samples as the policy does, so the KL is 0 at every step and β
    falls by the controller's bound, ×(1 − 0.2·n/H) = ×0.8 a step (n = H = 18 samples). After the resume the KL is
    still 0 (the refreshed reference, not the stage's start, was restored) and β continues from its saved value."""
    common = ["name=kl", "pipeline=sft:ce -> grpo:mae", *GRPO_SMALL, "pipeline.1.kl_placement=reward",
              "pipeline.1.kl_control=adaptive", "pipeline.1.kl_target=0.01", "pipeline.1.kl_horizon=18",
              "pipeline.1.ref_sync_every=1"]
    first = run_training(make_cfg(tmp_path, *common, "pipeline.1.steps=2"))
    client = MlflowClient(first.tracking_uri)
    client.set_terminated(first.run_id, status="FAILED")  # as if it had been interrupted after GRPO step 2
    second = run_training(make_cfg(tmp_path, *common, "pipeline.1.steps=4"), allow_changed_resume=True)
    assert second.run_id == first.run_id
    assert client.get_run(second.run_id).data.tags["orchestrator.resumed_from"] == "stage 1 step 2"
    beta = metric_history(second.tracking_uri, second.run_id, "train/kl_coef")
    assert [s for s, _ in beta] == [62, 64]
    assert [v for _, v in beta] == pytest.approx([0.04 * 0.8**2, 0.04 * 0.8**4])
    assert [v for _, v in metric_history(second.tracking_uri, second.run_id, "train/kl")] == [0.0, 0.0]
    assert [v for _, v in metric_history(second.tracking_uri, second.run_id, "train/reward/kl_penalty")] == [0.0, 0.0]

"""End to end: SFT -> GRPO chains on the same 2 Ray Train workers (tiny model, CPU)."""

import math

import pytest
from mlflow import MlflowClient
from test_e2e_train import make_cfg, metric_history

from orchestrator.runtime.driver import run_training

pytestmark = pytest.mark.e2e

# A constant SFT rate: these tests check the GRPO plumbing, and 60 steps at a decaying rate do not
# teach the tiny model the answer format, so every rollout would fail to parse and carry no signal.
GRPO_SMALL = [
    "pipeline.0.steps=60", "pipeline.0.lr=3e-3", "pipeline.0.lr_schedule=constant", "pipeline.0.micro_batch_size=8",
    "pipeline.1.steps=4", "pipeline.1.micro_batch_size=3", "pipeline.1.group_size=3",
    "pipeline.1.max_new_tokens=24", "pipeline.1.lr=1e-4", "tracking.log_every=2", "checkpoint.every_steps=100",
]


@pytest.mark.parametrize("scope", ["worker", "global"])
def test_sft_then_grpo_ccc(tmp_path, ray_cluster, scope):
    cfg = make_cfg(tmp_path, f"name=ccc-{scope}", "pipeline=sft:ce -> grpo:ccc+format", *GRPO_SMALL,
                   f"pipeline.1.ccc_scope={scope}")
    out = run_training(cfg)
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    # GRPO steps continue the SFT step count: SFT logs at 2..60, GRPO at 62 and 64
    steps = [s for s, _ in metric_history(out.tracking_uri, out.run_id, "train/reward/ccc")]
    assert steps == [62, 64]
    # worker scope: each worker's minibatch (B=3); global: the whole step's batch (2 workers x 3)
    assert m["train/effective_batch_prompts"] == (3 if scope == "worker" else 6)
    for key in ("train/reward/mean", "train/reward/format", "train/kl", "train/clip_fraction",
                "train/parse_fail_rate", "train/completion_length", "time/generation_s", "time/reward_s",
                "time/forward_backward_s", "time/optimizer_s", "test/few/mae", "val/all/mae"):
        assert key in m and math.isfinite(m[key]), key
    # after SFT the sampled completions are mostly well-formed, so the rewards are not all zero
    assert m["train/parse_fail_rate"] < 0.5 and m["train/reward/format"] > 0.25
    assert m["train/advantage/std"] > 0
    assert run.data.params["pipeline.1.ccc_scope"] == scope
    assert run.data.params["pipeline"] == "sft:ce -> grpo:ccc+format"


def test_grpo_mae_without_reference(tmp_path, ray_cluster):
    cfg = make_cfg(tmp_path, "name=mae", "pipeline=sft:ce -> grpo:mae", *GRPO_SMALL, "pipeline.1.beta=0")
    out = run_training(cfg)
    m = MlflowClient(out.tracking_uri).get_run(out.run_id).data.metrics
    assert m["train/kl"] == 0.0  # beta = 0: no reference model, no KL term
    assert -1.0 <= m["train/reward/mae"] <= 0.0
    assert math.isfinite(m["test/all/mae"])


def test_lora_chain_with_a_user_reward(tmp_path, ray_cluster):
    """LoRA through both stages (SFT adapters merged before GRPO trains fresh ones; the KL reference is
    the policy with its adapters disabled), with a user's reward named as module:function that reads
    the dataset's columns. A random-init model learns little through adapters alone, so the reward is
    one that varies before the answer format is learned."""
    cfg = make_cfg(tmp_path, "name=lora", "pipeline=sft:ce -> grpo:tests.custom_rewards:brevity", *GRPO_SMALL,
                   "model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32", "pipeline.0.lr=1e-2",
                   "pipeline.1.lr=1e-2")
    out = run_training(cfg)
    run = MlflowClient(out.tracking_uri).get_run(out.run_id)
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert m["train/reward/tests.custom_rewards:brevity"] < 0 and m["train/advantage/std"] > 0
    assert m["train/kl"] > 0  # the GRPO adapters moved the policy away from its (adapter-free) reference
    assert math.isfinite(m["test/all/mae"])
    assert run.data.params["model.lora.r"] == "16"
    assert run.data.params["pipeline"] == "sft:ce -> grpo:tests.custom_rewards:brevity"


def test_zero3_chain_resumes_mid_grpo_with_its_reference(tmp_path, ray_cluster):
    """ZeRO-3 end to end: the SFT weights are gathered for GRPO, the partitioned reference is saved in
    the checkpoint, and a restart resumes mid-GRPO into the same MLflow run."""
    # A stage's last step always checkpoints, so the first run leaves one at GRPO step 2; SFT checkpoints
    # only twice (ZeRO-3 saves are the slow part of this test).
    common = ["name=z3", "pipeline=sft:ce -> grpo:mae", *GRPO_SMALL, "deepspeed.zero_stage=3",
              "checkpoint.every_steps=30"]
    first = run_training(make_cfg(tmp_path, *common, "pipeline.1.steps=2"))
    client = MlflowClient(first.tracking_uri)
    client.set_terminated(first.run_id, status="FAILED")  # as if it had been interrupted after GRPO step 2
    # a longer GRPO stage is a changed config: resumed only when allowed
    second = run_training(make_cfg(tmp_path, *common, "pipeline.1.steps=4"), allow_changed_resume=True)
    assert second.run_id == first.run_id
    run = client.get_run(second.run_id)
    assert run.data.tags["orchestrator.resumed_from"] == "stage 1 step 2"
    steps = [s for s, _ in metric_history(second.tracking_uri, second.run_id, "train/reward/mae")]
    assert steps == [62, 64]  # no GRPO step re-run, none missing
    assert run.data.metrics["train/kl"] > 0 and math.isfinite(run.data.metrics["test/all/mae"])

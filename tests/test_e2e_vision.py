"""End to end on CPU, 2 Ray Train workers, ZeRO-2: tiny vision-language models through the same SFT, GRPO
and evaluation code as text models, and RvTC (the K-bin head) on text and on images."""

import math

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from test_e2e_train import make_cfg, metric_history

from orchestrator.methods.answers import parse_answer
from orchestrator.runtime.driver import run_training

pytestmark = pytest.mark.e2e

# 400 small canvases (64 px, up to 20 digits of 8 px) seen at 32 px by a tiny encoder: 4 image tokens.
DIGITS = [
    "data.name=digit-count", "data.digit_count.num_images=400", "data.digit_count.canvas_size=64",
    "data.digit_count.digit_size=8", "data.digit_count.min_gap=2", "data.max_per_label=3",
    "data.many_threshold=30", "data.few_threshold=8", "data.train_size=null",
    "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.hidden_size=32",
    "model.vision.intermediate_size=64", "eval.max_samples=24",
]
REGIONS = ("all", "many", "medium", "few")


def assert_dir_metrics(run, parse_fail_max: float) -> None:
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    for split in ("val", "test"):
        for region in REGIONS:
            assert m[f"{split}/{region}/count"] > 0, (split, region)  # every region is populated here
            assert math.isfinite(m[f"{split}/{region}/mae"]) and math.isfinite(m[f"{split}/{region}/gm"])
        for key in ("rmse", "ccc", "std_ratio", "exact", "parse_fail_rate"):
            assert f"{split}/all/{key}" in m, key
    assert m["test/all/parse_fail_rate"] <= parse_fail_max


def test_vlm_sft_then_grpo_ccc_on_digit_count(tmp_path, ray_cluster):
    """Qwen2-VL-style: images in SFT batches, in the B x G rollout and its log-probs, and in greedy eval."""
    cfg = make_cfg(
        tmp_path, "name=vlm-ccc", "pipeline=sft:ce -> grpo:ccc+format", *DIGITS, "model.tiny.architecture=qwen2-vl",
        "pipeline.0.steps=40", "pipeline.0.lr=3e-3", "pipeline.0.micro_batch_size=8",
        "pipeline.0.lr_schedule=constant",  # a decaying rate does not teach the format in 40 steps
        "pipeline.1.steps=2", "pipeline.1.micro_batch_size=3", "pipeline.1.group_size=3",
        "pipeline.1.max_new_tokens=20", "pipeline.1.lr=1e-4", "eval.max_new_tokens=20",
        "tracking.log_every=2", "checkpoint.every_steps=100",
    )
    out = run_training(cfg)
    run = MlflowClient(out.tracking_uri).get_run(out.run_id)
    assert_dir_metrics(run, parse_fail_max=0.5)  # 40 SFT steps teach the answer format
    m = run.data.metrics
    losses = [v for _, v in metric_history(out.tracking_uri, out.run_id, "train/loss")][:20]  # the SFT part
    assert losses[-1] < 0.6 * losses[0], losses
    assert [s for s, _ in metric_history(out.tracking_uri, out.run_id, "train/reward/ccc")] == [42]
    # sampled at temperature 1 after 40 SFT steps: some rollouts parse, so the group advantages carry signal
    assert m["train/parse_fail_rate"] < 0.9 and m["train/reward/format"] > 0 and m["train/advantage/std"] > 0
    assert math.isfinite(m["train/kl"]) and m["train/effective_batch_prompts"] == 3
    assert run.data.params["pipeline"] == "sft:ce -> grpo:ccc+format"
    assert run.data.params["model.tiny.architecture"] == "qwen2-vl"


def test_rvtc_on_text(tmp_path, ray_cluster):
    """The regression head on a text model (movies): trained through DeepSpeed, evaluated without
    generating, logged like every other pipeline."""
    cfg = make_cfg(
        tmp_path, "name=rvtc-text", "pipeline=sft:rvtc", "pipeline.0.steps=40", "pipeline.0.lr=3e-3",
        "pipeline.0.lr_schedule=constant", "pipeline.0.micro_batch_size=8", "checkpoint.every_steps=20",
    )
    out = run_training(cfg)
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(out.run_id)
    assert_dir_metrics(run, parse_fail_max=0.0)  # nothing to parse: the head always answers
    losses = [v for _, v in metric_history(out.tracking_uri, out.run_id, "train/loss")]
    # The zero-initialised head starts uniform over the 51 bins (loss log 51); it learns at least the
    # label distribution, whose entropy is well below that.
    assert losses[0] < math.log(51) + 1e-6 and losses[-1] < math.log(51) - 0.3 and losses[-1] < losses[0], losses
    assert run.data.params["pipeline"] == "sft:rvtc" and run.data.params["pipeline.0.rvtc_bins"] == "51"
    local = client.download_artifacts(out.run_id, "predictions/test.parquet", str(tmp_path))
    preds = pq.read_table(local).to_pydict()
    assert len(preds["prediction"]) == 48
    assert all(10 <= p <= 100 for p in preds["prediction"])  # expected bin centres stay in the training range
    assert [parse_answer(c) for c in preds["completion"]] == pytest.approx(preds["prediction"], abs=1e-4)
    assert len(set(round(p, 3) for p in preds["prediction"])) > 1
    assert run.data.metrics["test/all/std_ratio"] > 0


def test_rvtc_on_images_with_lora(tmp_path, ray_cluster):
    """SmolVLM-style model on digit-count, the head trained beside LoRA adapters (the vision tower and
    the language model frozen under them)."""
    cfg = make_cfg(
        tmp_path, "name=rvtc-vlm", "pipeline=sft:rvtc", *DIGITS, "model.tiny.architecture=smolvlm",
        "model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16",
        "pipeline.0.steps=30", "pipeline.0.lr=1e-2", "pipeline.0.micro_batch_size=8", "pipeline.0.rvtc_bins=20",
        "checkpoint.every_steps=15", "tracking.log_every=5",
    )
    out = run_training(cfg)
    run = MlflowClient(out.tracking_uri).get_run(out.run_id)
    assert_dir_metrics(run, parse_fail_max=0.0)
    losses = [v for _, v in metric_history(out.tracking_uri, out.run_id, "train/loss")]
    assert losses[-1] < math.log(20) - 0.5 and losses[-1] < losses[0], losses  # 20 bins: uniform is log 20
    # the long tail: most training canvases hold 1-2 digits, and the head learns that before anything else
    assert run.data.metrics["test/many/mae"] < run.data.metrics["test/few/mae"]
    assert run.data.params["model.lora.enabled"] == "True" and run.data.params["pipeline"] == "sft:rvtc"

"""End to end on CPU: tiny model, 2 Ray Train workers, DeepSpeed ZeRO-2, real `movies` subset.

One Ray cluster for the module (starting one costs seconds); each test has its own MLflow store,
dataset folder and Ray Train storage.
"""

import json
import math
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.config import load_run_config
from orchestrator.runtime.driver import run_training
from orchestrator.runtime.ray_setup import WORKER_MALLOC_TUNABLES

pytestmark = pytest.mark.e2e

TINY_RUN = [
    "data.train_size=600",
    "data.max_per_label=2",
    "data.many_threshold=12",
    "data.few_threshold=4",
    "eval.max_samples=48",
    "eval.batch_size=24",
    "eval.max_new_tokens=24",
    "tracking.log_every=5",
    "scaling.num_workers=2",
    "deepspeed.zero_stage=2",
]


def make_cfg(tmp_path: Path, *overrides: str):
    return load_run_config(
        overrides=[
            *TINY_RUN,
            f"data.root={tmp_path / 'data'}",
            f"storage_path={tmp_path / 'results'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
            *overrides,
        ]
    )


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_sft_run_learns_logs_every_region_and_checkpoints(tmp_path, ray_cluster):
    cfg = make_cfg(
        tmp_path, "name=sft", "pipeline.0.steps=60", "pipeline.0.lr=3e-3", "pipeline.0.micro_batch_size=8",
        "checkpoint.every_steps=30",
    )
    outcome = run_training(cfg)
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    losses = [v for _, v in metric_history(outcome.tracking_uri, outcome.run_id, "train/loss")]
    assert len(losses) == 12 and losses[-1] < 0.6 * losses[0], losses
    for split in ("val", "test"):
        for region in ("all", "many", "medium", "few"):
            assert f"{split}/{region}/mae" in run.data.metrics or run.data.metrics[f"{split}/{region}/count"] == 0
            assert f"{split}/{region}/count" in run.data.metrics
    assert math.isfinite(run.data.metrics["test/few/mae"])
    # 60 steps teach the answer format: most greedy answers parse (a budget too short would make this 1.0)
    assert run.data.metrics["test/all/parse_fail_rate"] < 0.5
    assert run.data.params["pipeline.0.loss"] == "ce"
    # init_ray's worker environment reaches the Ray Train workers, and is kept with the run
    assert run.data.tags["orchestrator.worker_threads"] == "1"
    assert run.data.tags["orchestrator.precision"] == "fp32"  # deepspeed.precision=auto on CPU
    assert run.data.tags["orchestrator.worker_malloc"] == os.environ.get("GLIBC_TUNABLES", WORKER_MALLOC_TUNABLES)
    assert run.data.tags["orchestrator.stage0.grad_average"] == "deepspeed"  # ZeRO-2 partitions its own
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "predictions")}
    assert artifacts == {"predictions/val.parquet", "predictions/test.parquet"}
    plots = {a.path for a in client.list_artifacts(outcome.run_id, "plots/test")}
    assert plots == {f"plots/test/{f}" for f in ("pred_vs_target.png", "mae_per_bin.png", "train_histogram.png")}
    checkpoints = sorted(p for p in (tmp_path / "results" / "sft").glob("checkpoint_*") if p.is_dir())
    assert checkpoints, "no checkpoint written"
    assert any(p.name.startswith("zero_pp_rank_1") for p in checkpoints[-1].rglob("*"))  # both ranks' shards
    # the run's wall time split into phases (what `orchestrator bench --grid` reads)
    t = {
        k[len("time/"):-len("_s")]: v for k, v in run.data.metrics.items() if k.startswith("time/") and k.endswith("_s")
    }
    for phase in ("worker_start", "model_load", "deepspeed_init", "train", "checkpoint", "eval", "tracking",
                  "worker_total", "teardown", "driver_prepare", "driver_fit", "driver_total"):
        assert phase in t and t[phase] >= 0, phase
    assert t["train"] > 0 and t["eval"] > 0
    inside = t["model_load"] + t["deepspeed_init"] + t["train"] + t["checkpoint"] + t["eval"]
    assert inside <= t["worker_total"] <= t["driver_fit"] <= t["driver_total"]
    assert t["worker_start"] + t["worker_total"] + t["teardown"] == pytest.approx(t["driver_fit"], abs=2.0)


def test_zero0_workers_average_gradients_through_shared_memory(tmp_path, ray_cluster):
    """Two ZeRO-0 workers on one machine average their gradients through shared memory: the same training
    (logged losses) as DeepSpeed's gloo all-reduce, and each run records which one it used."""
    losses = {}
    for shared in (True, False):
        cfg = make_cfg(
            tmp_path / str(shared), f"name=z0-{shared}", "deepspeed.zero_stage=0",
            f"deepspeed.shared_memory_grads={str(shared).lower()}", "pipeline.0.steps=20", "pipeline.0.lr=3e-3",
            "pipeline.0.micro_batch_size=8", "checkpoint.every_steps=20", "eval.max_samples=8", "eval.splits=[val]",
        )
        outcome = run_training(cfg)
        run = MlflowClient(outcome.tracking_uri).get_run(outcome.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["orchestrator.stage0.grad_average"] == ("shared memory" if shared else "deepspeed")
        losses[shared] = [v for _, v in metric_history(outcome.tracking_uri, outcome.run_id, "train/loss")]
    assert len(losses[True]) == 4 and losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_restarted_run_resumes_from_checkpoint(tmp_path, ray_cluster):
    """A run stopped after 10 of 20 steps, restarted with the same name and storage, continues at step 10
    into the same MLflow run (its stage made longer: a changed config, so only with allow_changed_resume,
    and the run says what changed)."""
    first = make_cfg(tmp_path, "name=resume", "pipeline.0.steps=10", "checkpoint.every_steps=10")
    out1 = run_training(first)
    # Same run identity, longer stage: Ray Train restores its latest checkpoint (stage 0, step 10).
    second = make_cfg(tmp_path, "name=resume", "pipeline.0.steps=20", "checkpoint.every_steps=10")
    client = MlflowClient(out1.tracking_uri)
    client.set_terminated(out1.run_id, status="FAILED")  # as if it had been interrupted
    out2 = run_training(second, allow_changed_resume=True)
    assert out2.run_id == out1.run_id
    steps = [s for s, _ in metric_history(out2.tracking_uri, out2.run_id, "train/loss")]
    assert steps == [5, 10, 15, 20], steps  # no step re-run, none missing
    tags = client.get_run(out2.run_id).data.tags
    assert tags["orchestrator.resumed_from"] == "stage 0 step 10"
    assert "pipeline.0.steps: 10 -> 20" in json.loads(tags["orchestrator.resume_changes"])[0]["changes"]

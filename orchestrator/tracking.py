"""MLflow naming and logging.

The driver creates (or, on resume, finds) the run; rank 0 of the workers logs into it by id with
an ``MlflowClient``, so no process relies on MLflow's global "active run" state.
Metric names: ``train/...`` per step, ``{split}/{region}/{metric}`` at the end (METHODS §2).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from orchestrator.config import RunConfig, flatten, resolve_path, resolve_storage

RUN_KEY_TAG = "orchestrator.run_key"
PIPELINE_TAG = "orchestrator.pipeline"
SECRET_PATTERN = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store under ./mlruns (artifacts beside it)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{resolve_path('mlruns') / 'mlflow.db'}"


def resolve_tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.tracking_uri or default_tracking_uri()


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return None  # a tracking server decides


def ensure_store(uri: str) -> None:
    """A local SQLite store's folder exists before MLflow opens it (a dry run creates nothing)."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def ensure_experiment(client, name: str, uri: str) -> str:
    ensure_store(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri))
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_key(cfg: RunConfig) -> str:
    """Identity of a run across restarts: same storage + name = same MLflow run."""
    return hashlib.sha256(f"{resolve_storage(cfg.storage_path)}::{cfg.name}".encode()).hexdigest()[:16]


def loggable_params(cfg: RunConfig) -> dict[str, str]:
    """Flattened config as MLflow params; anything secret-looking is never logged."""
    params = {}
    for key, value in flatten(cfg).items():
        if SECRET_PATTERN.search(key):
            continue
        text = "" if value is None else str(value)
        params[key] = text[:6000]
    params["pipeline"] = cfg.pipeline_label()
    return params


def start_or_resume_run(cfg: RunConfig, parent_run_id: str | None = None, extra_tags: dict | None = None) -> str:
    """Driver side: the MLflow run for this training run, reused when the same run restarts."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    uri = resolve_tracking_uri(cfg)
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, cfg.tracking.experiment, uri)
    key = run_key(cfg)
    existing = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1, order_by=["attributes.start_time DESC"]
    )
    if existing and existing[0].info.status != "FINISHED":
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "orchestrator.resumed", "true")
        return run_id
    tags = {RUN_KEY_TAG: key, PIPELINE_TAG: cfg.pipeline_label(), "mlflow.runName": cfg.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(extra_tags or {})
    run = client.create_run(exp_id, run_name=cfg.name, tags=tags)
    run_id = run.info.run_id
    params = loggable_params(cfg)
    items = list(params.items())
    for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 90]])
    client.log_text(run_id, cfg.model_dump_json(indent=2), "config/resolved.json")
    return run_id


def finish_run(uri: str, run_id: str, error: BaseException | str | None = None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if error is None:
        client.set_terminated(run_id, status="FINISHED")
    else:
        client.set_tag(run_id, "orchestrator.error", str(error)[:5000])
        client.set_terminated(run_id, status="FAILED")


class RunLogger:
    """Rank-0 logger into an existing run. Non-finite values are skipped (MLflow rejects some)."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[i : i + 900])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), name)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

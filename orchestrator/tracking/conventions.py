"""MLflow conventions in one place: tag names, run identity, store URIs and the client."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from orchestrator.config import RunConfig, resolve_path, resolve_storage

RUN_KEY_TAG = "orchestrator.run_key"
PIPELINE_TAG = "orchestrator.pipeline"


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
    """A local SQLite store exists before MLflow opens it, its schema created by one process at a time:
    two launches opening a new store together otherwise race on MLflow's CREATE INDEX and one dies."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///") :])
    ready = db.parent / f".{db.name}.ready"  # SQLite creates the file before the schema is complete
    if ready.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    from mlflow import MlflowClient

    with open(db.parent / f".{db.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not ready.exists():
            MlflowClient(uri).search_experiments(max_results=1)  # creates, or upgrades, the schema
            ready.touch()


def tracking_client(uri: str):
    """An MlflowClient for `uri`. Constructing one creates (or migrates) a SQLite store's schema, so the
    store is made ready under a lock first; every client in this package comes from here."""
    from mlflow import MlflowClient

    ensure_store(uri)
    return MlflowClient(uri)


def ensure_experiment(client, name: str, uri: str) -> str:
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


SWEEP_TAG = "orchestrator.sweep"
ROLE_TAG = "orchestrator.role"
CELL_TAG = "orchestrator.cell"
BASE_TAG = "orchestrator.base_fingerprint"
PARENT_TAG = "mlflow.parentRunId"
AXES_TAG = "orchestrator.axes"
BASELINE_TAG = "orchestrator.baseline"
BASE_VALUES_TAG = "orchestrator.base_values"

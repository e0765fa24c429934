"""MLflow conventions in one place: the tags this package writes and reads, how runs are named and
found again, store URIs, and the client. Every MLflow name the package uses is spelled here."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import time
from pathlib import Path

from orchestrator.config import RunConfig, resolve_path, resolve_storage

# ---- tags MLflow itself reads (the UI nests and names runs by them)

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"

# ---- tags of every training run

RUN_KEY_TAG = "orchestrator.run_key"  # identity across restarts, see run_key()
PIPELINE_TAG = "orchestrator.pipeline"
ERROR_TAG = "orchestrator.error"  # why a run FAILED (redacted)
RESUMED_TAG = "orchestrator.resumed"
RESUMED_FROM_TAG = "orchestrator.resumed_from"
DAMAGED_CHECKPOINT_TAG = "orchestrator.damaged_checkpoint"  # a latest checkpoint a restore passed over, and why
WORKER_THREADS_TAG = "orchestrator.worker_threads"
WORKER_MALLOC_TAG = "orchestrator.worker_malloc"
WORKER_NODE_TAG = "orchestrator.worker_node"  # the Ray node id where rank 0 last started
PRECISION_TAG = "orchestrator.precision"  # bf16 or fp32: what deepspeed.precision (auto) resolved to on the workers
# "true" when a run's test predictions collapsed (METHODS §6: fewer than 3 distinct values, or a std below 5%
# of the labels'), "false" otherwise; COLLAPSE_REASON_TAG says which.
COLLAPSED_TAG = "orchestrator.collapsed"
COLLAPSE_REASON_TAG = "orchestrator.collapse_reason"
CONFIG_HASH_TAG = "orchestrator.config_hash"  # what the run computes, see config_hash()
WORLD_SIZE_TAG = "orchestrator.world_size"
VERSION_TAG = "orchestrator.version"  # the package version that started the run
RESUME_CHANGES_TAG = "orchestrator.resume_changes"  # what a resume with --allow-changed-resume changed
STOPPED_TAG = "orchestrator.stopped"  # why and where a run stopped early (SIGTERM), with its checkpoint
LEASE_TAG_PREFIX = "orchestrator.lease."  # + run key: an experiment tag naming the process writing that run
# A run's predictions/{split}.parquet keeps the label step (GM's error floor) under this schema metadata key.
PREDICTIONS_LABEL_STEP = b"orchestrator.label_step"

# ---- tags of a sweep: its parent run carries the role, axes, baseline and base; each cell run its cell name

ROLE_TAG = "orchestrator.role"
SWEEP_ROLE = "sweep"  # ROLE_TAG's value on a sweep's parent run
SWEEP_TAG = "orchestrator.sweep"
CELL_TAG = "orchestrator.cell"
AXES_TAG = "orchestrator.axes"
BASELINE_TAG = "orchestrator.baseline"
BASE_VALUES_TAG = "orchestrator.base_values"
BASE_FINGERPRINT_TAG = "orchestrator.base_fingerprint"
GRID_TAG = "orchestrator.grid"  # the grid as a set (sweep.grid.canonical_grid), JSON
GRID_FINGERPRINT_TAG = "orchestrator.grid_fingerprint"
FAILED_CELLS_TAG = "orchestrator.failed_cells"

TAG_VALUE_LIMIT = 5000  # characters kept of a long tag value (an error message); MLflow refuses longer ones


def stage_tag(index: int, what: str) -> str:
    """A fact about one stage of the pipeline: `orchestrator.stage0.grad_average`."""
    return f"orchestrator.stage{index}.{what}"


def tag_equals(tag: str, value: str) -> str:
    """A search_runs filter for runs whose `tag` is `value`."""
    return f"tags.`{tag}` = '{value}'"


def normalize_pipeline(label: str) -> str:
    """`sft:ce→grpo:ccc`, `sft:ce > grpo:ccc` -> `sft:ce -> grpo:ccc`: how params and tags store a pipeline."""
    return " -> ".join(part for part in re.split(r"\s*(?:->|→|>)\s*", label.strip()) if part)


def run_key(cfg: RunConfig) -> str:
    """Identity of a run across restarts: same storage + name = same MLflow run."""
    return hashlib.sha256(f"{resolve_storage(cfg.storage_path)}::{cfg.name}".encode()).hexdigest()[:16]


# Fields that say where a run is kept and logged, not what it computes.
BOOKKEEPING_FIELDS = {"name": True, "storage_path": True, "tracking": True, "timeout_s": True,
                      "data": {"root"}, "model": {"cache_dir"}}


def config_hash(cfg: RunConfig) -> str:
    """Identity of what a run computes: its resolved config without bookkeeping (name, storage, tracking,
    time budget, data root, model cache). Two cells of one config have one hash, however they are named."""
    payload = cfg.model_dump(mode="json", exclude=BOOKKEEPING_FIELDS)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def package_version() -> str:
    """The installed orchestrator's version (a resumed run must be continued by the same code)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orchestrator")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def find_sweep_parent(client, experiment_ids: list[str], sweep: str | None = None):
    """The latest parent run of the sweep named `sweep` (of any sweep when None), or None."""
    query = tag_equals(ROLE_TAG, SWEEP_ROLE)
    if sweep is not None:
        query += " and " + tag_equals(SWEEP_TAG, sweep)
    runs = client.search_runs(experiment_ids, filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


# ---- store URIs

_SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store URI; None for any other store (a tracking server)."""
    return Path(uri[len(_SQLITE) :]) if uri.startswith(_SQLITE) else None


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store under ./mlruns (artifacts beside it)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"{_SQLITE}{resolve_path('mlruns') / 'mlflow.db'}"


def resolve_tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.tracking_uri or default_tracking_uri()


def _artifact_root(uri: str) -> str | None:
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "artifacts").as_uri()  # None: a tracking server decides


# ---- the client


def _mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def ensure_store(uri: str) -> None:
    """A local SQLite store exists before MLflow opens it, its schema created by one process at a time:
    two launches opening a new store together otherwise race on MLflow's CREATE INDEX and one dies."""
    db = sqlite_path(uri)
    if db is None:
        return
    ready = db.parent / f".{db.name}.ready"  # SQLite creates the file before the schema is complete
    if ready.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(db.parent / f".{db.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not ready.exists():
            retry_while_locked(lambda: _mlflow_client(uri).search_experiments(max_results=1))  # creates the schema
            ready.touch()


def tracking_client(uri: str):
    """An MlflowClient for `uri`, its calls retried while a SQLite store is locked by another writer.
    Constructing one creates (or migrates) a SQLite store's schema, so the store is made ready under a lock
    first; every client in this package comes from here."""
    ensure_store(uri)
    return LockRetryingClient(retry_while_locked(_mlflow_client, uri))  # constructing one reads the store too


LOCKED_RETRY_S = 120.0  # how long a call waits out a locked store before its error is raised


def is_store_locked(exc: BaseException) -> bool:
    """SQLite's answer when another process holds the write lock longer than its busy timeout (5 s); the
    transaction was rolled back, so the call can be repeated."""
    return "database is locked" in str(exc)


def retry_while_locked(call, *args, retry_for_s: float = LOCKED_RETRY_S, **kwargs):
    """call(*args, **kwargs), repeated with backoff (0.1 s doubling to 2 s) while the store is locked."""
    deadline, delay = time.monotonic() + retry_for_s, 0.1
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if not is_store_locked(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))  # jittered: many cells do not retry in step
            delay = min(2.0, delay * 2)


class LockRetryingClient:
    """An MlflowClient whose methods retry while the store is locked (retry_while_locked). Many cells of a
    sweep writing one SQLite store at once otherwise fail on a lock that is held a few seconds."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return functools.partial(retry_while_locked, attr)


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

"""The driver's side of an MLflow run: create or resume it, check the store, finish it."""

from __future__ import annotations

import os
import time

from orchestrator.config import RunConfig
from orchestrator.tracking.conventions import (
    ERROR_TAG,
    PARENT_TAG,
    PIPELINE_TAG,
    RESUMED_TAG,
    RUN_KEY_TAG,
    RUN_NAME_TAG,
    TAG_VALUE_LIMIT,
    ensure_experiment,
    resolve_tracking_uri,
    run_key,
    sqlite_path,
    tag_equals,
    tracking_client,
)
from orchestrator.tracking.logger import TrackingUnavailable, _quick_failing_http
from orchestrator.tracking.redaction import loggable_params, redact_secrets, redacted_config_json


def start_or_resume_run(cfg: RunConfig, parent_run_id: str | None = None, extra_tags: dict | None = None) -> str:
    """Driver side: the MLflow run for this training run, reused when the same run restarts."""
    from mlflow.entities import Param

    uri = resolve_tracking_uri(cfg)
    client = tracking_client(uri)
    exp_id = ensure_experiment(client, cfg.tracking.experiment, uri)
    key = run_key(cfg)
    existing = client.search_runs(
        [exp_id], filter_string=tag_equals(RUN_KEY_TAG, key), max_results=1, order_by=["attributes.start_time DESC"]
    )
    if existing and existing[0].info.status != "FINISHED":
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, RESUMED_TAG, "true")
        return run_id
    tags = {RUN_KEY_TAG: key, PIPELINE_TAG: cfg.pipeline_label(), RUN_NAME_TAG: cfg.name}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    tags.update(extra_tags or {})
    run = client.create_run(exp_id, run_name=cfg.name, tags=tags)
    run_id = run.info.run_id
    try:
        items = list(loggable_params(cfg).items())
        for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 90]])
        client.log_text(run_id, redacted_config_json(cfg), "config/resolved.json")
    except Exception as exc:  # never leave a run RUNNING that nothing will finish
        mark_failed(client, run_id, f"{type(exc).__name__}: {exc}")
        raise
    return run_id


def mark_failed(client, run_id: str, error: str) -> None:
    """The run ends FAILED, with the (redacted) error as its ERROR_TAG."""
    client.set_tag(run_id, ERROR_TAG, redact_secrets(error)[:TAG_VALUE_LIMIT])
    client.set_terminated(run_id, status="FAILED")


def check_tracking_store(uri: str) -> None:
    """Before any compute: the store answers (a server that is down is a clear error, not a hang)."""
    from orchestrator.config import ConfigError

    db = sqlite_path(uri)
    if db is not None:  # a local file: writable is enough, and a dry run creates nothing
        folder = db.parent
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not os.access(existing, os.W_OK):
            raise ConfigError(f"the MLflow store {uri} cannot be created: {existing} is not writable")
        return
    _quick_failing_http()
    try:
        tracking_client(uri).search_experiments(max_results=1)  # a server: nothing local is created
    except Exception as exc:
        raise ConfigError(f"cannot reach the MLflow tracking store {uri}: {type(exc).__name__}: {exc}"[:2000]) from None


def finish_run(uri: str, run_id: str, error: BaseException | str | None = None, retry_for_s: float = 60.0) -> None:
    """Mark the run FINISHED, or FAILED with the error as a tag; retried while the store is unreachable
    (a run is never left RUNNING because the store blinked at the end)."""
    _quick_failing_http()
    client = tracking_client(uri)
    deadline, delay = time.time() + retry_for_s, 1.0
    while True:
        try:
            if error is None:
                client.set_terminated(run_id, status="FINISHED")
            else:
                mark_failed(client, run_id, str(error))
            return
        except Exception as exc:
            if time.time() + delay > deadline:
                raise TrackingUnavailable(
                    f"could not mark run {run_id} {'FAILED' if error else 'FINISHED'} in {uri}: {exc}"
                ) from exc
            time.sleep(delay)
            delay = min(15.0, delay * 2)

"""The driver's side of an MLflow run: create or resume it, check the store, finish it."""

from __future__ import annotations

import json
import os
import re
import time

from orchestrator.config import ConfigError, RunConfig
from orchestrator.tracking.conventions import (
    CONFIG_HASH_TAG,
    ERROR_TAG,
    PARENT_TAG,
    PIPELINE_TAG,
    RESUME_CHANGES_TAG,
    RESUMED_TAG,
    RUN_KEY_TAG,
    RUN_NAME_TAG,
    STOPPED_TAG,
    TAG_VALUE_LIMIT,
    VERSION_TAG,
    WORLD_SIZE_TAG,
    config_hash,
    ensure_experiment,
    package_version,
    resolve_tracking_uri,
    run_key,
    sqlite_path,
    tag_equals,
    tracking_client,
)
from orchestrator.tracking.logger import TrackingUnavailable, _quick_failing_http
from orchestrator.tracking.redaction import loggable_params, redact_secrets, redacted_config_json


def identity_tags(cfg: RunConfig) -> dict[str, str]:
    """What a resume is checked against: the config's hash, the world size and the package version."""
    return {CONFIG_HASH_TAG: config_hash(cfg), WORLD_SIZE_TAG: str(cfg.scaling.num_workers),
            VERSION_TAG: package_version()}


# Params that may differ on a resume without changing what the run computes (see config_hash).
_BOOKKEEPING_PARAM = re.compile(r"^(name|storage_path|timeout_s|data\.root|model\.cache_dir|tracking\..*)$")


def resume_changes(cfg: RunConfig, run) -> list[str]:
    """How `cfg` differs from the unfinished run it would continue: one line per changed config field
    (old -> new, from the run's params), the world size and the package version. A run that predates these
    tags is not compared."""
    tags, changes = run.data.tags, []
    if tags.get(CONFIG_HASH_TAG) not in (None, config_hash(cfg)):
        params = loggable_params(cfg)
        fields = [f"{k}: {run.data.params.get(k, '(unset)')} -> {v}" for k, v in sorted(params.items())
                  if not _BOOKKEEPING_PARAM.match(k) and run.data.params.get(k) != v]
        changes += fields or [f"the config (hash {tags[CONFIG_HASH_TAG]} -> {config_hash(cfg)})"]
    if tags.get(WORLD_SIZE_TAG) not in (None, str(cfg.scaling.num_workers)):
        changes.append(f"world size: {tags[WORLD_SIZE_TAG]} -> {cfg.scaling.num_workers} workers")
    if tags.get(VERSION_TAG) not in (None, package_version()):
        changes.append(f"orchestrator version: {tags[VERSION_TAG]} -> {package_version()}")
    return changes


def refuse_changed_resume(cfg: RunConfig, run, allow_changed: bool) -> list[str]:
    """The changes a resume of `run` would make; a ConfigError listing them unless `allow_changed`."""
    changes = resume_changes(cfg, run)
    if changes and not allow_changed:
        raise ConfigError(
            f"run {cfg.name!r} ({run.info.run_id}, {run.info.status}) would resume with a different setup:\n"
            + "\n".join(f"  {c}" for c in changes)
            + "\nits checkpoints were written by the old one (a new world size reorders the data under ZeRO-0 "
            "and cannot load under ZeRO-1..3). Restore the old setup, give the run another name, or pass "
            "--allow-changed-resume to continue anyway (the run is tagged with what changed)"
        )
    return changes


def unfinished_run(client, exp_id: str, cfg: RunConfig):
    """The latest run with this run's key if it is not FINISHED (a restart continues it), else None."""
    existing = client.search_runs(
        [exp_id], filter_string=tag_equals(RUN_KEY_TAG, run_key(cfg)), max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return existing[0] if existing and existing[0].info.status != "FINISHED" else None


def check_can_start(cfg: RunConfig, allow_changed: bool = False) -> None:
    """Read only, before compute: refuse to start a run that another live process writes (its lease), or a
    restart whose setup differs from the run it would continue (unless `allow_changed`)."""
    from orchestrator.tracking.lease import RunLease

    client = tracking_client(resolve_tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:  # nothing of this run exists yet
        return
    RunLease(client, exp.experiment_id, run_key(cfg), f"run {cfg.name!r}").refuse_if_held()
    run = unfinished_run(client, exp.experiment_id, cfg)
    if run is not None:
        refuse_changed_resume(cfg, run, allow_changed)


def run_lease(cfg: RunConfig):
    """The lease of this run (tracking/lease.py), in its experiment (created if missing)."""
    from orchestrator.tracking.lease import RunLease

    uri = resolve_tracking_uri(cfg)
    client = tracking_client(uri)
    return RunLease(client, ensure_experiment(client, cfg.tracking.experiment, uri), run_key(cfg), f"run {cfg.name!r}")


def start_or_resume_run(cfg: RunConfig, parent_run_id: str | None = None, extra_tags: dict | None = None,
                        allow_changed_resume: bool = False) -> str:
    """Driver side: the MLflow run for this training run, reused when the same run restarts (its setup
    unchanged, or `allow_changed_resume`; the caller holds the run's lease)."""
    uri = resolve_tracking_uri(cfg)
    client = tracking_client(uri)
    exp_id = ensure_experiment(client, cfg.tracking.experiment, uri)
    existing = unfinished_run(client, exp_id, cfg)
    if existing is not None:
        run_id = existing.info.run_id
        changes = refuse_changed_resume(cfg, existing, allow_changed_resume)
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, RESUMED_TAG, "true")
        if changes:
            record_resume_changes(client, existing, cfg, changes)
        return run_id
    tags = {RUN_KEY_TAG: run_key(cfg), PIPELINE_TAG: cfg.pipeline_label(), RUN_NAME_TAG: cfg.name,
            **identity_tags(cfg)}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    tags.update(extra_tags or {})
    run = client.create_run(exp_id, run_name=cfg.name, tags=tags)
    run_id = run.info.run_id
    try:
        log_params(client, run_id, cfg)
        client.log_text(run_id, redacted_config_json(cfg), "config/resolved.json")
    except Exception as exc:  # never leave a run RUNNING that nothing will finish
        mark_failed(client, run_id, f"{type(exc).__name__}: {exc}")
        raise
    return run_id


def log_params(client, run_id: str, cfg: RunConfig) -> None:
    from mlflow.entities import Param

    items = list(loggable_params(cfg).items())
    for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 90]])


def record_resume_changes(client, run, cfg: RunConfig, changes: list[str]) -> None:
    """A resume that changed the setup: MLflow params cannot change, so the new config is logged as
    `config/resolved-<n>.json` (n = 1, 2, ... per changed resume), what changed is appended to
    RESUME_CHANGES_TAG, and the identity tags take the new values."""
    previous = run.data.tags.get(RESUME_CHANGES_TAG)
    history = json.loads(previous) if previous else []
    history.append({"revision": len(history) + 1, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes})
    client.log_text(run.info.run_id, redacted_config_json(cfg), f"config/resolved-{len(history)}.json")
    text = json.dumps(history)
    while len(text) > TAG_VALUE_LIMIT and len(history) > 1:  # the latest revisions are kept
        history = history[1:]
        text = json.dumps(history)
    client.set_tag(run.info.run_id, RESUME_CHANGES_TAG, redact_secrets(text)[:TAG_VALUE_LIMIT])
    for key, value in identity_tags(cfg).items():
        client.set_tag(run.info.run_id, key, value)


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


def mark_stopped(client, run_id: str, reason: str) -> None:
    """The run ends KILLED: stopped on request at a checkpoint it can resume from, the reason as STOPPED_TAG."""
    client.set_tag(run_id, STOPPED_TAG, redact_secrets(reason)[:TAG_VALUE_LIMIT])
    client.set_terminated(run_id, status="KILLED")


def finish_run(uri: str, run_id: str, error: BaseException | str | None = None, retry_for_s: float = 60.0,
               stopped: str | None = None) -> None:
    """Mark the run FINISHED, FAILED with the error as a tag, or KILLED with why it `stopped`; retried while
    the store is unreachable (a run is never left RUNNING because the store blinked at the end)."""
    _quick_failing_http()
    client = tracking_client(uri)
    deadline, delay = time.time() + retry_for_s, 1.0
    status = "KILLED" if stopped else "FAILED" if error is not None else "FINISHED"
    while True:
        try:
            if stopped:
                mark_stopped(client, run_id, stopped)
            elif error is not None:
                mark_failed(client, run_id, str(error))
            else:
                client.set_terminated(run_id, status="FINISHED")
            return
        except Exception as exc:
            if time.time() + delay > deadline:
                raise TrackingUnavailable(f"could not mark run {run_id} {status} in {uri}: {exc}") from exc
            time.sleep(delay)
            delay = min(15.0, delay * 2)

"""A sweep's MLflow parent run, and which of its cells already finished."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.config import ConfigError
from orchestrator.sweep.grid import AblationConfig, GridCell, show_value
from orchestrator.tracking.conventions import (
    AXES_TAG,
    BASE_FINGERPRINT_TAG,
    BASE_VALUES_TAG,
    BASELINE_TAG,
    ROLE_TAG,
    RUN_KEY_TAG,
    RUN_NAME_TAG,
    SWEEP_ROLE,
    SWEEP_TAG,
    ensure_experiment,
    find_sweep_parent,
    normalize_pipeline,
    run_key,
    tag_equals,
    tracking_client,
)
from orchestrator.tracking.redaction import redact_secrets


def _parent_tags(ablation: AblationConfig, base: dict[str, Any], fingerprint: str) -> dict[str, str]:
    """What the tables read back from the parent run: the swept fields, their base values, the baseline."""
    tags = {
        ROLE_TAG: SWEEP_ROLE,
        SWEEP_TAG: ablation.name,
        AXES_TAG: json.dumps(ablation.swept_fields()),
        BASE_VALUES_TAG: redact_secrets(json.dumps(base, default=str)),
        BASE_FINGERPRINT_TAG: fingerprint,
        RUN_NAME_TAG: ablation.name,
    }
    if ablation.baseline:
        tags[BASELINE_TAG] = normalize_pipeline(ablation.baseline)
    return tags


def _refuse_conflicts(existing, ablation: AblationConfig, experiment: str, resume: bool, fingerprint: str) -> None:
    """An earlier invocation's parent run may be continued only with --resume and the same base."""
    if not resume:
        raise ConfigError(
            f"sweep {ablation.name!r} already has a parent run {existing.info.run_id} "
            f"({existing.info.status}) in experiment {experiment!r}: rerun with --resume to finish only "
            "the missing cells, or give the ablation another name"
        )
    before = existing.data.tags.get(BASE_FINGERPRINT_TAG)
    if before and before != fingerprint:
        raise ConfigError(
            f"sweep {ablation.name!r}: its base config or overrides changed since it started "
            f"(fingerprint {before} -> {fingerprint}); resuming would mix two bases in one table. "
            "Restore them, or give the ablation another name"
        )


def check_parent(ablation: AblationConfig, uri: str, experiment: str, resume: bool, fingerprint: str) -> None:
    """open_parent's refusals, made before the cluster starts and without writing to the store."""
    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    existing = find_sweep_parent(client, [exp.experiment_id], ablation.name) if exp is not None else None
    if existing is not None:
        _refuse_conflicts(existing, ablation, experiment, resume, fingerprint)


def _reopen(client, existing, ablation: AblationConfig, experiment: str, resume: bool, fingerprint: str) -> str:
    """The parent run of an earlier invocation, RUNNING again: only with --resume and the same base."""
    _refuse_conflicts(existing, ablation, experiment, resume, fingerprint)
    client.update_run(existing.info.run_id, status="RUNNING")
    return existing.info.run_id


def open_parent(ablation: AblationConfig, ablation_text: str, cells: list[GridCell], base: dict[str, Any],
                uri: str, experiment: str, resume: bool, fingerprint: str) -> str:
    """The sweep's parent run: found again on --resume, refused without it (nothing is overwritten)."""
    client = tracking_client(uri)
    exp_id = ensure_experiment(client, experiment, uri)
    existing = find_sweep_parent(client, [exp_id], ablation.name)
    if existing is not None:
        return _reopen(client, existing, ablation, experiment, resume, fingerprint)
    run = client.create_run(exp_id, run_name=ablation.name, tags=_parent_tags(ablation, base, fingerprint))
    run_id = run.info.run_id
    client.log_text(run_id, redact_secrets(ablation_text), "ablation/ablation.yaml")
    listing = [{"name": c.name, **{k: show_value(v) for k, v in c.values.items()}} for c in cells]
    client.log_dict(run_id, listing, "ablation/cells.json")
    return run_id


def finished_cells(cells: list[GridCell], uri: str, experiment: str) -> set[str]:
    """Names of cells whose MLflow run is FINISHED (the run key is storage + name, as for a single run)."""
    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    done = set()
    for cell in cells:
        query = tag_equals(RUN_KEY_TAG, run_key(cell.cfg)) + " and attributes.status = 'FINISHED'"
        if client.search_runs([exp.experiment_id], filter_string=query, max_results=1):
            done.add(cell.name)
    return done

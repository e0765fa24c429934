"""A sweep's MLflow parent run, and which of its cells already finished."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.config import (
    ConfigError,
)
from orchestrator.sweep.grid import AblationConfig, Cell, _show, normalize_pipeline
from orchestrator.tracking.conventions import BASE_TAG, ROLE_TAG, SWEEP_TAG, tracking_client
from orchestrator.tracking.redaction import redact_secrets


def find_parent(client, experiment_id: str, sweep: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'sweep' and tags.`{SWEEP_TAG}` = '{sweep}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def open_parent(ablation: AblationConfig, ablation_text: str, cells: list[Cell], base: dict[str, Any],
                uri: str, experiment: str, resume: bool, fingerprint: str) -> str:
    """The sweep's parent run: found again on --resume, refused without it (nothing is overwritten)."""

    from orchestrator.tracking.conventions import ensure_experiment

    client = tracking_client(uri)
    exp_id = ensure_experiment(client, experiment, uri)
    existing = find_parent(client, exp_id, ablation.name)
    if existing is not None:
        if not resume:
            raise ConfigError(
                f"sweep {ablation.name!r} already has a parent run {existing.info.run_id} "
                f"({existing.info.status}) in experiment {experiment!r}: rerun with --resume to finish only "
                "the missing cells, or give the ablation another name"
            )
        before = existing.data.tags.get(BASE_TAG)
        if before and before != fingerprint:
            raise ConfigError(
                f"sweep {ablation.name!r}: its base config or overrides changed since it started "
                f"(fingerprint {before} -> {fingerprint}); resuming would mix two bases in one table. "
                "Restore them, or give the ablation another name"
            )
        client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    tags = {
        ROLE_TAG: "sweep",
        SWEEP_TAG: ablation.name,
        "orchestrator.axes": json.dumps(ablation.swept_fields()),
        "orchestrator.base_values": redact_secrets(json.dumps(base, default=str)),
        BASE_TAG: fingerprint,
        "mlflow.runName": ablation.name,
    }
    if ablation.baseline:
        tags["orchestrator.baseline"] = normalize_pipeline(ablation.baseline)
    run = client.create_run(exp_id, run_name=ablation.name, tags=tags)
    client.log_text(run.info.run_id, redact_secrets(ablation_text), "ablation/ablation.yaml")
    client.log_dict(run.info.run_id, [{"name": c.name, **{k: _show(v) for k, v in c.values.items()}} for c in cells],
                    "ablation/cells.json")
    return run.info.run_id


def finished_cells(cells: list[Cell], uri: str, experiment: str) -> set[str]:
    """Names of cells whose MLflow run is FINISHED (the run key is storage + name, as for a single run)."""

    from orchestrator.tracking.conventions import RUN_KEY_TAG, run_key

    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    done = set()
    for cell in cells:
        runs = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key(cell.cfg)}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        if runs:
            done.add(cell.name)
    return done

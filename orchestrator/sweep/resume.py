"""A sweep's MLflow parent run, and which of its cells already finished."""

from __future__ import annotations

import json
import time
from typing import Any

from orchestrator.config import ConfigError
from orchestrator.sweep.grid import (
    AblationConfig,
    GridCell,
    canonical_grid,
    grid_changes,
    grid_fingerprint,
    show_value,
)
from orchestrator.tracking.conventions import (
    AXES_TAG,
    BASE_FINGERPRINT_TAG,
    BASE_VALUES_TAG,
    BASELINE_TAG,
    CELL_TAG,
    CONFIG_HASH_TAG,
    GRID_FINGERPRINT_TAG,
    GRID_TAG,
    RESUME_CHANGES_TAG,
    ROLE_TAG,
    RUN_KEY_TAG,
    RUN_NAME_TAG,
    SWEEP_ROLE,
    SWEEP_TAG,
    TAG_VALUE_LIMIT,
    config_hash,
    ensure_experiment,
    find_sweep_parent,
    normalize_pipeline,
    run_key,
    tag_equals,
    tracking_client,
)
from orchestrator.tracking.lease import RunLease
from orchestrator.tracking.redaction import redact_secrets


def _parent_tags(ablation: AblationConfig, base: dict[str, Any], fingerprint: str) -> dict[str, str]:
    """What the tables read back from the parent run (the swept fields, their base values, the baseline), and
    what a resume is checked against (the base's fingerprint, the grid)."""
    tags = {
        ROLE_TAG: SWEEP_ROLE,
        SWEEP_TAG: ablation.name,
        AXES_TAG: json.dumps(ablation.swept_fields()),
        BASE_VALUES_TAG: redact_secrets(json.dumps(base, default=str)),
        BASE_FINGERPRINT_TAG: fingerprint,
        RUN_NAME_TAG: ablation.name,
        **_grid_tags(ablation),
    }
    if ablation.baseline:
        tags[BASELINE_TAG] = normalize_pipeline(ablation.baseline)
    return tags


def _grid_tags(ablation: AblationConfig) -> dict[str, str]:
    text = redact_secrets(json.dumps(canonical_grid(ablation), sort_keys=True))
    tags = {GRID_FINGERPRINT_TAG: grid_fingerprint(ablation)}
    if len(text) <= TAG_VALUE_LIMIT:  # a grid too long for a tag is compared by its fingerprint alone
        tags[GRID_TAG] = text
    return tags


def _changes(existing, ablation: AblationConfig, fingerprint: str) -> tuple[list[str], list[str]]:
    """(how the base changed, how the grid changed) since the parent run started; empty when unchanged
    or when the parent predates the tag."""
    tags = existing.data.tags
    base = tags.get(BASE_FINGERPRINT_TAG)
    base_changes = [f"base config or overrides: fingerprint {base} -> {fingerprint}"] if base and base != fingerprint \
        else []
    grid_before = tags.get(GRID_FINGERPRINT_TAG)
    grid_changes_ = []
    if grid_before and grid_before != grid_fingerprint(ablation):
        before = json.loads(tags[GRID_TAG]) if GRID_TAG in tags else None
        grid_changes_ = grid_changes(before, canonical_grid(ablation)) if before else []
        grid_changes_ = grid_changes_ or [f"grid: fingerprint {grid_before} -> {grid_fingerprint(ablation)}"]
    return base_changes, grid_changes_


def _refuse_conflicts(existing, ablation: AblationConfig, experiment: str, resume: bool, fingerprint: str,
                      allow_changed: bool = False) -> list[str]:
    """An earlier invocation's parent run may be continued only with --resume and the same base and grid
    (or, with --allow-changed-resume, a changed one: the changes are returned)."""
    if not resume:
        raise ConfigError(
            f"sweep {ablation.name!r} already has a parent run {existing.info.run_id} "
            f"({existing.info.status}) in experiment {experiment!r}: rerun with --resume to finish only "
            "the missing cells, or give the ablation another name"
        )
    base_changes, grid_changes_ = _changes(existing, ablation, fingerprint)
    if allow_changed:
        return base_changes + grid_changes_
    if base_changes:
        raise ConfigError(
            f"sweep {ablation.name!r}: its base config or overrides changed since it started "
            f"({base_changes[0].split(': ', 1)[1]}); resuming would mix two bases in one table. "
            "Restore them, give the ablation another name, or pass --allow-changed-resume"
        )
    if grid_changes_:
        raise ConfigError(
            f"sweep {ablation.name!r}: its grid changed since it started:\n"
            + "\n".join(f"  {c}" for c in grid_changes_)
            + "\nrestore it, give the ablation another name, or pass --allow-changed-resume "
            "(the parent run is tagged with what changed)"
        )
    return []


def sweep_lease(client, experiment_id: str, ablation: AblationConfig) -> RunLease:
    """The lease of the sweep's parent run: one driver runs a sweep at a time."""
    return RunLease(client, experiment_id, f"sweep.{ablation.name}", f"sweep {ablation.name!r}")


def check_parent(ablation: AblationConfig, uri: str, experiment: str, resume: bool, fingerprint: str,
                 allow_changed: bool = False) -> None:
    """open_parent's refusals, made before the cluster starts and without writing to the store: another
    driver running the sweep, a rerun without --resume, a changed base or grid."""
    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    sweep_lease(client, exp.experiment_id, ablation).refuse_if_held()
    existing = find_sweep_parent(client, [exp.experiment_id], ablation.name)
    if existing is not None:
        _refuse_conflicts(existing, ablation, experiment, resume, fingerprint, allow_changed)


def _reopen(client, existing, ablation: AblationConfig, experiment: str, resume: bool, fingerprint: str,
            allow_changed: bool) -> str:
    """The parent run of an earlier invocation, RUNNING again: only with --resume and the same base and grid,
    or with allow_changed (then tagged with what changed, its base and grid tags updated)."""
    changes = _refuse_conflicts(existing, ablation, experiment, resume, fingerprint, allow_changed)
    run_id = existing.info.run_id
    client.update_run(run_id, status="RUNNING")
    if changes:
        previous = json.loads(existing.data.tags.get(RESUME_CHANGES_TAG) or "[]")
        entry = {"revision": len(previous) + 1, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes}
        client.set_tag(run_id, RESUME_CHANGES_TAG, json.dumps([*previous, entry])[-TAG_VALUE_LIMIT:])
        for key, value in {BASE_FINGERPRINT_TAG: fingerprint, AXES_TAG: json.dumps(ablation.swept_fields()),
                           **_grid_tags(ablation)}.items():
            client.set_tag(run_id, key, value)
    return run_id


def open_parent(ablation: AblationConfig, ablation_text: str, cells: list[GridCell], base: dict[str, Any],
                uri: str, experiment: str, resume: bool, fingerprint: str, *, allow_changed: bool = False) -> str:
    """The sweep's parent run: found again on --resume, refused without it (nothing is overwritten)."""
    client = tracking_client(uri)
    exp_id = ensure_experiment(client, experiment, uri)
    existing = find_sweep_parent(client, [exp_id], ablation.name)
    if existing is not None:
        return _reopen(client, existing, ablation, experiment, resume, fingerprint, allow_changed)
    run = client.create_run(exp_id, run_name=ablation.name, tags=_parent_tags(ablation, base, fingerprint))
    run_id = run.info.run_id
    client.log_text(run_id, redact_secrets(ablation_text), "ablation/ablation.yaml")
    listing = [{"name": c.name, **{k: show_value(v) for k, v in c.values.items()}} for c in cells]
    client.log_dict(run_id, listing, "ablation/cells.json")
    return run_id


def _latest_run(client, exp_id: str, query: str):
    runs = client.search_runs([exp_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def match_cells(cells: list[GridCell], uri: str, experiment: str, sweep: str) -> tuple[set[str], list[GridCell]]:
    """(the names of cells already FINISHED, the cells with each unfinished one named as its existing run).
    A cell is found by its config hash among the sweep's runs, so a renamed cell (its axes listed in another
    order by an earlier version) is still the same cell; runs from before the hash tag by run key."""
    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set(), cells
    done, out = set(), []
    for cell in cells:
        same_sweep = tag_equals(SWEEP_TAG, sweep) + " and " + tag_equals(CONFIG_HASH_TAG, config_hash(cell.cfg))
        finished = _latest_run(client, exp.experiment_id, same_sweep + " and attributes.status = 'FINISHED'")
        finished = finished or _latest_run(client, exp.experiment_id, tag_equals(RUN_KEY_TAG, run_key(cell.cfg))
                                           + " and attributes.status = 'FINISHED'")
        if finished is not None:
            done.add(cell.name)
            out.append(cell)
            continue
        earlier = _latest_run(client, exp.experiment_id, same_sweep)
        name = earlier.data.tags.get(CELL_TAG) if earlier is not None else None
        if name and name != cell.name:  # continue the earlier run, in its own folder and MLflow run
            cell = GridCell(cell.index, cell.values, cell.cfg.model_copy(update={"name": name}), cell.inapplicable)
        out.append(cell)
    return done, out


def check_cells(cells: list[GridCell], allow_changed: bool) -> None:
    """Before the cluster starts: no cell's run is written by another process, and none would resume with
    a changed setup (unless allowed)."""
    from orchestrator.tracking.runs import check_can_start

    for cell in cells:
        try:
            check_can_start(cell.cfg, allow_changed)
        except ConfigError as exc:
            raise ConfigError(f"cell {cell.name} ({cell.label()}): {exc}") from None

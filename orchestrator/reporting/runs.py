"""Reading the runs to tabulate from the tracking store: a sweep's cell runs (with what its parent run
says about them), or every finished run of a plain experiment, as a frame in the `mlflow.search_runs`
layout (run_id, experiment_id, status, artifact_uri, start_time, end_time, metrics.*, params.*, tags.*)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from orchestrator.reporting.layout import TablesError
from orchestrator.tracking.conventions import (
    AXES_TAG,
    BASE_VALUES_TAG,
    BASELINE_TAG,
    PARENT_TAG,
    PREDICTIONS_LABEL_STEP,
    ROLE_TAG,
    SWEEP_ROLE,
    SWEEP_TAG,
    find_sweep_parent,
    sqlite_path,
    tag_equals,
    tracking_client,
)

PAGE_SIZE = 10_000  # runs per search request


@dataclass
class RunSource:
    """The runs to tabulate and what the sweep's parent run says about them."""

    runs: pd.DataFrame
    axes: list[str] | None  # None: infer from the runs
    baseline: str | None
    base_values: dict | None
    parent_run_id: str | None
    description: str


def require_store(uri: str) -> None:
    """A local store must exist: opening a missing SQLite file would create an empty one, and a reader
    should say it is not there instead."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TablesError(f"no MLflow store at {db} (tracking URI {uri})")


def search_all_runs(client, experiment_ids: list[str], filter_string: str) -> list:
    """Every run matching the filter, page by page (newest first, as MLflow orders them)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=PAGE_SIZE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def runs_frame(runs: list) -> pd.DataFrame:
    """Runs as the frame `mlflow.search_runs` returns: a column per run attribute, and one per metric,
    param and tag name, with NaN (metrics) or None (params, tags) where a run lacks it."""
    columns: dict[str, list] = {
        "run_id": [r.info.run_id for r in runs],
        "experiment_id": [r.info.experiment_id for r in runs],
        "status": [r.info.status for r in runs],
        "artifact_uri": [r.info.artifact_uri for r in runs],
        "start_time": [pd.to_datetime(r.info.start_time, unit="ms", utc=True) for r in runs],
        "end_time": [pd.to_datetime(r.info.end_time, unit="ms", utc=True) for r in runs],
    }
    for prefix, values_of, missing in (
        ("metrics.", lambda r: r.data.metrics, np.nan),
        ("params.", lambda r: r.data.params, None),
        ("tags.", lambda r: r.data.tags, None),
    ):
        names = sorted({name for r in runs for name in values_of(r)})
        for name in names:
            columns[prefix + name] = [values_of(r).get(name, missing) for r in runs]
    return pd.DataFrame(columns)


def _json_tag(run, tag: str, kind: type):
    text = run.data.tags.get(tag)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise TablesError(f"run {run.info.run_id}: tag {tag} is not JSON: {text!r}") from None
    if not isinstance(value, kind):
        raise TablesError(f"run {run.info.run_id}: tag {tag} should be a JSON {kind.__name__}, got {text!r}")
    return value


def _parent_run(client, exp, parent_run_id: str | None, sweep: str | None):
    """The sweep's parent run: by id, by sweep name (the latest), or the latest of the experiment if any."""
    from mlflow.exceptions import MlflowException

    if parent_run_id:
        try:
            run = client.get_run(parent_run_id)
        except MlflowException:
            raise TablesError(f"no run with id {parent_run_id!r}") from None
        if run.info.experiment_id != exp.experiment_id:
            raise TablesError(f"run {parent_run_id} is not in experiment {exp.name!r}")
        return run
    if sweep and "'" in sweep:
        raise TablesError(f"invalid sweep name {sweep!r}")
    parent = find_sweep_parent(client, [exp.experiment_id], sweep or None)
    if sweep and parent is None:
        raise TablesError(f"no sweep named {sweep!r} in experiment {exp.name!r}")
    return parent


def _experiment(client, name: str, uri: str):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TablesError(f"no experiment named {name!r} at {uri}; experiments there: {', '.join(names) or 'none'}")
    return exp


def _finished_runs(client, exp) -> RunSource:
    """Every FINISHED run of an experiment without a sweep (sweep parents left out)."""
    runs = runs_frame(search_all_runs(client, [exp.experiment_id], "attributes.status = 'FINISHED'"))
    if f"tags.{ROLE_TAG}" in runs:
        runs = runs[runs[f"tags.{ROLE_TAG}"] != SWEEP_ROLE]
    if runs.empty:
        raise TablesError(f"experiment {exp.name!r} has no finished runs")
    return RunSource(runs, None, None, None, None, f"experiment '{exp.name}', {len(runs)} finished runs")


def _cell_runs(client, exp, parent) -> RunSource:
    """A sweep's cell runs, every status (a failed cell keeps its place in the grid), and its parent's tags."""
    pid = parent.info.run_id
    runs = runs_frame(search_all_runs(client, [exp.experiment_id], tag_equals(PARENT_TAG, pid)))
    if runs.empty:
        raise TablesError(f"sweep run {pid} in experiment {exp.name!r} has no cell runs")
    name = parent.data.tags.get(SWEEP_TAG, "?")
    return RunSource(
        runs=runs,
        axes=_json_tag(parent, AXES_TAG, list),
        baseline=parent.data.tags.get(BASELINE_TAG) or None,
        base_values=_json_tag(parent, BASE_VALUES_TAG, dict),
        parent_run_id=pid,
        description=f"experiment '{exp.name}', sweep '{name}' (parent run {pid}), {len(runs)} cell runs",
    )


def load_runs(tracking_uri: str, experiment: str, *, parent_run_id: str | None = None,
              sweep: str | None = None) -> RunSource:
    """Read the runs of one sweep (its parent's nested runs, all statuses so failed cells stay in the grid)
    or, when the experiment has no sweep, every FINISHED run of it."""
    require_store(tracking_uri)
    client = tracking_client(tracking_uri)
    exp = _experiment(client, experiment, tracking_uri)
    parent = _parent_run(client, exp, parent_run_id, sweep)
    return _finished_runs(client, exp) if parent is None else _cell_runs(client, exp, parent)


def load_predictions(tracking_uri: str, run_ids: list[str], split: str) -> dict[str, pd.DataFrame]:
    """Each run's `predictions/{split}.parquet` (id, target, region, scored; the label step in `attrs`),
    for the Δ intervals and the collapse marks. A run without one, or from before the tables needed the
    `scored` column, is left out: its Δ cells then have no interval."""
    import os
    import tempfile

    import pyarrow.parquet as pq

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run would fill the console
    client = tracking_client(tracking_uri)
    out: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in run_ids:
            try:
                path = client.download_artifacts(run_id, f"predictions/{split}.parquet", tmp)
            except Exception:  # noqa: BLE001 - no predictions logged: the table goes without this run's interval
                continue
            table = pq.read_table(path)
            if "scored" not in table.column_names:
                continue
            frame = table.select(["id", "target", "region", "scored"]).to_pandas()
            frame.attrs["label_step"] = float((table.schema.metadata or {}).get(PREDICTIONS_LABEL_STEP, b"1"))
            out[run_id] = frame
    return out

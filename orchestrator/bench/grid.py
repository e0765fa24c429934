"""`orchestrator bench --grid SWEEP`: the wall time and per-cell metrics of a finished sweep, read from MLflow."""

from __future__ import annotations

from orchestrator.bench.settings import BenchError


def load_grid(sweep: str, tracking_uri: str,
              experiment: str | None = None) -> tuple[float, dict[str, dict[str, float]]]:
    """(sweep wall seconds, {cell: metrics}) of the latest sweep named `sweep`."""
    from orchestrator.reporting.runs import require_store
    from orchestrator.tracking.conventions import CELL_TAG, PARENT_TAG, find_sweep_parent, tracking_client

    try:
        require_store(tracking_uri)
    except Exception as exc:
        raise BenchError(str(exc)) from None
    if "'" in sweep:
        raise BenchError(f"invalid sweep name {sweep!r}")
    client = tracking_client(tracking_uri)
    exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    exps = [e for e in exps if e is not None]
    if not exps:
        raise BenchError(f"no experiment {experiment!r} at {tracking_uri}")
    parent = find_sweep_parent(client, [e.experiment_id for e in exps], sweep)
    if parent is None:
        raise BenchError(f"no sweep named {sweep!r} at {tracking_uri}")
    if parent.info.end_time is None:
        raise BenchError(f"sweep {sweep!r} (run {parent.info.run_id}) has not finished")
    wall = (parent.info.end_time - parent.info.start_time) / 1000.0
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    cells = {c.data.tags.get(CELL_TAG) or c.info.run_name or c.info.run_id: dict(c.data.metrics)
             for c in children}
    if not cells:
        raise BenchError(f"sweep {sweep!r} (run {parent.info.run_id}) has no cell runs")
    return wall, cells

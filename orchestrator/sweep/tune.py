"""Running a sweep's cells as Ray Tune trials, then its tables."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import (
    ConfigError,
    RunConfig,
    resolve_path,
    resolve_storage,
)
from orchestrator.engine.storage import Storage
from orchestrator.runtime.stopping import clear_stop, on_sigterm, request_stop, stop_reason
from orchestrator.sweep.grid import (
    AblationConfig,
    GridCell,
    anchor_paths,
    base_fingerprint,
    base_values,
    expand_cells,
    format_cells,
    load_ablation,
    preflight,
)
from orchestrator.sweep.progress import SweepProgress, _tune_callback
from orchestrator.sweep.resume import check_cells, check_parent, match_cells, open_parent, sweep_lease
from orchestrator.tracking.conventions import (
    CELL_TAG,
    FAILED_CELLS_TAG,
    SWEEP_TAG,
    TAG_VALUE_LIMIT,
    default_tracking_uri,
    ensure_experiment,
    normalize_pipeline,
    tracking_client,
)
from orchestrator.tracking.runs import mark_failed, mark_stopped

TRIAL_MEMORY = 64 * 1024**2  # what a Tune trial reserves (it only waits on its TorchTrainer)
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node (1.0 there, absent elsewhere)


def _cell_trial(config: dict[str, Any], cells: list[dict[str, Any]], parent_run_id: str, home: str, max_failures: int,
                allow_changed_resume: bool = False):
    """One Tune trial = one cell: build and fit the cell's TorchTrainer, then report its test metrics. A cell
    that would start after the sweep was asked to stop does not start."""
    from ray import tune

    from orchestrator.runtime.driver import RunStopped, run_training

    os.environ["ORCHESTRATOR_HOME"] = home  # relative paths as the sweep driver saw them, not the trial dir
    cell = cells[config["cell"]]
    cfg = RunConfig.model_validate(cell["config"])
    reason = stop_reason(Storage(cfg.storage_path))
    if reason:
        raise RunStopped(cfg.name, f"{reason}: not started")
    outcome = run_training(
        cfg, parent_run_id=parent_run_id, max_failures=max_failures,
        extra_tags={SWEEP_TAG: cell["sweep"], CELL_TAG: cell["name"]}, allow_changed_resume=allow_changed_resume,
    )
    tune.report({"cell": cell["name"], **{k: v for k, v in outcome.metrics.items() if k.startswith("test/all/")}})


def _cells_at_once(cells: list[GridCell], requested: int | None) -> int:
    import ray

    if requested:
        return requested
    resources = ray.cluster_resources()
    need_cpu = max(c.cfg.scaling.num_workers * c.cfg.scaling.cpus_per_worker for c in cells)
    fits = math.floor(resources.get("CPU", 1) / need_cpu)
    if any(c.cfg.scaling.use_gpu for c in cells):
        need_gpu = max(c.cfg.scaling.num_workers for c in cells if c.cfg.scaling.use_gpu)
        fits = min(fits, math.floor(resources.get("GPU", 0) / need_gpu))
    return max(1, fits)


@dataclass
class SweepPlan:
    """Everything a dry run shows, nothing trained: the ablation, its validated cells, where they log."""

    ablation: AblationConfig
    base_tree: dict[str, Any]  # the base run config with the ablation's and the command line's overrides
    cells: list[GridCell]
    notes: list[str]
    experiment: str
    tracking_uri: str


@dataclass
class SweepOutcome:
    name: str
    experiment: str
    tracking_uri: str
    parent_run_id: str
    cells: int
    skipped: int  # already finished before this invocation
    failed: dict[str, str]
    table_markdown: str
    table_files: list[Path]
    elapsed_s: float


def _anchored(cells: list[GridCell], experiment: str, uri: str, storage_root: str) -> list[GridCell]:
    """Each cell logging to the sweep's experiment and store, its paths absolute (trials run elsewhere)."""
    out = []
    for c in cells:
        tracking = c.cfg.tracking.model_copy(update={"experiment": experiment})
        cfg = anchor_paths(c.cfg.model_copy(update={"tracking": tracking}), uri, storage_root)
        out.append(GridCell(c.index, c.values, cfg, c.inapplicable))
    return out


def plan_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepPlan:
    """Load, expand and preflight: everything a dry run shows, nothing trained."""
    ablation, tree = load_ablation(path, overrides)
    cells, notes = expand_cells(ablation, tree)
    experiment = ablation.experiment or ablation.name
    uri = cells[0].cfg.tracking.tracking_uri or default_tracking_uri()
    if len({c.cfg.tracking.tracking_uri for c in cells}) > 1:
        raise ConfigError(
            f"ablation {ablation.name!r}: every cell must log to one tracking store (tracking.tracking_uri)"
        )
    storage_root = Storage(resolve_storage(cells[0].cfg.storage_path)).uri(ablation.name)
    cells = _anchored(cells, experiment, uri, storage_root)
    preflight(cells)
    return SweepPlan(ablation, tree, cells, notes, experiment, uri)


def _tuner(plan: SweepPlan, todo: list[GridCell], parent: str, progress: SweepProgress, allow_changed: bool):
    """A Tune grid with one trial per cell still to run, as many at once as the cluster fits."""
    from ray import tune

    payload = [{"name": c.name, "sweep": plan.ablation.name, "config": c.cfg.model_dump(mode="json")} for c in todo]
    trainable = tune.with_parameters(
        _cell_trial, cells=payload, parent_run_id=parent, home=str(resolve_path(".")),
        max_failures=plan.ablation.max_failures, allow_changed_resume=allow_changed,
    )
    # The trial only drives its TorchTrainer, whose workers hold the CPUs/GPUs. Even 0.01 CPU per
    # trial would make two 1-CPU cells need 2.02 CPUs of 2 and run one after the other; Tune refuses
    # an empty request, so a trial asks for a little memory instead. It runs on the head node, where the
    # sweep's driver runs: the trial and its Train controller never go down with a worker node (Tune does
    # not restart trials).
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_MEMORY, HEAD_NODE_RESOURCE: 0.001})
    return tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search(list(range(len(todo))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=_cells_at_once(todo, plan.ablation.max_concurrent)),
        run_config=tune.RunConfig(
            name=f"{plan.ablation.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=Storage(todo[0].cfg.storage_path).uri("_tune"),
            callbacks=[_tune_callback(progress)],
            # Restarts are Ray Train's (the ablation's max_failures, from the cell's checkpoint); Tune starting a
            # failed cell again on top would multiply them.
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )


def start_cluster(plan: SweepPlan, out) -> None:
    """Ray up, quiet: the workers' output goes to Ray's log files (all of it with --verbose), the console
    shows the sweep's own view. What the cluster's nodes cannot reach is refused before any cell runs."""
    from orchestrator.runtime.preflight import check_cluster, cluster_spans_nodes
    from orchestrator.runtime.ray_setup import init_ray, verbose, worker_logs_dir

    init_ray(worker_output=False, use_gpu=any(cell.cfg.scaling.use_gpu for cell in plan.cells))
    for cell in plan.cells:
        check_cluster(cell.cfg, plan.tracking_uri, cluster_spans_nodes(cell.cfg))
    if not verbose():
        print(f"workers' output: {worker_logs_dir()} on each node (--verbose prints it here)", file=out, flush=True)


def _run_cells(plan: SweepPlan, todo: list[GridCell], parent: str, done_before: int, out,
               allow_changed: bool = False) -> dict[str, str]:
    """Train the cells in `todo` as Tune trials; returns {failed cell: its error line}."""
    names = {i: c.name for i, c in enumerate(todo)}
    progress = SweepProgress(names, plan.tracking_uri, plan.experiment, done_before, len(plan.cells), out=out)
    failed: dict[str, str] = {}
    for result in _tuner(plan, todo, parent, progress, allow_changed).fit():
        if result.error is not None:
            name = names[result.config["cell"]]
            failed[name] = progress.failed.get(name) or str(result.error).strip().splitlines()[-1][:300]
    return failed


def _sweep_tables(plan: SweepPlan, parent: str) -> tuple[list[Path], str]:
    """(the table files, the paper table's Markdown); when there is no table, the Markdown says why."""
    from orchestrator.reporting.tables import TablesError, default_out_dir, write_tables

    baseline = normalize_pipeline(plan.ablation.baseline) if plan.ablation.baseline else None
    try:
        files = write_tables(plan.tracking_uri, plan.experiment, parent_run_id=parent,
                             out_dir=default_out_dir(plan.ablation.name), baseline=baseline)
    except TablesError as exc:  # e.g. every cell failed: say so, the failures are the news
        return [], f"(no table: {exc})"
    return files.paths, files.markdown


def _sweep_plots(plan: SweepPlan, parent: str) -> None:
    """Learning curves across the cells and each numeric axis against the test metrics, on the parent run.
    Diagnostics: a failure here is a warning, never a failed sweep."""
    from orchestrator.reporting.sweep_plots import sweep_plots
    from orchestrator.reporting.tables import default_out_dir

    try:
        sweep_plots(plan.tracking_uri, plan.experiment, parent, default_out_dir(plan.ablation.name) / "plots")
    except Exception as exc:  # noqa: BLE001
        print(f"warning: sweep plots not made: {type(exc).__name__}: {exc}", file=sys.stderr)


def _close_parent(client, parent: str, failed: dict[str, str]) -> None:
    if failed:
        client.set_tag(parent, FAILED_CELLS_TAG, json.dumps(sorted(failed))[:TAG_VALUE_LIMIT])
        client.set_terminated(parent, status="FAILED")
    else:
        client.set_terminated(parent, status="FINISHED")


def _cells_to_run(plan: SweepPlan, resume: bool, allow_changed: bool, out) -> tuple[set[str], list[GridCell]]:
    """(the cells finished before, the cells to run now), checked before the cluster starts: none is written
    by another process, none would resume with a changed setup (unless allowed)."""
    done, cells = match_cells(plan.cells, plan.tracking_uri, plan.experiment, plan.ablation.name) if resume \
        else (set(), plan.cells)
    todo = [c for c in cells if c.name not in done]
    check_cells(todo, allow_changed)
    if done:
        print(f"resuming: {len(done)} cell(s) already finished, {len(todo)} to run", file=out, flush=True)
    return done, todo


def run_sweep(path: str | Path, overrides: list[str] | None = None, *, resume: bool = False,
              allow_changed_resume: bool = False, out=None) -> SweepOutcome:
    """Plan the sweep, open its parent run (found again with `resume`), train the cells not finished yet,
    write the tables, and close the parent: FAILED when a cell failed or the sweep was interrupted. A SIGTERM
    stops every running cell at its next step boundary with a checkpoint, starts no other, and closes the
    parent KILLED (RunStopped); `--resume` continues from those checkpoints."""
    out = out or sys.stdout
    t0 = time.time()
    plan = plan_sweep(path, overrides)
    ablation, uri = plan.ablation, plan.tracking_uri
    print(format_cells(ablation, plan.cells, plan.notes), file=out, flush=True)
    fingerprint = base_fingerprint(path, ablation, overrides)
    check_parent(ablation, uri, plan.experiment, resume, fingerprint, allow_changed_resume)
    done, todo = _cells_to_run(plan, resume, allow_changed_resume, out)
    start_cluster(plan, out)
    client = tracking_client(uri)
    lease = sweep_lease(client, ensure_experiment(client, plan.experiment, uri), ablation)
    lease.acquire()
    try:
        parent = open_parent(ablation, Path(path).read_text(), plan.cells, base_values(ablation, plan.base_tree),
                             uri, plan.experiment, resume, fingerprint, allow_changed=allow_changed_resume)
        lease.start_heartbeat()
        failed = _train_or_stop(plan, todo, parent, len(done), out, allow_changed_resume)
        files, markdown = _sweep_tables(plan, parent)
        _sweep_plots(plan, parent)
        _close_parent(client, parent, failed)
    finally:
        lease.release()
    return SweepOutcome(ablation.name, plan.experiment, uri, parent, len(plan.cells), len(done), failed, markdown,
                        files, time.time() - t0)


def _train_or_stop(plan: SweepPlan, todo: list[GridCell], parent: str, done_before: int, out,
                   allow_changed: bool) -> dict[str, str]:
    """The cells as Tune trials, a SIGTERM meanwhile turned into a stop of every cell (the sweep's stop
    marker); {failed cell: its error}. An interruption marks the parent FAILED, a stop KILLED (RunStopped)."""
    from orchestrator.runtime.driver import RunStopped

    client = tracking_client(plan.tracking_uri)
    root = Storage(plan.cells[0].cfg.storage_path)
    clear_stop(root)  # a stop requested of an earlier invocation does not stop this one
    try:
        with on_sigterm(lambda reason: request_stop(root, reason)) as signalled:
            failed = _run_cells(plan, todo, parent, done_before, out, allow_changed) if todo else {}
    except BaseException as exc:
        mark_failed(client, parent, f"interrupted: {exc!r}")
        raise
    if signalled:
        reason = f"{signalled['reason']}: running cells stopped at a checkpoint, {len(failed)} not finished"
        mark_stopped(client, parent, reason)
        raise RunStopped(plan.ablation.name, f"{reason}; rerun with --resume to continue")
    return failed

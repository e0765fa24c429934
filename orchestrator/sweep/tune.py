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
from orchestrator.sweep.grid import (
    Cell,
    anchor_paths,
    base_fingerprint,
    base_values,
    expand_cells,
    format_cells,
    load_ablation,
    normalize_pipeline,
    preflight,
)
from orchestrator.sweep.progress import SweepProgress, _tune_callback
from orchestrator.sweep.resume import finished_cells, open_parent
from orchestrator.tracking.conventions import CELL_TAG, SWEEP_TAG, tracking_client
from orchestrator.tracking.redaction import redact_secrets

TRIAL_MEMORY = 64 * 1024**2  # what a Tune trial reserves (it only waits on its TorchTrainer)


def _cell_trial(config: dict[str, Any], cells: list[dict[str, Any]], parent_run_id: str, home: str, max_failures: int):
    """One Tune trial = one cell: build and fit the cell's TorchTrainer, then report its test metrics."""
    from ray import tune

    from orchestrator.runtime.driver import run_training

    os.environ["ORCHESTRATOR_HOME"] = home  # relative paths as the sweep driver saw them, not the trial dir
    cell = cells[config["cell"]]
    cfg = RunConfig.model_validate(cell["config"])
    outcome = run_training(
        cfg, parent_run_id=parent_run_id, max_failures=max_failures,
        extra_tags={SWEEP_TAG: cell["sweep"], CELL_TAG: cell["name"]},
    )
    tune.report({"cell": cell["name"], **{k: v for k, v in outcome.metrics.items() if k.startswith("test/all/")}})


def _cells_at_once(cells: list[Cell], requested: int | None) -> int:
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


def plan_sweep(path: str | Path, overrides: list[str] | None = None):
    """Load, expand and preflight: everything a dry run shows, nothing trained."""
    ablation, tree = load_ablation(path, overrides)
    cells, notes = expand_cells(ablation, tree)
    experiment = ablation.experiment or ablation.name
    from orchestrator.tracking.conventions import default_tracking_uri

    uri = cells[0].cfg.tracking.tracking_uri or default_tracking_uri()
    if len({c.cfg.tracking.tracking_uri for c in cells}) > 1:
        raise ConfigError(f"ablation {ablation.name!r}: every cell must log to one tracking store (tracking.tracking_uri)")
    storage_root = resolve_storage(str(Path(cells[0].cfg.storage_path) / ablation.name))
    cells = [
        Cell(c.index, c.values, anchor_paths(c.cfg.model_copy(update={"tracking": c.cfg.tracking.model_copy(update={"experiment": experiment})}),
                                             uri, storage_root), c.inapplicable)
        for c in cells
    ]
    preflight(cells)
    return ablation, tree, cells, notes, experiment, uri


def run_sweep(path: str | Path, overrides: list[str] | None = None, *, resume: bool = False, out=None) -> SweepOutcome:
    from ray import tune

    from orchestrator.reporting.tables import TablesError, default_out_dir, write_tables
    from orchestrator.runtime.ray_setup import init_ray

    out = out or sys.stdout
    t0 = time.time()
    ablation, tree, cells, notes, experiment, uri = plan_sweep(path, overrides)
    print(format_cells(ablation, cells, notes), file=out, flush=True)
    parent = open_parent(ablation, Path(path).read_text(), cells, base_values(ablation, tree), uri, experiment, resume,
                         base_fingerprint(path, ablation, overrides))
    done = finished_cells(cells, uri, experiment) if resume else set()
    todo = [c for c in cells if c.name not in done]
    if done:
        print(f"resuming: {len(done)} cell(s) already finished, {len(todo)} to run", file=out, flush=True)

    failed: dict[str, str] = {}
    client = tracking_client(uri)
    try:
        if todo:
            init_ray()
            payload = [
                {"name": c.name, "sweep": ablation.name, "config": c.cfg.model_dump(mode="json")} for c in todo
            ]
            trainable = tune.with_parameters(
                _cell_trial, cells=payload, parent_run_id=parent, home=str(resolve_path(".")),
                max_failures=ablation.max_failures,
            )
            # The trial only drives its TorchTrainer, whose workers hold the CPUs/GPUs. Even 0.01 CPU per
            # trial would make two 1-CPU cells need 2.02 CPUs of 2 and run one after the other; Tune refuses
            # an empty request, so a trial asks for a little memory instead.
            trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_MEMORY})
            progress = SweepProgress({i: c.name for i, c in enumerate(todo)}, uri, experiment, len(done), len(cells), out=out)
            tuner = tune.Tuner(
                trainable,
                param_space={"cell": tune.grid_search(list(range(len(todo))))},
                tune_config=tune.TuneConfig(max_concurrent_trials=_cells_at_once(todo, ablation.max_concurrent)),
                run_config=tune.RunConfig(
                    name=f"{ablation.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                    storage_path=resolve_storage(str(Path(todo[0].cfg.storage_path) / "_tune")),
                    callbacks=[_tune_callback(progress)],
                    # A trial lost with its node is retried; it resumes its cell from the cell's checkpoint.
                    failure_config=tune.FailureConfig(max_failures=ablation.max_failures),
                    verbose=0,
                ),
            )
            grid = tuner.fit()
            for result in grid:
                if result.error is not None:
                    name = payload[result.config["cell"]]["name"]
                    failed[name] = progress.failed.get(name) or str(result.error).strip().splitlines()[-1][:300]
    except BaseException as exc:
        client.set_tag(parent, "orchestrator.error", redact_secrets(f"interrupted: {exc!r}")[:5000])
        client.set_terminated(parent, status="FAILED")
        raise

    try:
        files = write_tables(uri, experiment, parent_run_id=parent, out_dir=default_out_dir(ablation.name),
                             baseline=normalize_pipeline(ablation.baseline) if ablation.baseline else None)
        markdown = files.markdown
    except TablesError as exc:  # e.g. every cell failed: say so, the failures are the news
        files, markdown = [], f"(no table: {exc})"
    if failed:
        client.set_tag(parent, "orchestrator.failed_cells", json.dumps(sorted(failed))[:5000])
        client.set_terminated(parent, status="FAILED")
    else:
        client.set_terminated(parent, status="FINISHED")
    return SweepOutcome(ablation.name, experiment, uri, parent, len(cells), len(done), failed, markdown,
                        list(files), time.time() - t0)

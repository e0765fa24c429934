"""The driver of one run: preflight, the MLflow run, a TorchTrainer, and the run's outcome."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass

from orchestrator.config import RunConfig, resolve_storage
from orchestrator.engine.checkpoints import quarantine_incomplete
from orchestrator.engine.storage import Storage
from orchestrator.runtime.preflight import PreparedRun, check_cluster, cluster_spans_nodes, prepare_run
from orchestrator.runtime.ray_setup import configure_ray_train, init_ray, verbose
from orchestrator.runtime.shipping import ship_dataset, ship_model
from orchestrator.runtime.worker import train_loop_per_worker
from orchestrator.stages.timing import Stopwatch
from orchestrator.tracking.conventions import tracking_client
from orchestrator.tracking.runs import finish_run, start_or_resume_run


class RunFailed(RuntimeError):
    """A run that started and failed: its root cause in one line, and what was set aside."""

    def __init__(self, name: str, cause: str, quarantined: list[str]):
        self.cause, self.quarantined = cause, quarantined
        text = f"run {name!r} failed: {cause}"
        if quarantined:
            text += "; incomplete checkpoints set aside: " + ", ".join(quarantined)
        super().__init__(text)


def root_cause(exc: BaseException) -> str:
    """The innermost exception line of a failure (Ray wraps a worker's error in several layers)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln)]
    return (errors[-1] if errors else f"{type(exc).__name__}: {lines[-1] if lines else ''}")[:1000]


@dataclass
class RunOutcome:
    run_id: str
    tracking_uri: str
    experiment: str
    metrics: dict[str, float]


def run_storage(cfg: RunConfig) -> Storage:
    """The run's folder in its storage: Ray Train's checkpoints, and the spool of unsent metrics."""
    return Storage(resolve_storage(cfg.storage_path)).child(cfg.name)


def run_training(
    cfg: RunConfig,
    parent_run_id: str | None = None,
    max_failures: int = 0,
    prepared: PreparedRun | None = None,
    extra_tags: dict[str, str] | None = None,
) -> RunOutcome:
    """Everything that can fail on bad input happens before an MLflow run exists or a worker starts:
    the preflight checks, then (Ray up) the checks of what the cluster's nodes can reach."""
    t_run = time.perf_counter()
    driver: dict[str, float] = {}
    watch = Stopwatch(driver)
    with watch("prepare"):
        prepared = prepared or prepare_run(cfg)
    with watch("ray_init"):
        init_ray()
    spans_nodes = cluster_spans_nodes(cfg)
    check_cluster(cfg, prepared.tracking_uri, spans_nodes)
    uri = prepared.tracking_uri
    with watch("tracking_setup"):
        run_id = start_or_resume_run(cfg, parent_run_id, extra_tags)
    try:
        fit_ended_at = fit_workers(cfg, prepared, run_id, max_failures, spans_nodes, watch)
    except BaseException as exc:
        failure = RunFailed(cfg.name, root_cause(exc), set_aside_incomplete(cfg))
        finish_run(uri, run_id, failure, retry_for_s=cfg.tracking.flush_timeout_s)
        if isinstance(exc, Exception):
            raise failure from exc
        raise
    log_run_timings(uri, run_id, cfg, driver, fit_ended_at, t_run)
    finish_run(uri, run_id, retry_for_s=cfg.tracking.flush_timeout_s)
    metrics = tracking_client(uri).get_run(run_id).data.metrics
    return RunOutcome(run_id=run_id, tracking_uri=uri, experiment=cfg.tracking.experiment, metrics=metrics)


def set_aside_incomplete(cfg: RunConfig) -> list[str]:
    """Quarantine the run's half-written checkpoints after a failure; a storage that fails too (the
    failure may have been the storage's) must not hide the run's own error."""
    try:
        return quarantine_incomplete(run_storage(cfg))
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not check the run's checkpoints: {type(exc).__name__}: {exc}", file=sys.stderr)
        return []


def fit_workers(cfg: RunConfig, prepared: PreparedRun, run_id: str, max_failures: int, spans_nodes: bool,
                watch: Stopwatch) -> float:
    """Ship what the workers need through storage, then the Ray Train job; returns when fit() did."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    storage = Storage(resolve_storage(cfg.storage_path))
    with watch("ship"):
        dataset = ship_dataset(storage, prepared.dataset)
        model = ship_model(storage, cfg.model, prepared.model_source, same_machine=not spans_nodes)
    configure_ray_train()
    fit_started_at = time.time()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "dataset": dataset.to_dict(),
            "model": model.to_dict(),
            "tracking_uri": prepared.tracking_uri,
            "run_id": run_id,
            "spool": run_storage(cfg).root,
            "fit_started_at": fit_started_at,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RayRunConfig(
            name=cfg.name,
            storage_path=storage.root,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray Train's own per-report lines only with --verbose; the workers print the run's progress.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
    trainer.fit()
    fit_ended_at = time.time()
    watch.add("fit", fit_ended_at - fit_started_at)
    return fit_ended_at


def log_run_timings(uri: str, run_id: str, cfg: RunConfig, driver: dict[str, float], fit_ended_at: float,
                    t_run: float) -> None:
    """The driver's phases as time/driver_<phase>_s, and time/teardown_s: from rank 0 logging its own
    phases (time/worker_total_s, dated by MLflow) to fit() returning, i.e. Ray Train shutting down its
    worker group and helper actors. Timing is diagnostics: a tracking hiccup here must not fail a run."""
    from mlflow.entities import Metric

    times = {f"time/driver_{k}_s": v for k, v in driver.items()}
    times["time/driver_total_s"] = time.perf_counter() - t_run
    step = sum(s.steps for s in cfg.pipeline)
    now = int(time.time() * 1000)
    try:
        client = tracking_client(uri)
        worker_end = client.get_metric_history(run_id, "time/worker_total_s")
        if worker_end:
            times["time/teardown_s"] = max(0.0, fit_ended_at - worker_end[-1].timestamp / 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in times.items()])
    except Exception as exc:  # noqa: BLE001
        print(f"warning: run timings not logged: {type(exc).__name__}: {exc}", file=sys.stderr)

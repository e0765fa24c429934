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
from orchestrator.runtime.stopping import clear_stop, on_sigterm, request_stop, stop_reason
from orchestrator.runtime.worker import train_loop_per_worker
from orchestrator.stages.guards import STOPPED_METRIC
from orchestrator.stages.timing import Stopwatch
from orchestrator.tracking.conventions import tracking_client
from orchestrator.tracking.runs import check_can_start, finish_run, run_lease, start_or_resume_run


class RunFailed(RuntimeError):
    """A run that started and failed: its root cause in one line, and what was set aside."""

    def __init__(self, name: str, cause: str, quarantined: list[str]):
        self.cause, self.quarantined = cause, quarantined
        text = f"run {name!r} failed: {cause}"
        if quarantined:
            text += "; incomplete checkpoints set aside: " + ", ".join(quarantined)
        self.name = name
        super().__init__(text)

    def __reduce__(self):  # pickled as it was made: a sweep's Tune trial hands the error to the driver
        return type(self), (self.name, self.cause, self.quarantined)


class RunStopped(RunFailed):
    """A run stopped on request (SIGTERM) at a step boundary, its checkpoint saved there: a rerun resumes."""

    def __init__(self, name: str, reason: str):
        self.name, self.cause, self.quarantined = name, reason, []
        RuntimeError.__init__(self, f"run {name!r} stopped: {reason}")

    def __reduce__(self):
        return type(self), (self.name, self.cause)


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
    allow_changed_resume: bool = False,
) -> RunOutcome:
    """Everything that can fail on bad input happens before an MLflow run exists or a worker starts:
    the preflight checks, whether another process writes this run and whether a restart would change its
    setup, then (Ray up) the checks of what the cluster's nodes can reach. The run's lease is held, and
    heartbeated, from before its MLflow run is created or resumed until it ends."""
    t_run = time.perf_counter()
    deadline = time.time() + cfg.timeout_s if cfg.timeout_s else None
    driver: dict[str, float] = {}
    watch = Stopwatch(driver)
    with watch("prepare"):
        prepared = prepared or prepare_run(cfg)
        check_can_start(cfg, allow_changed_resume)
    with watch("ray_init"):
        init_ray(use_gpu=cfg.scaling.use_gpu)
    spans_nodes = cluster_spans_nodes(cfg)
    check_cluster(cfg, prepared.tracking_uri, spans_nodes)
    uri = prepared.tracking_uri
    lease = run_lease(cfg)
    with watch("tracking_setup"):
        lease.acquire()
    try:
        with watch("tracking_setup"):
            run_id = start_or_resume_run(cfg, parent_run_id, extra_tags, allow_changed_resume)
        lease.start_heartbeat()
        fit_ended_at = fit_or_mark(cfg, prepared, run_id, max_failures, spans_nodes, watch, deadline)
        log_run_timings(uri, run_id, cfg, driver, fit_ended_at, t_run)
        finish_run(uri, run_id, retry_for_s=cfg.tracking.flush_timeout_s)
    finally:
        lease.release()
    metrics = tracking_client(uri).get_run(run_id).data.metrics
    return RunOutcome(run_id=run_id, tracking_uri=uri, experiment=cfg.tracking.experiment, metrics=metrics)


def stop_markers(cfg: RunConfig) -> list[str]:
    """Where a stop of this run may be requested: its own folder (`orchestrator train`) and its storage
    root (a sweep's, for all its cells)."""
    return [run_storage(cfg).root, Storage(resolve_storage(cfg.storage_path)).root]


def fit_or_mark(cfg: RunConfig, prepared: PreparedRun, run_id: str, max_failures: int, spans_nodes: bool,
                watch: Stopwatch, deadline: float | None) -> float:
    """The Ray Train job, a SIGTERM meanwhile turned into a stop at the next step boundary; a failure or a
    stop is marked on the run (FAILED with its cause, KILLED with its reason) and raised. Returns when fit()
    did."""
    uri, own_folder = prepared.tracking_uri, run_storage(cfg)
    clear_stop(own_folder)  # a stop requested of an earlier start does not stop this one
    try:
        with on_sigterm(lambda reason: request_stop(own_folder, reason)):
            fit = fit_workers(cfg, prepared, run_id, max_failures, spans_nodes, watch, deadline)
    except BaseException as exc:
        cause = timed_out(cfg, deadline) or root_cause(exc)
        failure = RunFailed(cfg.name, cause, set_aside_incomplete(cfg))
        finish_run(uri, run_id, failure, retry_for_s=cfg.tracking.flush_timeout_s)
        if isinstance(exc, Exception):
            raise failure from exc
        raise
    if fit.stopped_at is not None:
        reason = next(filter(None, (stop_reason(Storage(m)) for m in stop_markers(cfg))), "stop requested")
        text = f"{reason}: stopped at step {fit.stopped_at} with a checkpoint there; rerun to resume from it"
        finish_run(uri, run_id, retry_for_s=cfg.tracking.flush_timeout_s, stopped=text)
        raise RunStopped(cfg.name, text)
    return fit.ended_at


def timed_out(cfg: RunConfig, deadline: float | None) -> str | None:
    """The failure's cause when the run's time budget is spent (the deadline ended it), else None."""
    if deadline is not None and time.time() >= deadline - 1.0:
        return f"timed out after {cfg.timeout_s:g} s (timeout_s)"
    return None


def set_aside_incomplete(cfg: RunConfig) -> list[str]:
    """Quarantine the run's half-written checkpoints after a failure; a storage that fails too (the
    failure may have been the storage's) must not hide the run's own error."""
    try:
        return quarantine_incomplete(run_storage(cfg))
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not check the run's checkpoints: {type(exc).__name__}: {exc}", file=sys.stderr)
        return []


@dataclass
class FitResult:
    ended_at: float  # when fit() returned
    stopped_at: int | None  # the global step of the checkpoint a requested stop ended on, else None


def fit_workers(cfg: RunConfig, prepared: PreparedRun, run_id: str, max_failures: int, spans_nodes: bool,
                watch: Stopwatch, deadline: float | None = None) -> FitResult:
    """Ship what the workers need through storage, then the Ray Train job (ended at `deadline` if it
    runs that long); returns when fit() did."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    storage = Storage(resolve_storage(cfg.storage_path))
    with watch("ship"):
        dataset = ship_dataset(storage, prepared.dataset)
        model = ship_model(storage, cfg.model, prepared.model_source, same_machine=not spans_nodes)
    configure_ray_train()
    callbacks = []
    if deadline is not None:
        from orchestrator.runtime.deadline import RunDeadline

        if time.time() >= deadline:
            raise TimeoutError(f"the time budget ran out before training started (timeout_s={cfg.timeout_s:g})")
        callbacks.append(RunDeadline(deadline, cfg.name))
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
            "stop_markers": stop_markers(cfg),
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
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    fit_ended_at = time.time()
    watch.add("fit", fit_ended_at - fit_started_at)
    stopped = (result.metrics or {}).get(STOPPED_METRIC)
    return FitResult(fit_ended_at, None if stopped is None else int(stopped))


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

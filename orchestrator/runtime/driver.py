"""The driver of one run: preflight, the MLflow run, a TorchTrainer, and the run's outcome."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import RunConfig, resolve_storage
from orchestrator.engine.checkpoints import quarantine_incomplete
from orchestrator.runtime.preflight import PreparedRun, prepare_run
from orchestrator.runtime.ray_setup import configure_ray_train, init_ray
from orchestrator.runtime.worker import train_loop_per_worker
from orchestrator.stages.timing import Stopwatch
from orchestrator.tracking.conventions import run_key, tracking_client
from orchestrator.tracking.runs import finish_run, start_or_resume_run


class RunFailed(RuntimeError):
    """A run that started and failed: its root cause in one line, and what was set aside."""

    def __init__(self, name: str, cause: str, quarantined: list[Path]):
        self.cause, self.quarantined = cause, quarantined
        text = f"run {name!r} failed: {cause}"
        if quarantined:
            text += "; incomplete checkpoints set aside: " + ", ".join(p.name for p in quarantined)
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


def spool_dir(cfg: RunConfig) -> str:
    """Where rank 0 keeps what the tracking store did not take yet: beside the run's checkpoints when
    they are local, else in the user's cache (a restarted worker finds it in both)."""
    storage = resolve_storage(cfg.storage_path)
    if "://" in storage:
        from orchestrator.modeling.models import default_cache_dir

        return str(default_cache_dir() / "spool" / run_key(cfg))
    return str(Path(storage) / cfg.name)


def run_training(
    cfg: RunConfig,
    parent_run_id: str | None = None,
    max_failures: int = 0,
    prepared: PreparedRun | None = None,
    extra_tags: dict[str, str] | None = None,
) -> RunOutcome:
    """Everything that can fail on bad input happens before Ray starts a single worker."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    t_run = time.perf_counter()
    driver: dict[str, float] = {}
    watch = Stopwatch(driver)
    with watch("prepare"):
        prepared = prepared or prepare_run(cfg)
    built, model_source, uri = prepared.dataset, prepared.model_source, prepared.tracking_uri
    with watch("tracking_setup"):
        run_id = start_or_resume_run(cfg, parent_run_id, extra_tags)
    try:
        with watch("ray_init"):
            init_ray()
        configure_ray_train()
        fit_started_at = time.time()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "model_source": model_source,
                "dataset_path": str(built.path.resolve()),  # workers run in another cwd
                "tracking_uri": uri,
                "run_id": run_id,
                "spool_dir": spool_dir(cfg),
                "fit_started_at": fit_started_at,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            ),
            run_config=RayRunConfig(
                name=cfg.name,
                storage_path=resolve_storage(cfg.storage_path),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        trainer.fit()
        fit_ended_at = time.time()
    except BaseException as exc:
        storage = resolve_storage(cfg.storage_path)
        moved = [] if "://" in storage else quarantine_incomplete(Path(storage) / cfg.name)
        failure = RunFailed(cfg.name, root_cause(exc), moved)
        finish_run(uri, run_id, failure, retry_for_s=cfg.tracking.flush_timeout_s)
        if isinstance(exc, Exception):
            raise failure from exc
        raise
    driver["fit"] = fit_ended_at - fit_started_at
    log_run_timings(uri, run_id, cfg, driver, fit_ended_at, t_run)
    finish_run(uri, run_id, retry_for_s=cfg.tracking.flush_timeout_s)
    metrics = tracking_client(uri).get_run(run_id).data.metrics
    return RunOutcome(run_id=run_id, tracking_uri=uri, experiment=cfg.tracking.experiment, metrics=metrics)


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

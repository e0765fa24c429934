"""The Ray Train job for one run: N workers, each a DeepSpeed engine, run the pipeline's stages in
order (workers start once), then evaluate. The driver prepares data, model and the MLflow run
before any worker starts, so bad input fails fast and a restarted run finds its own state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from safetensors.torch import save_file

from orchestrator.checkpoints import STATE_FILE, quarantine_incomplete, verify_checkpoint, write_manifest
from orchestrator.config import ConfigError, RunConfig, resolve_storage
from orchestrator.data import build_dataset, load_built
from orchestrator.evaluate import format_answer
from orchestrator.models import add_lora_adapters, digit_token_ids, load_model_and_tokenizer, load_tokenizer, resolve_source
from orchestrator.tracking import (
    RunLogger,
    Stopwatch,
    check_tracking_store,
    finish_run,
    resolve_tracking_uri,
    run_key,
    start_or_resume_run,
    tracking_client,
)



# --------------------------------------------------------------------------- worker side


def _stage_runner(kind: str):
    if kind == "sft":
        from orchestrator.stages.sft import run_sft_stage

        return run_sft_stage
    from orchestrator.stages.grpo import run_grpo_stage

    return run_grpo_stage


def _restore_point() -> tuple[int, int, str | None]:
    """(stage_index, step_in_stage, local checkpoint dir) from Ray Train's latest checkpoint, if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, 0, None
    local = tempfile.mkdtemp(prefix="orchestrator-restore-")
    with ckpt.as_directory() as d:
        shutil.copytree(d, local, dirs_exist_ok=True)
    problems = verify_checkpoint(local)
    if problems:  # never resume from half a checkpoint
        raise RuntimeError(f"checkpoint {ckpt.path} is incomplete: {'; '.join(problems[:5])}")
    state = json.loads((Path(local) / STATE_FILE).read_text())
    return int(state["stage_index"]), int(state["step"]), local


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import torch
    from ray.train import Checkpoint

    from orchestrator.models import load_image_processor
    from orchestrator.stages.common import REFERENCE_FILE, StageContext, handoff_module
    from orchestrator.stages.evaluation import evaluate_model

    entered = time.time()
    timings: dict[str, float] = {}  # run phases on rank 0's clock, logged as time/<phase>_s at the end
    watch = Stopwatch(timings)
    if loop_config.get("fit_started_at"):  # Ray Train's controller and worker-group start, process spawn, imports
        timings["worker_start"] = entered - float(loop_config["fit_started_at"])
    cfg = RunConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.scaling.use_gpu:
        device = torch.device("cuda", context.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # One thread per worker: oversubscribed CPU threads made steps ~80x slower here.
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)

    with watch("model_load"):
        model, tokenizer = load_model_and_tokenizer(cfg.model, loop_config["model_source"])
        model.to(device)
        dataset = load_built(loop_config["dataset_path"])
        processor = load_image_processor(cfg.model, tokenizer, loop_config["model_source"])
    if dataset.has_images and processor is None:
        # A text-only model would silently answer without seeing the images.
        raise ConfigError(
            f"dataset {dataset.meta['name']!r} has images but model.source={cfg.model.source!r} is text-only; "
            f"use a vision-language source (model.tiny.architecture=qwen2-vl|smolvlm, smolvlm-smollm2-135m)"
        )
    if not dataset.has_images:
        processor = None  # a VLM on a text dataset runs the text path
    with watch("tracking"):
        logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"], loop_config["spool_dir"]) if rank == 0 else None

    def log(metrics: dict[str, float], step: int) -> None:
        if logger is not None:
            logger.log_metrics(metrics, step)

    with watch("restore"):
        start_stage, start_step, resume_dir = _restore_point()
    if logger is not None and resume_dir is not None:
        logger.set_tag("orchestrator.resumed_from", f"stage {start_stage} step {start_step}")
    if logger is not None:  # process settings that change speed, not results: kept with the run
        logger.set_tag("orchestrator.worker_threads", str(torch.get_num_threads()))
        logger.set_tag("orchestrator.worker_malloc", os.environ.get("GLIBC_TUNABLES", "glibc default"))

    engine = None
    offset = sum(s.steps for s in cfg.pipeline[:start_stage])
    for index, stage in enumerate(cfg.pipeline):
        if index < start_stage:
            continue
        if engine is not None:  # the previous stage's weights, full and merged, start this one
            with watch("handoff"):
                model = handoff_module(engine).to(device)

        extra: dict[str, Any] = {}

        def checkpoint(engine_, step: int, metrics: dict[str, float], _index=index, _extra=extra) -> None:
            reference = _extra.get("reference")
            # Every rank takes part: under ZeRO-3 both the engine save and the reference gather are collective.
            reference_state = reference.state_dict() if reference is not None else None
            with tempfile.TemporaryDirectory() as tmp:
                engine_.save_checkpoint(tmp, tag="ckpt")
                if rank == 0:
                    state = {"stage_index": _index, "step": step, "world_size": world}
                    (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
                    if reference_state is not None:
                        save_file(reference_state, str(Path(tmp) / REFERENCE_FILE))
                write_manifest(tmp, rank)  # last: a restore checks every file against it
                ray.train.report(dict(metrics), checkpoint=Checkpoint.from_directory(tmp))

        ctx = StageContext(
            cfg=cfg,
            model=add_lora_adapters(model, cfg.model.lora),  # fresh adapters per stage (no-op without LoRA)
            tokenizer=tokenizer,
            digit_token_ids=digit_token_ids(tokenizer),
            dataset=dataset,
            rank=rank,
            world_size=world,
            device=device,
            stage_index=index,
            global_step_offset=offset,
            log=log,
            checkpoint=checkpoint,
            extra=extra,
            processor=processor,
            timings=timings,
        )
        resuming = index == start_stage and resume_dir is not None
        engine = _stage_runner(stage.kind)(
            ctx, stage, start_step if resuming else 0, resume_dir if resuming else None
        )
        if logger is not None and world > 1:  # how this stage's gradients were averaged over the workers
            how = "shared memory" if engine.shared_gradients is not None else "deepspeed"
            logger.set_tag(f"orchestrator.stage{index}.grad_average", how)
        offset += stage.steps

    ctx = StageContext(
        cfg=cfg, model=model, tokenizer=tokenizer, digit_token_ids=digit_token_ids(tokenizer), dataset=dataset,
        rank=rank, world_size=world, device=device, stage_index=len(cfg.pipeline), global_step_offset=offset,
        log=log, checkpoint=lambda *a: None, processor=processor, timings=timings,
    )
    with watch("eval"):
        metrics, predictions = evaluate_model(ctx, engine if engine is not None else model)
    if resume_dir:
        shutil.rmtree(resume_dir, ignore_errors=True)
    if logger is not None:
        with watch("tracking"):
            logger.log_metrics(metrics, offset)
            log_predictions(logger, predictions, dataset)
        # The run's phases on rank 0's clock. Logged here, not reported: fit() returns only the metrics
        # of the latest checkpoint. The driver dates the workers' end by this metric's timestamp.
        timings["worker_total"] = time.time() - entered
        logger.log_metrics({f"time/{k}_s": v for k, v in timings.items()}, offset)
        logger.close(cfg.tracking.flush_timeout_s)  # everything queued reaches the store, or the run fails loudly
    ray.train.report({"done": 1.0, **{k: v for k, v in metrics.items() if k.endswith("/mae")}})


def log_predictions(logger: RunLogger, predictions: dict, dataset) -> None:
    """Each split's predictions as Parquet, and its diagnostic plots (scatter, MAE per bin with the shot
    regions shaded, training-label histogram) under plots/{split}/."""
    from orchestrator.plots import cell_plots

    with tempfile.TemporaryDirectory() as tmp:
        for split, table in predictions.items():
            path = Path(tmp) / f"{split}.parquet"
            pq.write_table(table, path)
            logger.log_artifact(path, "predictions")
            plots = cell_plots(
                table, dataset.train_targets(), label_step=dataset.label_step, many=dataset.many,
                few=dataset.few, out_dir=Path(tmp) / "plots" / split,
            )
            for plot in plots:
                logger.log_artifact(plot, f"plots/{split}")


# --------------------------------------------------------------------------- driver side


# glibc's malloc hands freed blocks above its mmap threshold (at most 32 MB) back to the OS and page-faults
# them in again on the next allocation; a training step frees and re-allocates the same large tensors every
# step (the tied embedding gradient alone is 113 MB for SmolLM2-135M). Workers keep freed memory in one
# heap instead: one arena, because Ray Train runs the training loop in a thread of its own, whose arena
# cannot hold such blocks without mmap. Measured on 2 CPUs, SmolLM2-135M SFT step with the loop in a
# thread: 6.1 s -> 4.5 s, and peak resident memory 5.9 -> 4.7 GB (the tiny model: unchanged).
WORKER_MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def worker_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """Environment of the Ray worker processes: one compute thread unless a stage asks for more, and
    the malloc setting above unless the user already chose GLIBC_TUNABLES (workers then inherit it)."""
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if "GLIBC_TUNABLES" not in environ:
        env["GLIBC_TUNABLES"] = WORKER_MALLOC_TUNABLES
    return env


def init_ray(num_cpus: int | None = None) -> None:
    """Join $RAY_ADDRESS if set, else start a local cluster in-process, dashboard on loopback only."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": worker_env_vars(os.environ)}
    if os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit`, Ray refuses a driver runtime_env that sets an env var the job's
        # runtime_env (--runtime-env-json) also sets; the job's value wins.
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job_vars = (job_config.get("runtime_env") or {}).get("env_vars") or {}
        env = {"env_vars": {k: v for k, v in env["env_vars"].items() if k not in job_vars}}
        ray.init(runtime_env=env, log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=256 * 1024 * 1024,
        # The dashboard serves Ray's State API, which Train V2's placement-group cleaner polls every
        # second (it logs a warning per poll without it); loopback only.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=env,
        log_to_driver=True,
    )


def answer_token_length(tokenizer, label_min: float, label_max: float) -> int:
    """Tokens of the longest answer in the label range, end-of-turn included."""
    return 1 + max(
        len(tokenizer.encode(format_answer(v), add_special_tokens=False)) for v in (label_min, label_max)
    )


def check_generation_budgets(cfg: RunConfig, tokenizer, label_min: float, label_max: float) -> None:
    """Refuse a max_new_tokens that cannot hold the answer: every sample would be a parse failure.
    A pipeline ending in sft:rvtc answers through its head at evaluation, so only its GRPO budgets count
    (it has none: rvtc is last). The tokenizer of a vision-language source answers in the same text."""
    needed = answer_token_length(tokenizer, label_min, label_max)
    ends_in_head = bool(cfg.pipeline) and getattr(cfg.pipeline[-1], "loss", None) == "rvtc"
    budgets = [] if ends_in_head else [("eval.max_new_tokens", cfg.eval.max_new_tokens)]
    budgets += [(f"pipeline.{i}.max_new_tokens", s.max_new_tokens) for i, s in enumerate(cfg.pipeline) if s.kind == "grpo"]
    for field, value in budgets:
        if value < needed:
            raise ConfigError(
                f"{field}={value} cannot hold the answer {format_answer(label_max)!r}: it takes {needed} tokens "
                f"(end of turn included) with this model's tokenizer; set {field}>={needed}"
            )


def check_rewards(cfg: RunConfig) -> None:
    """Every GRPO reward term must resolve (a registered name or an importable module:function)."""
    from orchestrator.rewards import resolve_reward

    for i, stage in enumerate(cfg.pipeline):
        for j, term in enumerate(getattr(stage, "rewards", [])):
            try:
                resolve_reward(term.name)
            except ValueError as exc:
                raise ConfigError(f"pipeline.{i}.rewards.{j}.name: {exc}") from None


# What `from_pretrained` reads weights from (safetensors first; a .bin only through torch.load(weights_only=True)).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_storage(cfg: RunConfig) -> None:
    """A local storage_path must be a folder that can be created: Ray Train would otherwise fail on it only
    after the cluster has started and the MLflow run exists. Remote URIs are Ray Train's to check."""
    storage = resolve_storage(cfg.storage_path)
    if "://" in storage:
        return
    path = Path(storage)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"storage_path {cfg.storage_path!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"storage_path {cfg.storage_path!r}: {existing} is not writable")


def check_model_source(cfg: RunConfig, model_source: str, dataset) -> None:
    """Refuse here what every worker would refuse after Ray has started: a text-only model on a dataset of
    images, and a local directory that is not a loadable model for this task (config.json unreadable or
    without model_type, an architecture that is not a causal LM, or a vision-language model of a kind this
    project drives; no weights). Models built here or packaged are known good; a hub id is checked where
    it downloads."""
    from orchestrator.config import VLM_SMOLLM2_SOURCE
    from orchestrator.models import SMOLLM2_SOURCE, ModelError, vision_kind

    kind = vision_kind(cfg.model, model_source)
    if dataset.has_images and kind is None:
        raise ConfigError(
            f"dataset {dataset.meta['name']!r} has images but model.source={cfg.model.source!r} is text-only; "
            "use a vision-language source (model.tiny.architecture=qwen2-vl|smolvlm, smolvlm-smollm2-135m)"
        )
    path = Path(model_source)
    if cfg.model.source in ("tiny", SMOLLM2_SOURCE, VLM_SMOLLM2_SOURCE) or not path.is_dir():
        return
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model path {path}: config.json is not readable JSON ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ModelError(f"model path {path}: config.json names no model_type; is it a Hugging Face model directory?")
    if not (cfg.model.trust_remote_code and "auto_map" in config):  # custom code declares its own classes
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        if model_type not in CONFIG_MAPPING_NAMES:
            hint = " (it ships its own code; set model.trust_remote_code=true only if you trust it)" if "auto_map" in config else ""
            raise ModelError(f"model path {path}: model_type {model_type!r} is unknown to transformers{hint}")
        if kind is not None and model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise ModelError(f"model path {path} holds a {model_type!r} model, not a vision-language model")
        if kind is None and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ModelError(
                f"model path {path} holds a {model_type!r} model, which is not a causal language model "
                "(AutoModelForCausalLM cannot load it); the policy generates its answers, so it must be one"
            )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"model path {path} has no weights: none of {', '.join(WEIGHT_FILES)}")


def check_ray_address(timeout_s: float = 5.0) -> None:
    """$RAY_ADDRESS must answer: `ray.init` waits on an address where nothing listens for minutes, and it
    runs after the MLflow run is created. `auto`/`local` and a driver already connected are left to Ray."""
    import socket

    address = (os.environ.get("RAY_ADDRESS") or "").strip()
    if not address or address in ("auto", "local"):
        return
    ray = sys.modules.get("ray")  # not imported for the check alone
    if ray is not None and ray.is_initialized():
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"RAY_ADDRESS={address!r} is not host:port (or ray://host:port, auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"RAY_ADDRESS={address!r}: no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); "
            "start one (infra/ray-head-start.sh) or unset RAY_ADDRESS for a local cluster"
        ) from None


def check_experiment(uri: str, name: str) -> None:
    """An experiment deleted in the MLflow UI keeps its name, and MLflow refuses new runs in it. A local
    store that does not exist yet is not created by this check."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return
    from orchestrator.tracking import tracking_client

    exp = tracking_client(uri).get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise ConfigError(
            f"tracking.experiment {name!r} was deleted in {uri}; restore it "
            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or choose another name"
        )


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
        from orchestrator.models import default_cache_dir

        return str(default_cache_dir() / "spool" / run_key(cfg))
    return str(Path(storage) / cfg.name)


@dataclass
class PreparedRun:
    """What a run needs before Ray starts, each piece checked: the built dataset, a model source the
    workers can load, the tracking store."""

    cfg: RunConfig
    dataset: Any  # BuiltDataset
    model_source: str
    tracking_uri: str


def prepare_run(cfg: RunConfig) -> PreparedRun:
    """Every check that bad input can fail, and the (cached) data build; no training compute."""
    check_rewards(cfg)
    check_ray_address()
    check_storage(cfg)
    built = build_dataset(cfg.data)
    model_source = resolve_source(cfg.model)
    check_model_source(cfg, model_source, built)
    check_generation_budgets(cfg, load_tokenizer(cfg.model, model_source), built.label_min, built.label_max)
    uri = resolve_tracking_uri(cfg)
    check_tracking_store(uri)
    check_experiment(uri, cfg.tracking.experiment)
    return PreparedRun(cfg, built, model_source, uri)


def run_training(
    cfg: RunConfig,
    parent_run_id: str | None = None,
    max_failures: int = 0,
    prepared: PreparedRun | None = None,
    extra_tags: dict[str, str] | None = None,
) -> RunOutcome:
    """Everything that can fail on bad input happens before Ray starts a single worker."""
    from ray.train import CheckpointConfig, FailureConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
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


# Ray Train V2 knobs for short runs on one machine (set unless the user set them): the controller polls
# its workers every 2 s by default, so a finished run waited up to 2 s to be noticed; the preemption
# watcher is one more actor process per run, for spot-instance drains a local cluster never sees.
RAY_TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def configure_ray_train() -> None:
    for key, value in RAY_TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)

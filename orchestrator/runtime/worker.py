"""The Ray Train worker loop of one run: load, run the pipeline's stages in order, evaluate, log."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from safetensors.torch import save_file

from orchestrator.config import ConfigError, RunConfig
from orchestrator.data import load_built
from orchestrator.engine.checkpoints import STATE_FILE, previous_complete, verify_checkpoint, write_manifest
from orchestrator.engine.deepspeed import resolved_precision, shared_gradients_of
from orchestrator.engine.handoff import handoff_module
from orchestrator.engine.reference import REFERENCE_FILE, REFERENCE_STATE_FILE, ReferencePolicy
from orchestrator.engine.storage import Storage
from orchestrator.modeling.models import (
    add_lora_adapters,
    digit_token_ids,
    load_model_and_tokenizer,
)
from orchestrator.runtime.ray_setup import verbose
from orchestrator.runtime.shipping import folder_on_this_node, model_on_this_node
from orchestrator.runtime.stopping import StopWatcher
from orchestrator.stages.context import StageContext
from orchestrator.stages.guards import SKIPPED_METRIC, StopRequested
from orchestrator.stages.timing import Stopwatch, device_memory_metrics
from orchestrator.tracking.conventions import (
    DAMAGED_CHECKPOINT_TAG,
    PRECISION_TAG,
    RESUMED_FROM_TAG,
    WORKER_MALLOC_TAG,
    WORKER_NODE_TAG,
    WORKER_THREADS_TAG,
    stage_tag,
)
from orchestrator.tracking.logger import RunLogger

STAGE_RUNNERS = {"sft": "orchestrator.stages.sft:run_sft_stage", "grpo": "orchestrator.stages.grpo:run_grpo_stage"}


def stage_runner(kind: str):
    """The stage loop of a kind, imported on use (a pipeline without GRPO never imports its code)."""
    module, _, name = STAGE_RUNNERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class RestorePoint:
    """Where a (re)started worker group begins: the stage, its step, and the local copy of the checkpoint."""

    stage_index: int = 0
    step: int = 0
    folder: str | None = None
    skipped_damaged: str | None = None  # the latest checkpoint, when it failed verification and an older one is used


def restore_point(run_dir: str | None = None) -> RestorePoint:
    """Ray Train's latest checkpoint, copied locally and verified file by file (sizes and sha256), or the
    start of the run. A damaged latest checkpoint gives way to the newest earlier one in the run's folder
    `run_dir` that verifies; every worker makes the same choice from the same files."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return RestorePoint()
    local = tempfile.mkdtemp(prefix="orchestrator-restore-")
    with ckpt.as_directory() as d:
        shutil.copytree(d, local, dirs_exist_ok=True)
    damaged = None
    problems = verify_checkpoint(local, contents=True)
    if problems:  # never resume from a damaged checkpoint
        latest = Path(ckpt.path.rstrip("/")).name
        shutil.rmtree(local, ignore_errors=True)
        local = tempfile.mkdtemp(prefix="orchestrator-restore-")
        found = previous_complete(Storage(run_dir), latest, local) if run_dir else None
        if found is None:
            raise RuntimeError(f"checkpoint {ckpt.path} is damaged ({'; '.join(problems[:5])}) and no earlier "
                               "checkpoint of the run verifies")
        damaged = f"{latest}: {'; '.join(problems[:3])}"
        print(f"checkpoint {latest} is damaged ({'; '.join(problems[:3])}); resuming from {found[0]}", flush=True)
        local = str(found[1])
    state = json.loads((Path(local) / STATE_FILE).read_text())
    return RestorePoint(int(state["stage_index"]), int(state["step"]), local, damaged)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker of a run: load, run the pipeline's stages from the restore point, evaluate, log."""
    import ray.train

    from orchestrator.stages.evaluation import evaluate_model

    entered = time.time()
    if not verbose():  # Ray Train's INFO lines (a report, a checkpoint) only with --verbose
        logging.getLogger().setLevel(logging.WARNING)
    timings: dict[str, float] = {}  # run phases on rank 0's clock, logged as time/<phase>_s at the end
    watch = Stopwatch(timings)
    if loop_config.get("fit_started_at"):  # Ray Train's controller and worker-group start, process spawn, imports
        timings["worker_start"] = entered - float(loop_config["fit_started_at"])
    worker = Worker.start(loop_config, watch)
    with watch("restore"):
        restore = restore_point(loop_config.get("spool"))
    worker.tag_settings(restore)
    try:
        engine, model, offset = run_pipeline(worker, restore, watch)
    except StopRequested as stop:  # its checkpoint is reported: the driver marks the run and a rerun resumes
        worker.end_stopped(stop, restore)
        return
    with watch("eval"):
        context = worker.stage_context(len(worker.cfg.pipeline), offset, model, lambda *a: None)
        metrics, predictions = evaluate_model(context, engine if engine is not None else model)
    if restore.folder:
        shutil.rmtree(restore.folder, ignore_errors=True)
    if worker.logger is not None:
        worker.finish_logging(metrics, predictions, offset, watch, time.time() - entered)
    ray.train.report({"done": 1.0, **{k: v for k, v in metrics.items() if k.endswith("/mae")}})


def run_pipeline(worker: Worker, restore: RestorePoint, watch: Stopwatch):
    """The pipeline's stages from the restore point, each starting from the previous one's weights:
    (the last engine or None, the last plain module, the global step after the last stage)."""
    cfg, engine, model = worker.cfg, None, worker.model
    offset = sum(s.steps for s in cfg.pipeline[: restore.stage_index])
    for index, stage in enumerate(cfg.pipeline):
        if index < restore.stage_index:
            continue
        if engine is not None:  # the previous stage's weights, full and merged, start this one
            with watch("handoff"):
                model = handoff_module(engine).to(worker.device)
        model = add_lora_adapters(model, cfg.model.lora)  # fresh adapters per stage (no-op without LoRA)
        ctx = worker.stage_context(index, offset, model, functools.partial(worker.save_checkpoint, index))
        ctx.stop = worker.stop
        resuming = index == restore.stage_index and restore.folder is not None
        engine = stage_runner(stage.kind)(ctx, stage, restore.step if resuming else 0,
                                          restore.folder if resuming else None)
        worker.tag_gradient_average(index, engine)
        offset += stage.steps
    return engine, model, offset


@dataclass
class Worker:
    """One Ray Train worker's run: its config and place in the group, what it loaded, rank 0's logger."""

    cfg: RunConfig
    rank: int
    world_size: int
    device: Any  # torch.device
    model: Any
    tokenizer: Any
    dataset: Any  # BuiltDataset
    processor: Any  # ImageOnlyProcessor on an image dataset with a vision-language model, else None
    logger: RunLogger | None  # rank 0 only
    timings: dict[str, float]
    stop: StopWatcher | None = None  # rank 0 only: the stop markers of runtime/stopping.py

    @classmethod
    def start(cls, loop_config: dict[str, Any], watch: Stopwatch) -> Worker:
        import ray.train
        import torch

        cfg = RunConfig.model_validate(loop_config["config"])
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        if cfg.scaling.use_gpu:
            device = torch.device("cuda", context.get_local_rank())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            # One thread per worker: oversubscribed CPU threads make steps many times slower.
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        torch.manual_seed(cfg.seed + rank)
        with watch("model_load"):  # through storage, or prepared on this node: never a path of the driver's disk
            model_source = model_on_this_node(loop_config["model"], cfg.model)
            model, tokenizer = load_model_and_tokenizer(cfg.model, model_source)
            model.to(device)
            dataset = load_built(folder_on_this_node(loop_config["dataset"]))
            processor = image_processor_for(cfg, tokenizer, dataset, model_source)
        with watch("tracking"):
            logger = None
            if rank == 0:
                logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"], loop_config["spool"])
        stop = StopWatcher(loop_config.get("stop_markers", [])) if rank == 0 else None
        return cls(cfg, rank, world, device, model, tokenizer, dataset, processor, logger, watch.timings, stop)

    def stage_context(self, index: int, offset: int, model, checkpoint) -> StageContext:
        return StageContext(
            cfg=self.cfg, model=model, tokenizer=self.tokenizer, digit_token_ids=digit_token_ids(self.tokenizer),
            dataset=self.dataset, rank=self.rank, world_size=self.world_size, device=self.device,
            stage_index=index, global_step_offset=offset, log=self.log, checkpoint=checkpoint,
            processor=self.processor, timings=self.timings,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Rank 0: the metrics to MLflow, and one progress line (`ray job logs` and the terminal show it)."""
        if self.logger is None:
            return
        self.logger.log_metrics(metrics, step)
        if "train/loss" in metrics:
            print(progress_line(self.cfg, metrics, step), flush=True)

    def save_checkpoint(self, stage_index: int, engine, step: int, metrics: dict[str, float],
                        reference: ReferencePolicy | None = None) -> None:
        """The engine's state (and the GRPO reference's weights) as a Ray Train checkpoint, with the restore
        point and a manifest every file is checked against at restore."""
        import ray.train
        from ray.train import Checkpoint

        # Every rank takes part: under ZeRO-3 both the engine save and the reference gather are collective.
        reference_state = reference.state_dict() if reference is not None else None
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag="ckpt")
            if self.rank == 0:
                state = {"stage_index": stage_index, "step": step, "world_size": self.world_size,
                         "skipped_steps": int(metrics.get(SKIPPED_METRIC, 0))}
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
                if reference_state is not None:
                    save_file(reference_state, str(Path(tmp) / REFERENCE_FILE))
                if reference is not None:
                    (Path(tmp) / REFERENCE_STATE_FILE).write_text(json.dumps(reference.checkpoint_state()))
            write_manifest(tmp, self.rank)  # last: a restore checks every file against it
            ray.train.report(dict(metrics), checkpoint=Checkpoint.from_directory(tmp))

    def tag_settings(self, restore: RestorePoint) -> None:
        """Where the run resumed and which node runs rank 0, and process settings that change speed, not
        results."""
        import ray
        import torch

        if self.logger is None:
            return
        if restore.folder is not None:
            self.logger.set_tag(RESUMED_FROM_TAG, f"stage {restore.stage_index} step {restore.step}")
        if restore.skipped_damaged:
            self.logger.set_tag(DAMAGED_CHECKPOINT_TAG, restore.skipped_damaged)
        self.logger.set_tag(WORKER_THREADS_TAG, str(torch.get_num_threads()))
        self.logger.set_tag(WORKER_MALLOC_TAG, os.environ.get("GLIBC_TUNABLES", "glibc default"))
        self.logger.set_tag(PRECISION_TAG, resolved_precision(self.cfg.deepspeed, self.cfg.scaling.use_gpu))
        self.logger.set_tag(WORKER_NODE_TAG, ray.get_runtime_context().get_node_id())

    def end_stopped(self, stop: StopRequested, restore: RestorePoint) -> None:
        """A stop at a step boundary: no evaluation; rank 0 delivers what it queued (the driver then marks the
        run KILLED with the reason)."""
        if restore.folder:
            shutil.rmtree(restore.folder, ignore_errors=True)
        if self.logger is not None:
            print(f"run {self.cfg.name}: {stop}; checkpoint saved", flush=True)
            self.logger.close(self.cfg.tracking.flush_timeout_s)

    def tag_gradient_average(self, stage_index: int, engine) -> None:
        """How this stage's gradients were averaged over the workers."""
        if self.logger is not None and self.world_size > 1:
            how = "shared memory" if shared_gradients_of(engine) is not None else "deepspeed"
            self.logger.set_tag(stage_tag(stage_index, "grad_average"), how)

    def finish_logging(self, metrics: dict[str, float], predictions: dict, step: int, watch: Stopwatch,
                       elapsed: float) -> None:
        """The evaluation, predictions and plots, then the run's phases on rank 0's clock (logged here, not
        reported: fit() returns only the latest checkpoint's metrics; the driver dates the workers' end by
        this metric's timestamp). Everything queued reaches the store, or the run fails loudly."""
        from orchestrator.stages.evaluation import collapse_tags

        with watch("tracking"):
            self.logger.log_metrics(metrics, step)
            for tag, value in collapse_tags(predictions).items():  # a model answering nearly one number
                self.logger.set_tag(tag, value)
            log_predictions(self.logger, predictions, self.dataset)
        self.timings["worker_total"] = elapsed
        self.logger.log_metrics({f"time/{k}_s": v for k, v in self.timings.items()}, step)
        self.logger.log_metrics(device_memory_metrics(self.device), step)
        self.logger.close(self.cfg.tracking.flush_timeout_s)


def progress_line(cfg: RunConfig, metrics: dict[str, float], step: int) -> str:
    """`run NAME | stage 2/2 grpo:ccc | step 20/40 | loss 0.0123 | lr 1.0e-04 | 12.3 samples/s | ETA 0:01:05`:
    one line per logging window; samples/s where the stage logs it, GRPO's mean reward, and the time left in
    the stage at the window's pace."""
    index = int(metrics.get("train/stage", 0))
    stage = cfg.pipeline[index]
    in_stage = step - sum(s.steps for s in cfg.pipeline[:index])
    parts = [f"run {cfg.name}", f"stage {index + 1}/{len(cfg.pipeline)} {stage.label()}",
             f"step {in_stage}/{stage.steps}", f"loss {metrics['train/loss']:.4g}"]
    if "train/lr" in metrics:
        parts.append(f"lr {metrics['train/lr']:.1e}")
    if "train/reward/mean" in metrics:
        parts.append(f"reward {metrics['train/reward/mean']:.3g}")
    if "train/samples_per_s" in metrics:
        parts.append(f"{metrics['train/samples_per_s']:.1f} samples/s")
    if "time/step_s" in metrics:
        left = round(metrics["time/step_s"] * (stage.steps - in_stage))
        parts.append(f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")
    return " | ".join(parts)


def image_processor_for(cfg: RunConfig, tokenizer, dataset, model_source: str):
    """The image processor when the dataset has images (refusing a text-only model, which would silently
    answer without seeing them); None on a text dataset, which keeps a VLM on the text path."""
    from orchestrator.modeling.models import load_image_processor

    processor = load_image_processor(cfg.model, tokenizer, model_source)
    if dataset.has_images and processor is None:
        raise ConfigError(
            f"dataset {dataset.meta['name']!r} has images but model.source={cfg.model.source!r} is text-only; "
            f"use a vision-language source (model.tiny.architecture=qwen2-vl|smolvlm, smolvlm-smollm2-135m)"
        )
    return processor if dataset.has_images else None


def log_predictions(logger: RunLogger, predictions: dict, dataset) -> None:
    """Each split's predictions as Parquet, and its diagnostic plots (scatter, MAE per bin with the shot
    regions shaded, training-label histogram) under plots/{split}/."""
    from orchestrator.reporting.plots import cell_plots

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

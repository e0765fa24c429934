"""The Ray Train worker loop of one run: load, run the pipeline's stages in order, evaluate, log."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from safetensors.torch import save_file

from orchestrator.config import ConfigError, RunConfig
from orchestrator.data import load_built
from orchestrator.engine.checkpoints import STATE_FILE, verify_checkpoint, write_manifest
from orchestrator.modeling.models import (
    add_lora_adapters,
    digit_token_ids,
    load_model_and_tokenizer,
)
from orchestrator.stages.timing import Stopwatch
from orchestrator.tracking.logger import RunLogger


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

    from orchestrator.engine.handoff import handoff_module
    from orchestrator.engine.reference import REFERENCE_FILE
    from orchestrator.modeling.models import load_image_processor
    from orchestrator.stages.context import StageContext
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

"""The DeepSpeed engine of a stage: config, optimizer, schedule, gradient averaging, clipping."""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any

import torch
import torch.distributed as dist

from orchestrator import compat
from orchestrator.config import DeepSpeedConfig, RunConfig
from orchestrator.engine.shared_grads import SharedGradients, shared_gradients_for
from orchestrator.methods.schedules import lr_factor

# The SharedGradients of each engine that averages its gradients through shared memory: kept here rather
# than on DeepSpeed's engine object, and dropped with the engine.
_SHARED_GRADIENTS: weakref.WeakKeyDictionary[Any, SharedGradients] = weakref.WeakKeyDictionary()


def resolved_precision(ds: DeepSpeedConfig, use_gpu: bool) -> str:
    """"bf16" or "fp32": `auto` is bf16 on a GPU that supports it, fp32 everywhere else."""
    bf16 = ds.precision == "bf16" or (ds.precision == "auto" and use_gpu and torch.cuda.is_bf16_supported())
    return "bf16" if bf16 else "fp32"


def training_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype DeepSpeed gives a stage's parameters under this config (its buffers stay fp32)."""
    return torch.bfloat16 if resolved_precision(cfg.deepspeed, cfg.scaling.use_gpu) == "bf16" else torch.float32


def deepspeed_json(stage, ds: DeepSpeedConfig, use_gpu: bool) -> dict[str, Any]:
    """The one place a config becomes DeepSpeed's JSON."""
    bf16 = resolved_precision(ds, use_gpu) == "bf16"
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-compiled DeepSpeed op
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:  # DeepSpeed would otherwise average the workers' gradients in bf16 (8 bits of mantissa)
        config["communication_data_type"] = "fp32"
    return config


def build_engine(model: torch.nn.Module, stage, cfg: RunConfig, params=None):
    """A DeepSpeed engine for one stage: torch AdamW (fused), warm-up, then the stage's lr schedule."""
    import deepspeed

    if not cfg.scaling.use_gpu:
        compat.skip_deepspeed_cpu_shm_op()

    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    # fused: torch's one-kernel AdamW (CPU and GPU), the same update as the per-tensor loop at a fraction
    # of its time.
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay, fused=True)
    # DeepSpeed steps the schedule once per optimizer step (at each accumulation boundary).
    total = stage.optimizer_steps()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, stage.warmup_steps, total, stage.lr_schedule)
    )
    config = deepspeed_json(stage, cfg.deepspeed, cfg.scaling.use_gpu)
    fp32_zero0 = config["zero_optimization"]["stage"] == 0 and not config["bf16"]["enabled"]
    shared = None
    if fp32_zero0 and uses_shared_memory_grads(cfg):
        shared = shared_gradients_for(trainable)  # None where workers span machines or /dev/shm is small
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=config,
        dist_init_required=False,
    )
    if shared is not None:
        compat.disable_backward_allreduce(engine)  # optimizer_step averages through shared memory instead
        _SHARED_GRADIENTS[engine] = shared
    if fp32_zero0:  # the same clipping as DeepSpeed's, without its collective
        clip = functools.partial(clip_averaged_gradients_, engine.module, config["gradient_clipping"])
        compat.replace_fp32_clipping(engine, clip)
    return engine


def shared_gradients_of(engine) -> SharedGradients | None:
    """The SharedGradients that average this engine's gradients (build_engine), or None where DeepSpeed's
    own all-reduce does."""
    return _SHARED_GRADIENTS.get(engine)


def clip_averaged_gradients_(module: torch.nn.Module, max_norm: float) -> None:
    """Scale every gradient by max_norm / (norm + 1e-6) where that is below 1, norm being the 2-norm of
    all of them: DeepSpeed's fp32 clipping without its all-reduce of the norm over the workers. Under
    ZeRO-0 every worker already holds the same averaged gradients, hence the same norm, and that
    all-reduce costs a gloo round trip per step on CPU. A factor of 1 skips the pass over the
    gradients (multiplying by 1 changes nothing)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    scale = torch.tensor(float(max_norm), dtype=norm.dtype) / (norm + 1e-6)
    if scale < 1:
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))


def uses_shared_memory_grads(cfg: RunConfig) -> bool:
    """Whether an fp32 ZeRO-0 stage's gradients may be averaged through shared memory
    (engine/shared_grads.py): on CPU, more than one worker, and the setting on."""
    return (
        cfg.deepspeed.shared_memory_grads and not cfg.scaling.use_gpu
        and dist.is_initialized() and dist.get_world_size() > 1
    )


def optimizer_step(engine) -> None:
    """engine.step(); at a gradient-accumulation boundary, after averaging the gradients through shared
    memory where build_engine set that up (DeepSpeed's own all-reduce is then off)."""
    shared = shared_gradients_of(engine)
    if shared is not None and engine.is_gradient_accumulation_boundary():
        shared.average_()
    engine.step()


@contextlib.contextmanager
def full_parameters(engine_or_model):
    """Generation needs whole weights: under ZeRO-3 gather them for the duration, and take DeepSpeed's
    per-module hooks off meanwhile (compat.zero3_hooks_removed): they would run for every submodule at every
    generated token, to fetch parameters that are already whole."""
    module = getattr(engine_or_model, "module", engine_or_model)
    zero3 = getattr(engine_or_model, "zero_optimization_stage", lambda: 0)() == 3
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if getattr(engine_or_model, "optimizer", None) is None:  # an engine without an optimizer has no hooks
                yield module
            else:
                with compat.zero3_hooks_removed(engine_or_model):
                    yield module
    else:
        yield module

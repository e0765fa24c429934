"""What every stage needs: the DeepSpeed engine, the worker's place in the group, and hooks back to
the train loop (logging on rank 0, checkpointing through Ray Train)."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.config import DeepSpeedConfig, RunConfig
from orchestrator.shared_grads import shared_gradients_for
from orchestrator.tracking import Stopwatch

REFERENCE_FILE = "reference.safetensors"  # GRPO's frozen start-of-stage policy, inside a checkpoint


@dataclass
class StageContext:
    cfg: RunConfig
    model: torch.nn.Module  # the bare module, carried from stage to stage
    tokenizer: Any
    digit_token_ids: torch.Tensor
    dataset: Any  # BuiltDataset
    rank: int
    world_size: int
    device: torch.device
    stage_index: int
    global_step_offset: int  # steps done in earlier stages, so train/* metrics form one curve
    log: Callable[[dict[str, float], int], None]  # rank-0 metric logger (no-op elsewhere)
    checkpoint: Callable[[Any, int, dict[str, float]], None]  # (engine, step_in_stage, metrics)
    extra: dict[str, Any] = field(default_factory=dict)
    # vision.ImageOnlyProcessor when the model is a VLM AND the dataset has images; None keeps every
    # stage on its text path (no image work at all).
    processor: Any = None
    # Seconds per run phase (deepspeed_init, train, checkpoint, ...), summed over stages; rank 0 logs
    # them as time/<phase>_s at the end of the run.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def stopwatch(self) -> Stopwatch:
        return Stopwatch(self.timings)

    def prompt_text(self, prompt: str) -> str:
        """The user turn: the prompt, after the image placeholders when rows carry images."""
        return prompt if self.processor is None else self.processor.prompt_text(prompt)

    def image_column(self, table) -> list[bytes] | None:
        """A split's encoded images (None on the text path); decoded per batch, never all at once."""
        return None if self.processor is None else table.column("image").to_pylist()

    def image_batch(self, images: list[bytes] | None, rows):
        """Pixel inputs for these row indices (None on the text path)."""
        if images is None:
            return None
        from orchestrator.vision import ImageBatch

        return ImageBatch.from_bytes(self.processor, [images[int(i)] for i in rows])


def deepspeed_json(stage, ds: DeepSpeedConfig, use_gpu: bool) -> dict[str, Any]:
    """The one place a config becomes DeepSpeed's JSON."""
    bf16 = ds.precision == "bf16" or (ds.precision == "auto" and use_gpu and torch.cuda.is_bf16_supported())
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-compiled DeepSpeed op
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _skip_cpu_shm_op() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op (60-90 s) the first time its comm layer
    starts on CPU. That op serves DeepSpeed inference, not ZeRO training over gloo: mark it
    unavailable so nothing compiles."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up over
    `warmup` steps, then `constant`, or a `linear`/`cosine` decay reaching 0 after step `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup + 1) / (total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; allowed: linear, cosine, constant")


def build_engine(model: torch.nn.Module, stage, cfg: RunConfig, params=None):
    """A DeepSpeed engine for one stage: torch AdamW (fused), warm-up, then the stage's lr schedule."""
    import deepspeed

    if not cfg.scaling.use_gpu:
        _skip_cpu_shm_op()

    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    # fused: torch's one-kernel AdamW (CPU and GPU), the same update as the per-tensor loop at a fraction
    # of its time (134M parameters on 2 CPU threads: 0.10 s a step against 0.35 s, measured).
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, stage.warmup_steps, stage.steps, stage.lr_schedule)
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
        engine.enable_backward_allreduce = False  # optimizer_step averages through shared memory instead
    engine.shared_gradients = shared
    if fp32_zero0:
        # DeepSpeed clips fp32 ZeRO-0 gradients itself (engine.clip_fp32_gradients); this one gives the
        # same scale without its collective.
        engine.clip_fp32_gradients = functools.partial(clip_averaged_gradients_, engine.module, config["gradient_clipping"])
    return engine


def clip_averaged_gradients_(module: torch.nn.Module, max_norm: float) -> None:
    """Scale every gradient by max_norm / (norm + 1e-6) where that is below 1, norm being the 2-norm of
    all of them: DeepSpeed's fp32 clipping without its all-reduce of the norm over the workers. Under
    ZeRO-0 every worker already holds the same averaged gradients, hence the same norm, and that
    all-reduce costs a gloo round trip (1-2 ms) per step on CPU. A factor of 1 skips the pass over the
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
    (orchestrator/shared_grads.py): on CPU, more than one worker, and the setting on."""
    return (
        cfg.deepspeed.shared_memory_grads and not cfg.scaling.use_gpu
        and dist.is_initialized() and dist.get_world_size() > 1
    )


def optimizer_step(engine) -> None:
    """engine.step(); at a gradient-accumulation boundary, after averaging the gradients through shared
    memory where build_engine set that up (DeepSpeed's own all-reduce is then off)."""
    if engine.shared_gradients is not None and engine.is_gradient_accumulation_boundary():
        engine.shared_gradients.average_()
    engine.step()


@contextlib.contextmanager
def full_parameters(engine_or_model):
    """Generation needs whole weights: under ZeRO-3 gather them for the duration."""
    module = getattr(engine_or_model, "module", engine_or_model)
    zero3 = getattr(engine_or_model, "zero_optimization_stage", lambda: 0)() == 3
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module
    else:
        yield module


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum scalars across workers in one collective (no-op outside a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


# --------------------------------------------------------------------------- between stages


def gathered_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full weights of the engine's module on EVERY rank, as CPU copies. Under ZeRO-3 the shards are
    gathered one submodule at a time (DeepSpeed's own consolidation fills rank 0 only)."""
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        params = list(sub.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            for name, p in params:
                state[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
    for key, value in module.state_dict().items():  # persistent buffers are never partitioned
        state.setdefault(key, value.detach().cpu().clone())
    return state


def handoff_module(engine) -> torch.nn.Module:
    """The stage's result as a plain module with full weights and any LoRA adapters merged, so the
    next stage's engine (and its reference policy) starts from exactly this stage's weights. The old
    engine is destroyed: its ZeRO gradient hooks would otherwise keep firing in the next stage."""
    from orchestrator.models import is_lora_model, merge_lora_adapters

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        from orchestrator.rvtc import HEAD_ATTR, RvtcHead

        state = gathered_state_dict(engine)
        lora = module.peft_config["default"] if is_lora_model(module) else None
        base = module.get_base_model() if lora is not None else module
        fresh = type(base)(base.config)  # the same class: a VLM stays a VLM
        head = getattr(base, HEAD_ATTR, None)
        if head is not None:
            setattr(fresh, HEAD_ATTR, RvtcHead(head.linear.in_features, head.bins, head.label_min, head.label_max))
        if lora is not None:
            from peft import get_peft_model

            fresh = get_peft_model(fresh, lora)
        fresh.load_state_dict(state)
        fresh.to(dtype=next(iter(state.values())).dtype)
        module = fresh
    engine.destroy()
    return merge_lora_adapters(module)


class ReferencePolicy:
    """The frozen policy the KL term compares against: the stage's starting weights.

    - LoRA: the policy itself with its adapters disabled (no copy at all);
    - ZeRO-3: a frozen copy partitioned by an optimizer-free DeepSpeed engine;
    - otherwise: a frozen copy (no gradients, no optimizer state).
    Build it BEFORE the policy's engine: ZeRO-3 partitions the start module in place."""

    def __init__(self, start_module: torch.nn.Module, cfg: RunConfig, stage, lora: bool, weights: dict | None = None):
        self.lora = lora
        self.model = None
        if lora:
            return
        frozen = copy.deepcopy(start_module).eval()
        if weights is not None:  # resuming: the reference saved with the checkpoint
            frozen.load_state_dict(weights)
        frozen.requires_grad_(False)
        if cfg.deepspeed.zero_stage == 3:
            import deepspeed

            ds = deepspeed_json(stage, cfg.deepspeed, cfg.scaling.use_gpu)
            ds = {k: ds[k] for k in ("train_micro_batch_size_per_gpu", "zero_optimization", "bf16")}
            ds["zero_optimization"] = {"stage": 3}
            frozen = deepspeed.initialize(model=frozen, config=ds, dist_init_required=False)[0]
            frozen.eval()
        self.model = frozen

    @contextlib.contextmanager
    def forward_model(self, policy_engine):
        """The callable that computes reference log-probs."""
        if self.lora:
            with policy_engine.module.disable_adapter():
                yield policy_engine
        else:
            yield self.model

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full reference weights for a checkpoint (None under LoRA: the policy checkpoint holds the base).
        Collective under ZeRO-3: every rank must call it."""
        if self.model is None:
            return None
        if hasattr(self.model, "zero_optimization_stage"):
            return gathered_state_dict(self.model)
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

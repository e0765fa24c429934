"""Between stages: a stage's result as a plain module with full weights."""

from __future__ import annotations

import torch


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
    next stage's engine (and its reference policy) starts from exactly this stage's weights. This stage's
    engine is destroyed: its ZeRO gradient hooks would otherwise keep firing in the next stage."""
    from orchestrator.modeling.models import merge_lora_adapters

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        module = unpartitioned_copy(module, gathered_state_dict(engine))
    engine.destroy()
    return merge_lora_adapters(module)


def unpartitioned_copy(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh module of `module`'s class (its LoRA adapters and rvtc head included) holding `state`, its
    parameters in the dtype the state's parameters have and its buffers as the fresh module built them (fp32,
    as DeepSpeed keeps them: RoPE's inv_freq in bf16 would shift every rotary angle)."""
    from orchestrator.methods.rvtc import HEAD_ATTR, RvtcHead
    from orchestrator.modeling.models import is_lora_model

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
    dtype = state[next(name for name, _ in fresh.named_parameters())].dtype
    for param in fresh.parameters():
        param.data = param.data.to(dtype)
    return fresh

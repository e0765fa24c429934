"""GRPO's reference policy: the frozen start-of-stage weights."""

from __future__ import annotations

import contextlib
import copy

import torch

from orchestrator.config import RunConfig
from orchestrator.engine.deepspeed import deepspeed_json
from orchestrator.engine.handoff import gathered_state_dict

REFERENCE_FILE = "reference.safetensors"  # GRPO's frozen start-of-stage policy, inside a checkpoint
REFERENCE_STATE_FILE = "reference_state.json"  # the KL weight β reached against it (it moves under adaptive control)


def engine_dtype(cfg: RunConfig, stage) -> torch.dtype:
    """The dtype the stage's DeepSpeed engine gives the policy's parameters: bf16 where it runs bf16, else fp32."""
    bf16 = deepspeed_json(stage, cfg.deepspeed, cfg.scaling.use_gpu)["bf16"]["enabled"]
    return torch.bfloat16 if bf16 else torch.float32


class ReferencePolicy:
    """The frozen policy the KL term compares against: the stage's starting weights.

    - LoRA: the policy itself with its adapters disabled (no copy at all);
    - ZeRO-3: a frozen copy partitioned by an optimizer-free DeepSpeed engine;
    - otherwise: a frozen copy (no gradients, no optimizer state), its parameters (not its buffers) cast to
      `dtype` (default: the policy engine's, engine_dtype), as DeepSpeed casts the policy's: at the stage's
      first step both compute the same log-probs, so the KL term starts at 0.
    Build it BEFORE the policy's engine: ZeRO-3 partitions the start module in place.
    `kl_coef` is the weight β the KL to it carries now (the stage's β, moved by an adaptive controller); a
    checkpoint saves it with the weights, which a periodic refresh (`refresh`) may have moved too."""

    def __init__(self, start_module: torch.nn.Module, cfg: RunConfig, stage, lora: bool, weights: dict | None = None,
                 dtype: torch.dtype | None = None, kl_coef: float | None = None):
        self.lora = lora
        self.model = None
        self.kl_coef = float(stage.beta if kl_coef is None else kl_coef)
        if lora:
            return
        frozen = copy.deepcopy(start_module).eval()
        if weights is not None:  # resuming: the reference saved with the checkpoint
            frozen.load_state_dict(weights)
        frozen.requires_grad_(False)
        if cfg.deepspeed.zero_stage == 3:  # its engine casts the copy as the policy's engine casts the policy
            import deepspeed

            ds = deepspeed_json(stage, cfg.deepspeed, cfg.scaling.use_gpu)
            ds = {k: ds[k] for k in ("train_micro_batch_size_per_gpu", "zero_optimization", "bf16")}
            ds["zero_optimization"] = {"stage": 3}
            frozen = deepspeed.initialize(model=frozen, config=ds, dist_init_required=False)[0]
            frozen.eval()
        else:
            dtype = dtype or engine_dtype(cfg, stage)
            for param in frozen.parameters():
                param.data = param.data.to(dtype)
        self.model = frozen

    @contextlib.contextmanager
    def forward_model(self, policy_engine):
        """The callable that computes reference log-probs."""
        if self.lora:
            with policy_engine.module.disable_adapter():
                yield policy_engine
        else:
            yield self.model

    def refresh(self, policy_engine, alpha: float = 1.0) -> None:
        """π_ref ← α·π + (1 − α)·π_ref, parameter by parameter, in the reference's dtype (TR-DPO, Gorbatovski et
        al. 2024): α = 1 copies the policy. Needs the frozen copy of ZeRO-0..2, where every worker holds the whole
        policy and so computes the same reference."""
        if self.model is None or hasattr(self.model, "zero_optimization_stage"):
            raise RuntimeError("refreshing the reference needs a frozen copy of the policy: not under LoRA or ZeRO-3")
        policy = dict(policy_engine.module.named_parameters())
        with torch.no_grad():
            for name, ref in self.model.named_parameters():
                current = policy[name].detach().to(ref.dtype)
                if alpha == 1.0:
                    ref.copy_(current)
                else:
                    ref.mul_(1.0 - alpha).add_(current, alpha=alpha)

    def checkpoint_state(self) -> dict[str, float]:
        """What a checkpoint keeps besides the weights (REFERENCE_STATE_FILE)."""
        return {"kl_coef": self.kl_coef}

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full reference weights for a checkpoint (None under LoRA: the policy checkpoint holds the base).
        Collective under ZeRO-3: every rank must call it."""
        if self.model is None:
            return None
        if hasattr(self.model, "zero_optimization_stage"):
            return gathered_state_dict(self.model)
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

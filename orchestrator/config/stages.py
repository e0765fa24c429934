"""The stages of a pipeline (METHODS §3-5): their fields, the `sft:ce -> grpo:ccc` shorthand, and the
per-kind defaults of the `stages` section."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from orchestrator.config.base import ConfigError, StrictSection


class StageBase(StrictSection):
    """The optimisation settings every stage has: AdamW, a warm-up then an lr schedule, DeepSpeed batching."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    warmup_steps: int = Field(
        0, ge=0, description="Optimizer steps of linear warm-up to lr (0: start at lr)."
    )
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="After warm-up: decay to 0 at the stage's last step (linear, as TRL's default, or "
        "cosine), or hold the peak (constant)."
    )
    steps: int = Field(
        100, ge=0, description="Steps in this stage: optimizer steps for SFT; rollout batches for GRPO, each "
        "making num_iterations updates."
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per forward pass.")
    grad_accum: int = Field(
        1, ge=1, description="SFT: micro-batches accumulated per optimizer step (global batch = micro_batch_size "
        "x grad_accum x workers). GRPO: the chunks each rollout's B x G samples run in, per update."
    )
    max_grad_norm: float = Field(
        1.0, ge=0, description="Clip the 2-norm of all gradients to this before each update; 0 does not clip."
    )


SFT_LOSSES = ("ce", "softlabel", "dist2", "rvtc")


class SFTStage(StageBase):
    """Supervised fine-tuning on the answer tokens only (METHODS §3); `rvtc` instead trains a K-bin
    classification head on the last prompt token's hidden state (the model then answers through the head)."""

    kind: Literal["sft"] = Field("sft", description="Stage kind: supervised fine-tuning.")
    loss: Literal["ce", "softlabel", "dist2", "rvtc"] = Field(
        "ce",
        description="ce: one-hot cross-entropy; softlabel: soft targets on digit tokens (SoftLabel, seed 000); "
        "dist2: CE plus a distance-aware KL on digit tokens (DIST²Loss, seed 003); rvtc: regression via "
        "classification with a K-bin head (RvTC, seed 002).",
    )
    digit_weight: float = Field(
        1.0, gt=0, description="`ce`: weight λ of each digit token's CE (the normaliser still counts every token "
        "once); 2 is the control that up-weights digits as SoftLabel does, without soft targets."
    )
    psi: Literal["triangular", "binomial", "poisson", "uniform"] = Field(
        "triangular",
        description="`softlabel`: the shape ψ of the soft mass over the digits 0..9, centred on the target digit "
        "(SoftLabel, seed 000; the shapes are defined in orchestrator/methods/losses.py).",
    )
    eta: float | None = Field(
        None, ge=0, le=1, description="`softlabel`: η, the mass moved from the one-hot target to ψ: "
        "q = (1 - η)·onehot + η·ψ. None: the paper's value for psi (triangular 0.08, binomial 0.05, "
        "poisson 0.02, uniform 0.05)."
    )
    softlabel_lambda: float = Field(
        2.0, gt=0, description="`softlabel`: λ, the weight of the digit tokens' soft CE beside the other tokens' "
        "CE (SoftLabel, seed 000: 2)."
    )
    tau: float = Field(
        1.0, gt=0, description="`dist2`: temperature τ of the digit target softmax(-(v - t)² / τ); smaller is "
        "sharper (DIST²Loss, seed 003: 1)."
    )
    alpha: float = Field(
        0.1, ge=0, description="`dist2`: α, the weight of the digit tokens' KL(target ‖ model) added to the CE "
        "(DIST²Loss, seed 003: 0.1)."
    )
    place_value_weights: bool = Field(
        False, description="`dist2`: weight each digit's KL by its place (units 1, tens 2, hundreds 3, "
        "thousands and above 4) (DIST²Loss, seed 003)."
    )
    rvtc_bins: int = Field(
        51, ge=2, description="`rvtc`: K, bins with evenly spaced centres over the training label range "
        "(RvTC, seed 002: 51)."
    )
    length_groups: int = Field(
        1, ge=1, description="Split each micro-batch into up to this many sub-batches of similar length, each "
        "padded only to its own longest row: the same rows and loss, less padding to compute.",
    )

    def resolved_eta(self) -> float:
        defaults = {"triangular": 0.08, "binomial": 0.05, "poisson": 0.02, "uniform": 0.05}
        return self.eta if self.eta is not None else defaults[self.psi]

    def label(self) -> str:
        return f"sft:{self.loss}"


class RewardTerm(StrictSection):
    """One named term of a GRPO stage's reward."""

    name: str = Field(..., description="Registered reward (format, mae, accuracy, ccc) or 'module:function'.")
    weight: float = Field(1.0, description="Factor of this term in the summed reward.")


class GRPOStage(StageBase):
    """Group-relative policy optimisation (METHODS §4; GRPO: Shao et al. 2024, DeepSeekMath)."""

    kind: Literal["grpo"] = Field("grpo", description="Stage kind: group-relative policy optimisation.")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate of AdamW (1e-5: the official CCC-GRPO code's).")
    micro_batch_size: int = Field(
        4, ge=1, description="B: prompts per worker per rollout (the batch of the `ccc` reward when "
        "ccc_scope=worker)."
    )
    group_size: int = Field(
        4, ge=2, description="G: completions sampled per prompt; advantages are relative to the prompt's group."
    )
    rewards: list[RewardTerm] = Field(
        default_factory=lambda: [RewardTerm(name="ccc")],
        description="The reward is the weighted sum of these terms; each term is also logged on its own.",
    )
    ccc_scope: Literal["worker", "global"] = Field(
        "worker",
        description="Batch of the `ccc` reward (CCC-GRPO, seed 001): worker: each worker's own B prompts (as the "
        "official code); global: the step's prompts gathered from every worker. It changes the reward.",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling of the rollouts: the smallest set of tokens with this much "
        "probability; 1 samples from the whole distribution."
    )
    max_new_tokens: int = Field(32, ge=1, description="Token budget of each sampled completion.")
    beta: float = Field(
        0.04, ge=0, description="β, the weight of the KL penalty to the reference policy (the policy at the start "
        "of this stage); 0.04 as the official CCC-GRPO code; 0 drops the term and loads no reference model."
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3",
        description="Per-token estimator of KL(π ‖ π_ref) from sampled tokens, r = log π_ref - log π "
        "(Schulman 2020, 'Approximating KL divergence'): k1 = -r, k2 = r²/2, k3 = exp(r) - r - 1. As a loss "
        "term on on-policy samples, k1's expected gradient is zero, k2's is that of KL(π ‖ π_ref), k3's "
        "that of KL(π_ref ‖ π).",
    )
    epsilon_low: float = Field(
        0.2, ge=0, description="ε_low: the probability ratio π / π_old is clipped below at 1 - ε_low "
        "(PPO-style clipping, as GRPO; inert when num_iterations = 1)."
    )
    epsilon_high: float = Field(
        0.2, ge=0, description="ε_high: the ratio is clipped above at 1 + ε_high; above epsilon_low it is DAPO's "
        "'clip-higher' (Yu et al. 2025)."
    )
    scale_rewards: bool = Field(
        True, description="true: advantage = (r - group mean) / (group std + 1e-4) (GRPO, Shao et al. 2024); "
        "false: r - group mean, without the std (Dr.GRPO, Liu et al. 2025)."
    )
    num_iterations: int = Field(
        1, ge=1, description="Policy updates per rollout batch (GRPO's μ); at 1 the ratio is 1, so clipping is "
        "inert and no old-policy forward runs."
    )
    loss_aggregation: Literal["token_mean", "seq_mean"] = Field(
        "token_mean",
        description="token_mean: every completion token of the global batch weighs the same (as DAPO, Yu et al. "
        "2025); seq_mean: each completion's token mean, averaged over completions (GRPO's 1/|o| "
        "normalisation, Shao et al. 2024, whose length bias Liu et al. 2025 (Dr.GRPO) point out).",
    )
    mae_reward_form: Literal["neg_range", "one_minus_scaled"] = Field(
        "neg_range",
        description="The `mae` reward: neg_range = -|ŷ - y| / label range (a parse failure -1); "
        "one_minus_scaled = 1 - min(1, |ŷ - y| / mae_scale) (a parse failure 0).",
    )
    mae_scale: float | None = Field(None, gt=0, description="Scale of `one_minus_scaled`; None = label range.")
    accuracy_tolerance: float = Field(
        0.0, ge=0, description="The `accuracy` reward is 1 when |ŷ - y| is at most this, else 0."
    )
    shared_prompt_forward: bool = Field(
        True,
        description="Run each prompt once for its G samples in the log-prob forwards (same numbers, less "
        "compute); the image path and ZeRO-3 always run whole rows.",
    )

    def label(self) -> str:
        return "grpo:" + "+".join(t.name for t in self.rewards)


Stage = Annotated[Union[SFTStage, GRPOStage], Field(discriminator="kind")]


def parse_pipeline(spec: str) -> list[dict[str, Any]]:
    """`"sft:ce -> grpo:ccc"` -> stage dicts. `zero-shot` is the empty pipeline (evaluation only)."""
    spec = spec.strip()
    if spec in ("zero-shot", ""):
        return []
    stages: list[dict[str, Any]] = []
    for part in re.split(r"\s*(?:->|→|>)\s*", spec):
        kind, _, arg = part.partition(":")
        if kind == "sft":
            if arg not in SFT_LOSSES:
                raise ConfigError(f"pipeline {spec!r}: unknown SFT loss {arg!r}; allowed: {', '.join(SFT_LOSSES)}")
            stages.append({"kind": "sft", "loss": arg})
        elif kind == "grpo":
            names = [n for n in arg.split("+") if n]
            if not names:
                raise ConfigError(f"pipeline {spec!r}: grpo needs a reward, e.g. grpo:ccc")
            stages.append({"kind": "grpo", "rewards": [{"name": n} for n in names]})
        else:
            raise ConfigError(f"pipeline {spec!r}: unknown stage {part!r}; write sft:LOSS or grpo:REWARD")
    return stages


class StageDefaults(StrictSection):
    """Settings for every stage of a kind (`stages.grpo.group_size: 8`), so a pipeline written as a
    shorthand (`sft:ce -> grpo:ccc`) or swept as an ablation axis keeps them. A field set on a stage
    itself (`pipeline.1.group_size`) wins over these, and these over the stage's own defaults."""

    sft: dict[str, Any] = Field(
        default_factory=dict, description="Fields every `sft` stage takes unless it sets them itself."
    )
    grpo: dict[str, Any] = Field(
        default_factory=dict, description="Fields every `grpo` stage takes unless it sets them itself."
    )

    @model_validator(mode="after")
    def _known_fields(self) -> "StageDefaults":
        for kind, model in (("sft", SFTStage), ("grpo", GRPOStage)):
            given = set(getattr(self, kind))
            unknown = sorted(given - set(model.model_fields) | ({"kind"} & given))
            if unknown:
                allowed = ", ".join(f for f in model.model_fields if f != "kind")
                raise ValueError(f"stages.{kind}: unknown field(s) {', '.join(unknown)}; allowed: {allowed}")
        return self

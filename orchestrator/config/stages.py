"""The stages of a pipeline (METHODS §3-5): their fields, the `sft:ce -> grpo:ccc` shorthand, and the
per-kind defaults of the `stages` section."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from orchestrator.config.base import ConfigError, StrictSection
from orchestrator.methods.grpo import (
    ADVANTAGE_BASELINES,
    ADVANTAGE_SCALINGS,
    IMPORTANCE_RATIOS,
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    REWARD_COMBINATIONS,
)
from orchestrator.methods.objectives import SFT_OBJECTIVES
from orchestrator.methods.rewards import REWARDS
from orchestrator.methods.schedules import LR_SCHEDULES


def registered(registry) -> str:
    """The registry's entries for a field description: `name` (summary; source), one after another."""
    parts = []
    for entry in registry:
        doc = (entry.value.__doc__ or "").strip().split("\n")[0].rstrip(".")
        notes = "; ".join(x for x in (doc, entry.source) if x)
        parts.append(f"{entry.name}" + (f" ({notes})" if notes else ""))
    return "; ".join(parts) + "."


class StageBase(StrictSection):
    """The optimisation settings every stage has: AdamW, a warm-up then an lr schedule, DeepSpeed batching."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    warmup_steps: int = Field(
        0, ge=0, description="Optimizer steps of linear warm-up to lr (0: start at lr)."
    )
    lr_schedule: Literal[LR_SCHEDULES.names()] = Field(
        "linear", description="After warm-up: decay from the peak (at the first step after warm-up) toward 0, "
        "linear (as TRL's default) or cosine, the last step still at a small positive lr; or hold the peak "
        "(constant)."
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
    log_every: int | None = Field(
        None, ge=1, description="Log this stage's train metrics every N steps; None: tracking.log_every, or when "
        "that is None too, every max(1, steps // 20) steps.",
    )

    def optimizer_steps(self) -> int:
        """Optimizer (and lr-schedule) steps the stage takes: one per step; its micro-batches accumulate."""
        return self.steps


# The registered objectives' names, in registration order.
SFT_LOSSES = SFT_OBJECTIVES.names()


class SFTChoice(StageBase):
    """Which SFT objective a stage trains (its parameters come from the objective's own section)."""

    kind: Literal["sft"] = Field("sft", description="Stage kind: supervised fine-tuning.")
    loss: Literal[SFT_LOSSES] = Field(
        "ce", description="The SFT objective (orchestrator/methods/objectives/), each with its parameters below: "
        + registered(SFT_OBJECTIVES),
    )


# Pydantic orders fields from the last base class to the first, then the class's own: the settings every
# stage has, the objective's name, each registered objective's parameters, then the SFT batching option.
class SFTStage(*reversed(SFT_OBJECTIVES.param_sections()), SFTChoice):
    """Supervised fine-tuning on the answer tokens only (METHODS §3); `rvtc` instead trains a K-bin
    classification head on the last prompt token's hidden state (the model then answers through the head)."""

    length_groups: int = Field(
        1, ge=1, description="Split each micro-batch into up to this many sub-batches of similar length, each "
        "padded only to its own longest row: the same rows and loss, less padding to compute.",
    )

    def label(self) -> str:
        return f"sft:{self.loss}"

    def answers_through_head(self) -> bool:
        """Whether the model then answers through a head instead of text (no generation budget applies)."""
        return SFT_OBJECTIVES[self.loss].answers_through_head


class RewardTerm(StrictSection):
    """One named term of a GRPO stage's reward."""

    name: str = Field(
        ..., description="A registered reward, or 'module:function' for your own: " + registered(REWARDS)
    )
    weight: float = Field(1.0, description="Factor of this term in the summed reward.")


class GRPOSettings(StageBase):
    """What a GRPO stage samples, how it rewards and how it updates; the rewards' parameters come from their
    own sections."""

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
    reward_parse_failure: Literal["penalty", "random"] = Field(
        "penalty",
        description="How a sample without a parsable answer enters the reward terms (METHODS §1): penalty: each "
        "term's own failure value (ccc and accuracy 0, mae −1 or 0, format 0; ccc leaves it out of its prompt's "
        "mean); random: a uniform value over the label range stands in for it before every term, as the "
        "official CCC-GRPO code does (format still pays 0), drawn from the run seed, stage, step and worker. "
        "Failures count in train/parse_fail_rate either way.",
    )
    ccc_scope: Literal["worker", "global"] = Field(
        "worker",
        description="Batch of the `ccc` reward (CCC-GRPO, seed 001): worker: each worker's own B prompts (as the "
        "official code); global: the step's prompts gathered from every worker. It changes the reward.",
    )
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature T of the rollouts; the policy, old-policy and reference "
        "log-probs of the loss are those of the sampled distribution, softmax(logits / T), as TRL computes them."
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling of the rollouts: the smallest set of tokens with this much "
        "probability; 1 samples from the whole distribution."
    )
    max_new_tokens: int = Field(32, ge=1, description="Token budget of each sampled completion.")
    beta: float = Field(
        0.04, ge=0, description="β, the weight of the KL penalty to the reference policy (the policy at the start "
        "of this stage); 0.04 as the official CCC-GRPO code; 0 drops the term and loads no reference model (and "
        "kl_placement, kl_control and ref_sync_every then do nothing)."
    )
    kl_placement: Literal["loss", "reward"] = Field(
        "loss", description="Where the KL penalty acts. loss: β·KL per token added to the loss (GRPO, Shao et al. "
        "2024); reward: each completion's reward minus β·KL summed over its tokens, before the advantages, as "
        "PPO-style RLHF (Ziegler et al. 2019; Stiennon et al. 2020; verl use_kl_in_reward); it costs one more "
        "no-grad policy forward when num_iterations = 1 and is logged as the reward term `kl_penalty` (its "
        "estimator is kl_estimator; those papers use k1)."
    )
    kl_control: Literal[KL_CONTROLLERS.names()] = Field(
        "fixed", description="How β moves: " + registered(KL_CONTROLLERS) + " The adaptive β is logged as "
        "train/kl_coef and saved with each checkpoint.",
    )
    ref_sync_every: int | None = Field(
        None, ge=1, description="Refresh the reference every this many steps: π_ref ← α·π + (1 − α)·π_ref with "
        "α = ref_sync_alpha (TR-DPO, Gorbatovski et al. 2024; TRL sync_ref_model / ref_model_sync_steps). None "
        "keeps the start-of-stage reference. The refreshed reference is what a checkpoint saves and a resume "
        "restores. Needs a reference copy: not with LoRA (whose reference is the adapter-free policy) nor ZeRO-3."
    )
    ref_sync_alpha: float = Field(
        1.0, gt=0, le=1, description="α of ref_sync_every: 1 copies the policy into the reference, below 1 mixes "
        "(TRL's ref_model_mixup_alpha, default 0.6 there)."
    )
    kl_estimator: Literal[KL_ESTIMATORS.names()] = Field(
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
    importance_ratio: Literal[IMPORTANCE_RATIOS.names()] = Field(
        "token", description="The ratio π / π_old that is clipped: " + registered(IMPORTANCE_RATIOS) + " GSPO pairs "
        "it with loss_aggregation=seq_mean and a far smaller ε (3e-4 to 4e-4). With num_iterations = 1 the ratio is "
        "1 either way, so this changes nothing.",
    )
    clip_ratio_c: float | None = Field(
        None, gt=1, description="Dual-clip PPO (Ye et al. 2020; verl clip_ratio_c, 3 there): a token with a "
        "negative advantage A loses at most −c·A, however far its ratio grows; None: off. With num_iterations = 1 "
        "the ratio is 1 and this changes nothing."
    )
    scale_rewards: Literal[ADVANTAGE_SCALINGS.names()] = Field(
        "group", description="How the centred rewards r - baseline are scaled into advantages (true and "
        "false are read as group and none): " + registered(ADVANTAGE_SCALINGS),
    )
    advantage_baseline: Literal[ADVANTAGE_BASELINES.names()] = Field(
        "group_mean", description="What each sample's reward is compared with before the scaling: "
        + registered(ADVANTAGE_BASELINES),
    )
    advantage_clip_low: float | None = Field(
        None, description="Advantages below this are raised to it, after the scaling (clipped advantages as in "
        "PPO for RLHF, Zheng et al. 2023 'Secrets of RLHF', MOSS-RLHF; OpenRLHF's advantage clip); None: no bound."
    )
    advantage_clip_high: float | None = Field(
        None, description="Advantages above this are lowered to it (as advantage_clip_low); None: no bound."
    )
    reward_combination: Literal[REWARD_COMBINATIONS.names()] = Field(
        "sum_then_normalise", description="How several reward terms become advantages. sum_then_normalise: their "
        "weighted sum, then the baseline and scale_rewards (GRPO; TRL's default). normalise_then_sum: each term "
        "through the baseline and scale_rewards within its group, then their weighted sum standardised over the "
        "step's batch (GDPO, Liu et al. 2026; TRL multi_objective_aggregation='normalize_then_sum'), so a weight is "
        "the term's share of the advantage whatever the term's range.",
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling (Yu et al. 2025; verl filter_groups): drop the groups whose "
        "rewards all agree (no signal: every advantage 0) and draw more prompts, B at a time, until each worker "
        "has B groups that differ, at most dynamic_sampling_max_draws more draws (then the batch is filled with "
        "agreeing groups, so every worker keeps B prompts). The extra prompts come from the stage's seeded prompt "
        "stream, at positions no step's own prompts reach, so a resumed stage draws the same ones; batch-level "
        "terms (ccc) are scored again on the batch kept. "
        "train/zero_spread_groups (the fraction of the step's own groups that agree) is logged either way.",
    )
    dynamic_sampling_max_draws: int = Field(
        4, ge=1, description="With dynamic_sampling: extra draws of B prompts per step at most (verl's "
        "max_num_gen_batches counts the first draw too); the draws taken are logged as "
        "train/dynamic_sampling/draws, the agreeing groups kept as train/dynamic_sampling/zero_spread_kept.",
    )
    num_iterations: int = Field(
        1, ge=1, description="Policy updates per rollout batch (GRPO's μ); at 1 the ratio is 1, so clipping is "
        "inert and no old-policy forward runs."
    )
    loss_aggregation: Literal[LOSS_AGGREGATIONS.names()] = Field(
        "token_mean",
        description="token_mean: every completion token of the global batch weighs the same (as DAPO, Yu et al. "
        "2025); seq_mean: each completion's token mean, averaged over completions (GRPO's 1/|o| "
        "normalisation, Shao et al. 2024, whose length bias Liu et al. 2025 (Dr.GRPO) point out); constant_norm: "
        "the token sum over completions × max_new_tokens (Dr. GRPO's constant normaliser; TRL loss_type='dr_grpo', "
        "verl seq-mean-token-sum-norm).",
    )
    entropy_coef: float = Field(
        0.0, ge=0, description="Entropy bonus: −entropy_coef·H of the policy on every completion token, aggregated "
        "as the loss (PPO's entropy bonus, Schulman et al. 2017; verl entropy_coeff; TRL entropy_coef). The mean "
        "token entropy is logged as train/entropy either way, from the logits the update's forward computes."
    )
    top_entropy_fraction: float = Field(
        1.0, gt=0, le=1, description="Keep the policy-gradient term on this fraction of completion tokens only, those "
        "of highest entropy in each update chunk of each worker (Wang et al. 2025, 'Beyond the 80/20 rule': 0.2; "
        "TRL top_entropy_quantile); the KL and entropy terms keep every token; 1 keeps all."
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut by max_new_tokens (no end-of-turn token) out of the loss: DAPO's "
        "overlong filtering (Yu et al. 2025; TRL mask_truncated_completions). The truncated fraction is logged as "
        "train/truncated_rate. DAPO's soft overlong punishment is the reward term `overlong`.",
    )

    def optimizer_steps(self) -> int:
        """Each rollout batch makes num_iterations updates, each one optimizer step over its grad_accum chunks."""
        return self.steps * self.num_iterations

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scaling_from_bool(cls, value: Any) -> Any:
        # METHODS §4 and some TRL releases write the switch as a bool; both spellings are accepted.
        return {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value


# Field order as for SFTStage: the stage's settings, each registered reward's and KL controller's parameters, the
# forward option.
class GRPOStage(*reversed(KL_CONTROLLERS.param_sections()), *reversed(REWARDS.param_sections()), GRPOSettings):
    """Group-relative policy optimisation (METHODS §4; GRPO: Shao et al. 2024, DeepSeekMath)."""

    shared_prompt_forward: bool = Field(
        True,
        description="Run each prompt once for its G samples in the log-prob forwards (same numbers, less "
        "compute); the image path and ZeRO-3 always run whole rows.",
    )

    def label(self) -> str:
        return "grpo:" + "+".join(t.name for t in self.rewards)

    @model_validator(mode="after")
    def _method_parameters(self) -> "GRPOStage":
        if self.kl_control == "adaptive" and self.kl_target is None:
            raise ValueError("kl_control=adaptive needs kl_target, the per-token KL (as train/kl) to steer β toward")
        low, high = self.advantage_clip_low, self.advantage_clip_high
        if low is not None and high is not None and low >= high:
            raise ValueError(f"advantage_clip_low ({low}) must be below advantage_clip_high ({high})")
        if any(t.name == "overlong" for t in self.rewards) and self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"overlong_buffer ({self.overlong_buffer}) is longer than max_new_tokens "
                             f"({self.max_new_tokens})")
        return self

    def answers_through_head(self) -> bool:
        return False


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

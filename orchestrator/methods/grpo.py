"""GRPO maths (METHODS §4), pure torch: advantages (baseline, scaling, how reward terms combine), KL estimators
and β's control, the clipped policy loss (importance ratio, dual clip, high-entropy tokens) and its aggregation.
Each choice is a registry, so a config names it and a grid can sweep it. Whole-batch statistics come through an
injected `reduce` (a sum over the workers), so the maths stays free of collectives."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from orchestrator.methods.registry import MethodParams, Registry

# --------------------------------------------------------------------------- advantages

Reduce = Callable[[list[float]], list[float]]  # sums numbers over the workers of a step (identity on one)


def _local(values: list[float]) -> list[float]:
    return values


@dataclass
class RewardGroups:
    """One reward series of this worker's step as [groups, G], and its whole-step statistics (over every
    worker's groups, through `reduce`) when a batch-level method asks for them."""

    groups: torch.Tensor
    reduce: Reduce = _local

    def batch_moments(self) -> tuple[float, float, float]:
        """(count, mean, unbiased std) of the series over the whole step's batch."""
        flat = self.groups.double().flatten()
        n, total, squares = self.reduce([float(flat.numel()), float(flat.sum()), float((flat**2).sum())])
        mean = total / max(n, 1.0)
        variance = (squares - n * mean**2) / (n - 1) if n > 1 else 0.0
        return n, mean, math.sqrt(max(variance, 0.0))


# What each sample's reward is compared with: fn(groups [groups, G]) -> baseline [groups, G].
ADVANTAGE_BASELINES: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("advantage baseline")


@ADVANTAGE_BASELINES.register("group_mean", source="GRPO (Shao et al. 2024)")
def group_mean_baseline(groups: torch.Tensor) -> torch.Tensor:
    """The mean of the prompt's G rewards."""
    return groups.mean(dim=1, keepdim=True)


@ADVANTAGE_BASELINES.register(
    "leave_one_out", source="RLOO (Kool et al. 2019; Ahmadian et al. 2024); verl rloo, NeMo-RL leave-one-out"
)
def leave_one_out_baseline(groups: torch.Tensor) -> torch.Tensor:
    """The mean of the prompt's other G − 1 rewards: r − baseline is G/(G − 1) times r − mean."""
    return (groups.sum(dim=1, keepdim=True) - groups) / (groups.shape[1] - 1)


# How the centred rewards are scaled: fn(centred [groups, G], rewards: RewardGroups) -> advantages.
ADVANTAGE_SCALINGS: Registry[Callable[[torch.Tensor, RewardGroups], torch.Tensor]] = Registry("advantage scaling")


@ADVANTAGE_SCALINGS.register("group", source="GRPO (Shao et al. 2024, DeepSeekMath)")
def scale_by_group_std(centred: torch.Tensor, rewards: RewardGroups) -> torch.Tensor:
    """Divide by the group's sample (unbiased) std + 1e-4, as TRL's GRPOTrainer."""
    groups = rewards.groups
    group_size = groups.shape[1]
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    return centred / (std + 1e-4)


@ADVANTAGE_SCALINGS.register(
    "batch", source="REINFORCE++ (Hu 2025); Lite PPO (Liu et al. 2025); TRL scale_rewards='batch'"
)
def scale_by_batch_std(centred: torch.Tensor, rewards: RewardGroups) -> torch.Tensor:
    """Divide by one std + 1e-4: the sample std of the rewards over the whole step's batch, every worker's."""
    return centred / (rewards.batch_moments()[2] + 1e-4)


@ADVANTAGE_SCALINGS.register("none", source="Dr. GRPO (Liu et al. 2025)")
def unscaled(centred: torch.Tensor, rewards: RewardGroups) -> torch.Tensor:
    """Keep r − baseline: the std division favours groups whose rewards barely differ."""
    return centred


def _groups(rewards, group_size: int) -> torch.Tensor:
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    return r.view(-1, group_size)


def group_advantages(rewards, group_size: int, scale: bool | str = True, baseline: str = "group_mean",
                     reduce: Reduce = _local) -> torch.Tensor:
    """A = r − baseline (a registered baseline: the group's mean, or the mean of its other samples), scaled by a
    registered scaling: `scale=True` (or "group") divides by the group's std + 1e-4, "batch" by the whole
    step's std + 1e-4 (summed over the workers by `reduce`), `scale=False` (or "none") keeps r − baseline."""
    scaling = ("group" if scale else "none") if isinstance(scale, bool) else scale
    groups = _groups(rewards, group_size)
    if baseline == "leave_one_out" and group_size < 2:
        raise ValueError("a leave-one-out baseline needs groups of at least 2 samples")
    centred = groups - ADVANTAGE_BASELINES[baseline](groups)
    return ADVANTAGE_SCALINGS[scaling](centred, RewardGroups(groups, reduce)).flatten()


def clip_advantages(advantages: torch.Tensor, low: float | None, high: float | None) -> torch.Tensor:
    """Advantages clamped to [low, high]; a bound of None leaves that side open."""
    if low is None and high is None:
        return advantages
    return advantages.clamp(min=low, max=high)


@dataclass(frozen=True)
class Combination:
    """How a stage's reward terms become advantages: `advantages(total, terms, weights, normalise, reduce)`, where
    `normalise(values)` is the stage's baseline and scaling over [N] values of this worker; and which groups
    carry no signal, `zero_spread(total [groups, G], terms {name: [groups, G]}, weights)` -> bool [groups]."""

    advantages: Callable[..., torch.Tensor]
    zero_spread: Callable[..., torch.Tensor]


def _constant(groups: torch.Tensor) -> torch.Tensor:
    return (groups.max(dim=1).values - groups.min(dim=1).values) == 0


def _normalise_sum(total, terms, weights, normalise, reduce):
    return normalise(total)


def _sum_of_normalised(total, terms, weights, normalise, reduce):
    summed = sum(weights[name] * normalise(values) for name, values in terms.items())
    _, mean, std = RewardGroups(summed.view(1, -1), reduce).batch_moments()
    return (summed - mean) / (std + 1e-4)


def _total_constant(total, terms, weights):
    return _constant(total)


def _every_term_constant(total, terms, weights):
    flags = [_constant(values) for name, values in terms.items() if weights[name] != 0]
    return torch.stack(flags).all(dim=0) if flags else torch.ones(total.shape[0], dtype=torch.bool)


REWARD_COMBINATIONS: Registry[Combination] = Registry("reward combination")
# The weighted sum of the terms, then the baseline and scaling, once.
REWARD_COMBINATIONS.register("sum_then_normalise", source="GRPO (Shao et al. 2024); TRL's default")(
    Combination(advantages=_normalise_sum, zero_spread=_total_constant)
)
# Each term through the baseline and scaling within its groups, then their weighted sum, standardised over the
# whole step's batch (mean 0, std 1 + 1e-4): a term's weight is its share of the advantage, whatever its range.
REWARD_COMBINATIONS.register(
    "normalise_then_sum", source="GDPO (Liu et al. 2026); TRL multi_objective_aggregation='normalize_then_sum'"
)(Combination(advantages=_sum_of_normalised, zero_spread=_every_term_constant))


def step_advantages(total, terms: dict[str, Any], weights: dict[str, float], group_size: int, *,
                    combination: str = "sum_then_normalise", scale: bool | str = "group", baseline: str = "group_mean",
                    clip: tuple[float | None, float | None] = (None, None), reduce: Reduce = _local) -> torch.Tensor:
    """This worker's [N] advantages from its weighted total reward and its terms (each [N], prompt i's samples at
    i·G .. i·G + G − 1): the registered combination, then clipping to [low, high]."""
    how = REWARD_COMBINATIONS[combination]

    def normalise(values) -> torch.Tensor:
        return group_advantages(values, group_size, scale, baseline, reduce)

    flat_terms = {name: torch.as_tensor(v, dtype=torch.float32).flatten() for name, v in terms.items()}
    return clip_advantages(how.advantages(total, flat_terms, weights, normalise, reduce), *clip)


def zero_spread_groups(total, terms: dict[str, Any], weights: dict[str, float], group_size: int,
                       combination: str = "sum_then_normalise") -> torch.Tensor:
    """Bool [groups]: the groups whose rewards do not differ, so their advantages are all 0 (no signal), as the
    registered combination sees them: a constant total, or (normalise_then_sum) every weighted term constant."""
    groups = {name: _groups(v, group_size) for name, v in terms.items()}
    return REWARD_COMBINATIONS[combination].zero_spread(_groups(total, group_size), groups, weights)


# --------------------------------------------------------------------------- KL to the reference

# Per-token estimates of KL(π ‖ π_ref) from samples of π, as functions of r = log π_ref − log π
# (Schulman 2020, "Approximating KL divergence"). As a loss term on on-policy samples, k1's expected
# gradient is zero, k2's is the gradient of KL(π ‖ π_ref) and k3's that of KL(π_ref ‖ π).
KL_ESTIMATORS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1", source="Schulman 2020")
def kl_k1(r: torch.Tensor) -> torch.Tensor:
    return -r


@KL_ESTIMATORS.register("k2", source="Schulman 2020")
def kl_k2(r: torch.Tensor) -> torch.Tensor:
    return 0.5 * r**2


@KL_ESTIMATORS.register("k3", source="Schulman 2020; GRPO (Shao et al. 2024)")
def kl_k3(r: torch.Tensor) -> torch.Tensor:
    """exp(r) − r − 1: unbiased and non-negative."""
    return torch.exp(r) - r - 1


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) with the registered estimator `kind`."""
    return KL_ESTIMATORS[kind](ref_logp - logp)


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """[N] the estimated KL of each completion: its tokens' estimates summed, the KL penalty of PPO-style RLHF
    (Ziegler et al. 2019; Stiennon et al. 2020), there with k1."""
    return (kl_estimate(logp, ref_logp, kind) * mask).sum(-1)


class AdaptiveKLParams(MethodParams):
    kl_target: float | None = Field(
        None, gt=0, description="`kl_control=adaptive`: the KL that β steers toward, per completion token as "
        "train/kl logs it (Ziegler et al. 2019's KL_target, there per sequence); required by `adaptive`.",
    )
    kl_horizon: float = Field(
        10000, gt=0, description="`kl_control=adaptive`: the horizon H, in samples: after each step β is multiplied "
        "by 1 + e·n/H, e = clip(KL/kl_target − 1, −0.2, 0.2), n the step's samples (Ziegler et al. 2019: 10000).",
    )


# How β moves between steps: fn(β, the step's KL per token, the step's samples, params) -> the next step's β.
KL_CONTROLLERS: Registry[Callable[..., float]] = Registry("KL controller")


@KL_CONTROLLERS.register("fixed", source="GRPO (Shao et al. 2024)")
def fixed_kl_coef(beta: float, kl: float, samples: float, params: Any = None) -> float:
    """β stays as set."""
    return beta


@KL_CONTROLLERS.register("adaptive", params=AdaptiveKLParams,
                         source="Ziegler et al. 2019; verl AdaptiveKLController")
def adaptive_kl_coef(beta: float, kl: float, samples: float, params: AdaptiveKLParams) -> float:
    """Proportional control toward kl_target: β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) after each step."""
    error = min(max(kl / params.kl_target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * samples / params.kl_horizon)


# --------------------------------------------------------------------------- the clipped objective


# The importance ratio π / π_old of each completion token: fn(logp, old_logp, mask) -> log-ratio [N, T].
IMPORTANCE_RATIOS: Registry[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = Registry(
    "importance ratio"
)


@IMPORTANCE_RATIOS.register("token", source="PPO (Schulman et al. 2017); GRPO (Shao et al. 2024)")
def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each token's own log π/π_old."""
    return logp - old_logp


@IMPORTANCE_RATIOS.register("sequence", source="GSPO (Zheng et al. 2025); TRL importance_sampling_level='sequence'")
def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The completion's length-normalised log π/π_old, (1/|y|)·Σ_t, on each of its tokens: one ratio per sequence."""
    summed = ((logp - old_logp) * mask).sum(-1, keepdim=True)
    return (summed / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(logp)


def clipped_policy_loss(logp, old_logp, advantages, eps_low: float = 0.2, eps_high: float = 0.2, *,
                        mask=None, importance_ratio: str = "token", clip_ratio_c: float | None = None):
    """Per-token −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) and the mask of tokens where clipping bit, ρ from the
    registered `importance_ratio`. With `clip_ratio_c` = c > 1 (dual-clip PPO, Ye et al. 2020) a token with A < 0
    loses at most −c·A however large ρ grows."""
    mask = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
    ratio = torch.exp(IMPORTANCE_RATIOS[importance_ratio](logp, old_logp, mask))
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if clip_ratio_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -clip_ratio_c * adv), loss)
    return loss, clipped < unclipped


def high_entropy_tokens(entropy: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 on the completion tokens whose entropy is in the top `fraction` of this chunk's completion tokens (at or
    above the (1 − fraction) quantile), 0 elsewhere (Wang et al. 2025, 'Beyond the 80/20 rule')."""
    values = entropy[mask > 0]
    if values.numel() == 0:
        return mask
    threshold = torch.quantile(values.float(), 1.0 - fraction)
    return (entropy >= threshold).to(mask.dtype) * mask


@dataclass(frozen=True)
class Aggregation:
    """How per-token losses become one sum, divided once by a GLOBAL normaliser (summed over the workers
    and chunks of a step): `loss_sum(per_token [N, T], mask [N, T])` and each chunk's
    `normaliser(mask, max_completion_length)`."""

    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    normaliser: Callable[[torch.Tensor, int], torch.Tensor]


def _token_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum()


def _sum_of_sequence_means(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def _token_count(mask: torch.Tensor, max_completion_length: int) -> torch.Tensor:
    return torch.sum(mask)


def _sequence_count(mask: torch.Tensor, max_completion_length: int) -> torch.Tensor:
    return torch.tensor(float(mask.shape[0]))


def _sequences_times_budget(mask: torch.Tensor, max_completion_length: int) -> torch.Tensor:
    return torch.tensor(float(mask.shape[0] * max_completion_length))


LOSS_AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")
# Every completion token of the global batch weighs the same.
LOSS_AGGREGATIONS.register("token_mean", source="DAPO (Yu et al. 2025); TRL's default")(
    Aggregation(loss_sum=_token_sum, normaliser=_token_count)
)
# Each completion contributes its own token mean; the normaliser counts completions.
LOSS_AGGREGATIONS.register("seq_mean", source="GRPO (Shao et al. 2024)")(
    Aggregation(loss_sum=_sum_of_sequence_means, normaliser=_sequence_count)
)
# The token sum over a constant, completions × max_new_tokens: no length bias and no dependence on the batch's
# lengths.
LOSS_AGGREGATIONS.register(
    "constant_norm", source="Dr. GRPO (Liu et al. 2025); TRL loss_type='dr_grpo', verl seq-mean-token-sum-norm"
)(Aggregation(loss_sum=_token_sum, normaliser=_sequences_times_budget))


def grpo_loss_terms(
    logp, old_logp, ref_logp, advantages, mask, *, beta: float, kl_estimator: str = "k3",
    eps_low: float = 0.2, eps_high: float = 0.2, aggregation: str = "token_mean", max_completion_length: int = 1,
    importance_ratio: str = "token", clip_ratio_c: float | None = None, entropy=None, entropy_coef: float = 0.0,
    top_entropy_fraction: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Loss as a SUM to divide by the global normaliser of the registered `aggregation`, with its KL mean (to
    `ref_logp` when given, in the loss at `beta` > 0) and clip fraction over the chunk's completion tokens.
    `entropy` [N, T], the policy's per-token entropy (differentiable when `entropy_coef` > 0), adds the bonus
    −entropy_coef·H on every completion token and, with `top_entropy_fraction` < 1, keeps the policy-gradient
    term on the highest-entropy tokens only."""
    if entropy is None and (entropy_coef > 0 or top_entropy_fraction < 1.0):
        raise ValueError("an entropy bonus or a top-entropy fraction needs the policy's per-token entropy")
    per_token, clipped = clipped_policy_loss(logp, old_logp, advantages, eps_low, eps_high, mask=mask,
                                             importance_ratio=importance_ratio, clip_ratio_c=clip_ratio_c)
    if top_entropy_fraction < 1.0:
        per_token = per_token * high_entropy_tokens(entropy.detach(), mask.to(per_token.dtype), top_entropy_fraction)
    kl = torch.zeros_like(per_token)
    if ref_logp is not None:  # measured whenever there is a reference; in the loss at β > 0
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        if beta > 0:
            per_token = per_token + beta * kl
    if entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    mask = mask.to(per_token.dtype)
    how = LOSS_AGGREGATIONS[aggregation]
    denom = mask.sum().clamp(min=1)
    out = {
        "loss_sum": how.loss_sum(per_token, mask),
        "normaliser": how.normaliser(mask, max_completion_length),
        "kl_mean": ((kl * mask).sum() / denom).detach(),
        "clip_fraction": ((clipped.to(mask.dtype) * mask).sum() / denom).detach(),
    }
    if entropy is not None:
        out["entropy_mean"] = ((entropy.detach() * mask).sum() / denom)
    return out

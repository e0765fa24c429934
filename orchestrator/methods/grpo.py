"""GRPO maths (METHODS §4), pure torch: advantages, KL estimators, the clipped policy loss and its
aggregation. Each choice is a registry, so a config names it and a grid can sweep it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from orchestrator.methods.registry import Registry

# --------------------------------------------------------------------------- advantages

# How group-centred rewards are scaled: fn(centred [groups, G], rewards [groups, G]) -> advantages.
ADVANTAGE_SCALINGS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("advantage scaling")


@ADVANTAGE_SCALINGS.register("group", source="GRPO (Shao et al. 2024, DeepSeekMath)")
def scale_by_group_std(centred: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Divide by the group's sample (unbiased) std + 1e-4, as TRL's GRPOTrainer."""
    group_size = groups.shape[1]
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    return centred / (std + 1e-4)


@ADVANTAGE_SCALINGS.register("none", source="Dr. GRPO (Liu et al. 2025)")
def unscaled(centred: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Keep r − mean: the std division favours groups whose rewards barely differ."""
    return centred


def group_advantages(rewards, group_size: int, scale: bool | str = True) -> torch.Tensor:
    """A = (r − mean_group(r)), scaled by a registered scaling: `scale=True` (or "group") divides by the
    group's std + 1e-4, `scale=False` (or "none") keeps the centred rewards (Dr. GRPO)."""
    scaling = ("group" if scale else "none") if isinstance(scale, bool) else scale
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    groups = r.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return ADVANTAGE_SCALINGS[scaling](centred, groups).flatten()


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


# --------------------------------------------------------------------------- the clipped objective


def clipped_policy_loss(logp, old_logp, advantages, eps_low: float = 0.2, eps_high: float = 0.2):
    """Per-token −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) and the mask of tokens where clipping bit."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


@dataclass(frozen=True)
class Aggregation:
    """How per-token losses become one sum, divided once by a GLOBAL normaliser (summed over the workers
    and chunks of a step): `loss_sum(per_token [N, T], mask [N, T])` and each chunk's `normaliser(mask)`."""

    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    normaliser: Callable[[torch.Tensor], torch.Tensor]


def _token_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum()


def _sum_of_sequence_means(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def _sequence_count(mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(mask.shape[0]))


LOSS_AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")
# Every completion token of the global batch weighs the same.
LOSS_AGGREGATIONS.register("token_mean", source="DAPO (Yu et al. 2025); TRL's default")(
    Aggregation(loss_sum=_token_sum, normaliser=torch.sum)
)
# Each completion contributes its own token mean; the normaliser counts completions.
LOSS_AGGREGATIONS.register("seq_mean", source="GRPO (Shao et al. 2024)")(
    Aggregation(loss_sum=_sum_of_sequence_means, normaliser=_sequence_count)
)


def grpo_loss_terms(
    logp, old_logp, ref_logp, advantages, mask, *, beta: float, kl_estimator: str = "k3",
    eps_low: float = 0.2, eps_high: float = 0.2, aggregation: str = "token_mean",
) -> dict[str, torch.Tensor]:
    """Loss as a SUM to divide by the global normaliser of the registered `aggregation`, with its KL mean
    and clip fraction over the chunk's completion tokens."""
    per_token, clipped = clipped_policy_loss(logp, old_logp, advantages, eps_low, eps_high)
    kl = torch.zeros_like(per_token)
    if beta > 0 and ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    how = LOSS_AGGREGATIONS[aggregation]
    denom = mask.sum().clamp(min=1)
    return {
        "loss_sum": how.loss_sum(per_token, mask),
        "normaliser": how.normaliser(mask),
        "kl_mean": ((kl * mask).sum() / denom).detach(),
        "clip_fraction": ((clipped.to(mask.dtype) * mask).sum() / denom).detach(),
    }

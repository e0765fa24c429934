"""GRPO maths (METHODS §4), pure torch: advantages, KL estimators, the clipped policy loss."""

from __future__ import annotations

import torch


def group_advantages(rewards, group_size: int, scale: bool = True) -> torch.Tensor:
    """A = (r − mean_group(r)) / (std_group(r) + 1e-4); without `scale`, r − mean (Dr. GRPO).
    The std is the sample (unbiased) std, as in TRL's GRPOTrainer."""
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    groups = r.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + 1e-4)
    return centred.flatten()


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π, with r = log π_ref − log π:
    k1 = −r, k2 = r²/2, k3 = exp(r) − r − 1 (unbiased and non-negative)."""
    r = ref_logp - logp
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * r**2
    if kind == "k3":
        return torch.exp(r) - r - 1
    raise ValueError(f"unknown KL estimator {kind!r}; allowed: k1, k2, k3")


def clipped_policy_loss(logp, old_logp, advantages, eps_low: float = 0.2, eps_high: float = 0.2):
    """Per-token −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) and the mask of tokens where clipping bit."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def grpo_loss_terms(
    logp, old_logp, ref_logp, advantages, mask, *, beta: float, kl_estimator: str = "k3",
    eps_low: float = 0.2, eps_high: float = 0.2, aggregation: str = "token_mean",
) -> dict[str, torch.Tensor]:
    """Loss as a SUM to divide by the global normaliser (token count for token_mean, sequence count for
    seq_mean where each sequence contributes its own token mean)."""
    per_token, clipped = clipped_policy_loss(logp, old_logp, advantages, eps_low, eps_high)
    kl = torch.zeros_like(per_token)
    if beta > 0 and ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    tokens = mask.sum()
    if aggregation == "token_mean":
        loss_sum, normaliser = (per_token * mask).sum(), tokens
    elif aggregation == "seq_mean":
        lengths = mask.sum(-1).clamp(min=1)
        loss_sum, normaliser = ((per_token * mask).sum(-1) / lengths).sum(), torch.tensor(float(mask.shape[0]))
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; allowed: token_mean, seq_mean")
    denom = tokens.clamp(min=1)
    return {
        "loss_sum": loss_sum,
        "normaliser": normaliser,
        "kl_mean": ((kl * mask).sum() / denom).detach(),
        "clip_fraction": ((clipped.to(mask.dtype) * mask).sum() / denom).detach(),
    }

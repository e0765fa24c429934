"""SFT losses on digit tokens (METHODS §3), pure torch.

Every loss has the signature ``fn(logits [N, V], labels [N], digit_token_ids [10], **params)`` and
returns ``(loss_sum, normaliser)`` so the caller can normalise over the GLOBAL batch (all
micro-batches of all workers). Positions labelled -100 (the prompt, padding) are ignored.

Shapes of ψ for the soft labels (seed 000 names the families but not their parameters); each is a
proper distribution over the digits 0..9 centred on the target t:
- triangular: ψ(v) ∝ max(0, 2 − |v − t|)  (t gets 2/4, each neighbour 1/4; renormalised at 0 and 9)
- binomial:   Binomial(n = 9, p = t / 9), whose mean is t
- poisson:    Poisson(λ = t + 0.5) truncated to 0..9 and renormalised; its mode is t
- uniform:    1/10 on every digit (label smoothing)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIGIT_CHARS = "0123456789"
PSI_FAMILIES = ("triangular", "binomial", "poisson", "uniform")
IGNORE_INDEX = -100


def _check_digit(digit: int) -> int:
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return int(digit)


def psi_distribution(digit: int, psi: str) -> torch.Tensor:
    t = _check_digit(digit)
    v = torch.arange(10, dtype=torch.float64)
    if psi == "triangular":
        w = torch.clamp(2.0 - (v - t).abs(), min=0.0)
    elif psi == "binomial":
        p = t / 9.0
        w = torch.tensor([math.comb(9, k) * p**k * (1 - p) ** (9 - k) for k in range(10)], dtype=torch.float64)
    elif psi == "poisson":
        lam = t + 0.5
        w = torch.tensor([lam**k * math.exp(-lam) / math.factorial(k) for k in range(10)], dtype=torch.float64)
    elif psi == "uniform":
        w = torch.ones(10, dtype=torch.float64)
    else:
        raise ValueError(f"unknown psi {psi!r}; allowed: {', '.join(PSI_FAMILIES)}")
    return (w / w.sum()).float()


def softlabel_target(digit: int, psi: str = "triangular", eta: float = 0.08) -> torch.Tensor:
    """q = (1 − η)·onehot(t) + η·ψ(t) over the 10 digits."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    onehot = F.one_hot(torch.tensor(_check_digit(digit)), 10).float()
    return (1 - eta) * onehot + eta * psi_distribution(digit, psi)


def dist2_target(digit: int, tau: float = 1.0) -> torch.Tensor:
    """p(v) = softmax_v(−(v − t)² / τ) over the 10 digits."""
    t = _check_digit(digit)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    v = torch.arange(10, dtype=torch.float32)
    return torch.softmax(-((v - t) ** 2) / tau, dim=0)


def digit_positions(labels: torch.Tensor, digit_token_ids: torch.Tensor) -> torch.Tensor:
    """Digit value (0..9) at each position whose label is a digit token, −1 elsewhere."""
    lookup = (labels.unsqueeze(-1) == digit_token_ids.to(labels.device)).long()  # [N, 10]
    values = lookup.argmax(-1)
    return torch.where(lookup.any(-1), values, torch.full_like(values, -1))


def digit_places(labels: torch.Tensor, digit_token_ids: torch.Tensor) -> torch.Tensor:
    """Place value inside each run of consecutive digit labels (0 = units), −1 for non-digits."""
    is_digit = (digit_positions(labels, digit_token_ids) >= 0).tolist()
    places = [-1] * len(is_digit)
    run_left = 0
    for i in range(len(is_digit) - 1, -1, -1):  # walk backwards: the place counts from the run's end
        run_left = run_left + 1 if is_digit[i] else 0
        if is_digit[i]:
            places[i] = run_left - 1
    return torch.tensor(places, dtype=torch.long, device=labels.device)


def _split(logits: torch.Tensor, labels: torch.Tensor, digit_token_ids: torch.Tensor):
    valid = labels != IGNORE_INDEX
    digits = digit_positions(labels, digit_token_ids)
    is_digit = digits >= 0
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return valid, digits, is_digit, logp, ce


def ce_loss(logits, labels, digit_token_ids, digit_weight: float = 1.0):
    """Σ_regular CE + digit_weight·Σ_digit CE, over N_regular + N_digit tokens."""
    valid, _, is_digit, _, ce = _split(logits, labels, digit_token_ids)
    weights = torch.where(is_digit, torch.full_like(ce, digit_weight), torch.ones_like(ce)) * valid
    return (ce * weights).sum(), valid.sum().to(ce.dtype)


def softlabel_loss(logits, labels, digit_token_ids, psi: str = "triangular", eta: float = 0.08, lam: float = 2.0):
    """[Σ_regular CE + λ·Σ_digit softCE] / (N_regular + N_digit); soft targets only on the digit tokens."""
    valid, digits, is_digit, logp, ce = _split(logits, labels, digit_token_ids)
    table = torch.stack([softlabel_target(d, psi, eta) for d in range(10)]).to(logp.device)  # [10 target, 10 v]
    q = table[digits.clamp(min=0)]  # [N, 10]
    soft_ce = -(q * logp[:, digit_token_ids.to(logp.device)]).sum(-1)
    regular = valid & ~is_digit
    loss = (ce * regular).sum() + lam * (soft_ce * is_digit).sum()
    return loss, valid.sum().to(ce.dtype)


def dist2_loss(logits, labels, digit_token_ids, tau: float = 1.0, alpha: float = 0.1, place_value_weights: bool = False):
    """Σ_all CE + α·Σ_digit w·KL(p_d ‖ p_θ); p_θ is the full-vocabulary softmax."""
    valid, digits, is_digit, logp, ce = _split(logits, labels, digit_token_ids)
    table = torch.stack([dist2_target(d, tau) for d in range(10)]).to(logp.device)
    p = table[digits.clamp(min=0)]
    model_logp = logp[:, digit_token_ids.to(logp.device)]
    kl = torch.where(p > 0, p * (torch.log(p.clamp(min=1e-30)) - model_logp), torch.zeros_like(p)).sum(-1)
    weights = torch.ones_like(kl)
    if place_value_weights:  # units 1, tens 2, hundreds 3, thousands and above 4
        weights = (digit_places(labels, digit_token_ids).clamp(min=0, max=3) + 1).to(kl.dtype)
    loss = (ce * valid).sum() + alpha * (kl * weights * is_digit).sum()
    return loss, valid.sum().to(ce.dtype)


SFT_LOSSES = {"ce": ce_loss, "softlabel": softlabel_loss, "dist2": dist2_loss}


def sft_loss(name: str, logits, labels, digit_token_ids, **params):
    if name not in SFT_LOSSES:
        raise ValueError(f"unknown SFT loss {name!r}; allowed: {', '.join(SFT_LOSSES)}")
    return SFT_LOSSES[name](logits, labels, digit_token_ids, **params)

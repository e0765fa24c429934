"""SFT losses on digit tokens (METHODS §3), pure torch.

Every loss has the signature ``fn(logits [N, V], labels [N], digit_token_ids [10], **params)`` and
returns ``(loss_sum, normaliser)``: the caller sums both over micro-batches and workers and divides
once, so the mean is over the GLOBAL batch. ``logits`` are already aligned with ``labels`` (shifted
by the caller). Positions labelled -100 (prompt, padding) are ignored entirely. The vocabulary id of
digit d is ``digit_token_ids[d]``; numbers must tokenize one digit per token.

Shapes of ψ for the soft labels (seed 000 names the families, not their parameters). Each is a
proper distribution over the digits 0..9 centred on the target t:

- triangular: ψ(v) ∝ max(0, 2 − |v − t|): half-width 2, so t gets 2/4 and each neighbour 1/4;
  renormalised when truncated at 0 or 9 (t = 0: 2/3 on 0, 1/3 on 1).
- binomial:   Binomial(n = 9, p = t / 9), whose mean is t (a point mass at t = 0 and t = 9).
- poisson:    Poisson(λ = t + 0.5) truncated to 0..9 and renormalised; its mode is t.
- uniform:    1/10 on every digit (plain label smoothing restricted to the digits)."""

from __future__ import annotations

import math
import operator

import torch

DIGIT_CHARS = "0123456789"
PSI_FAMILIES = ("triangular", "binomial", "poisson", "uniform")
IGNORE_INDEX = -100
PLACE_WEIGHT_CAP = 4  # DIST² place weights: units 1, tens 2, hundreds 3, thousands and above 4


def _check_digit(digit) -> int:
    try:
        t = operator.index(digit)  # refuses 3.5 instead of silently truncating it
    except TypeError:
        raise ValueError(f"digit must be an integer in 0..9, got {digit!r}") from None
    if not 0 <= t <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return t


def psi_distribution(digit: int, psi: str = "triangular") -> torch.Tensor:
    """ψ(t) over the digits 0..9 (float32, sums to 1); shapes in the module docstring."""
    if psi not in PSI_FAMILIES:
        raise ValueError(f"unknown psi {psi!r}; allowed: {', '.join(PSI_FAMILIES)}")
    t = _check_digit(digit)
    v = range(10)
    if psi == "triangular":
        w = [max(0.0, 2.0 - abs(k - t)) for k in v]
    elif psi == "binomial":
        p = t / 9.0
        w = [math.comb(9, k) * p**k * (1 - p) ** (9 - k) for k in v]
    elif psi == "poisson":
        lam = t + 0.5
        w = [lam**k / math.factorial(k) for k in v]  # exp(−λ) cancels in the renormalisation
    else:
        w = [1.0] * 10
    w = torch.tensor(w, dtype=torch.float64)
    return (w / w.sum()).float()


def softlabel_target(digit: int, psi: str = "triangular", eta: float = 0.08) -> torch.Tensor:
    """q = (1 − η)·onehot(t) + η·ψ(t) over the 10 digits (float32, sums to 1)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    q = eta * psi_distribution(digit, psi)
    q[_check_digit(digit)] += 1.0 - eta
    return q


def dist2_target(digit: int, tau: float = 1.0) -> torch.Tensor:
    """p(v) = softmax_v(−(v − t)² / τ) over the 10 digits (float32)."""
    t = _check_digit(digit)
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    v = torch.arange(10, dtype=torch.float64)
    return torch.softmax(-((v - t) ** 2) / tau, dim=0).float()


def _check_digit_ids(digit_token_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(digit_token_ids)
    if ids.shape != (10,):
        raise ValueError(f"digit_token_ids must hold the 10 ids of '0'..'9', got shape {tuple(ids.shape)}")
    return ids


def digit_values(labels: torch.Tensor, digit_token_ids: torch.Tensor) -> torch.Tensor:
    """The digit (0..9) each label spells, −1 for non-digit and ignored positions. Any shape."""
    ids = _check_digit_ids(digit_token_ids).to(labels.device)
    hits = labels.unsqueeze(-1) == ids  # [..., 10]
    return torch.where(hits.any(-1), hits.long().argmax(-1), torch.full_like(labels, -1))


def digit_places(labels: torch.Tensor, digit_token_ids: torch.Tensor) -> torch.Tensor:
    """Place value of each digit inside its run of consecutive digit labels (0 = units = the run's
    last digit, 1 = tens, ...), −1 for non-digit and ignored positions. Runs are broken by any
    non-digit label (including -100). Works along the last dimension, so a [B, T] input never joins
    runs across sequences; a flattened [B·T] input relies on each sequence ending in a non-digit
    (EOS or padding), which the SFT collation guarantees."""
    is_digit = digit_values(labels, digit_token_ids) >= 0
    n = labels.shape[-1]
    pos = torch.arange(n, device=labels.device).expand_as(labels)
    # The first non-digit at or after each position ends the run: a reversed running minimum.
    breaks = torch.where(is_digit, torch.full_like(pos, n), pos)
    next_break = breaks.flip(-1).cummin(-1).values.flip(-1)
    return torch.where(is_digit, next_break - pos - 1, torch.full_like(pos, -1))


def _prepare(logits: torch.Tensor, labels: torch.Tensor, digit_token_ids: torch.Tensor):
    """Shared pieces: valid mask, digit value per position, full-vocab log-softmax, one-hot CE."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    valid = labels != IGNORE_INDEX
    digits = digit_values(labels, digit_token_ids)
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # garbage where ignored, masked below
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    return valid, digits, logp, ce


def _digit_logp(logp: torch.Tensor, digit_token_ids: torch.Tensor) -> torch.Tensor:
    """log p_θ of each of the 10 digit tokens under the FULL-vocabulary softmax, [N, 10]."""
    return logp[:, _check_digit_ids(digit_token_ids).to(logp.device)]


def ce_loss(logits, labels, digit_token_ids, digit_weight: float = 1.0):
    """Σ_regular CE + digit_weight·Σ_digit CE; normaliser N_regular + N_digit. digit_weight = 2 is the
    control that separates up-weighting digits from soft targets."""
    valid, digits, _, ce = _prepare(logits, labels, digit_token_ids)
    weights = torch.where(digits >= 0, torch.full_like(ce, float(digit_weight)), torch.ones_like(ce))
    return (ce * weights).sum(), valid.sum().to(ce.dtype)


def softlabel_loss(logits, labels, digit_token_ids, psi: str = "triangular", eta: float = 0.08, lam: float = 2.0):
    """Σ_regular CE + λ·Σ_digit softCE, softCE = −Σ_v q(v) log softmax(logits)[v] with q zero off the
    digit tokens; normaliser N_regular + N_digit."""
    valid, digits, logp, ce = _prepare(logits, labels, digit_token_ids)
    is_digit = digits >= 0
    table = torch.stack([softlabel_target(d, psi, eta) for d in range(10)]).to(logp.device)  # [t, v]
    q = table[digits.clamp(min=0)]  # one gather for every position: [N, 10]
    soft_ce = -(q * _digit_logp(logp, digit_token_ids)).sum(-1)
    loss = torch.where(is_digit, lam * soft_ce, ce).sum()
    return loss, valid.sum().to(ce.dtype)


def dist2_loss(logits, labels, digit_token_ids, tau: float = 1.0, alpha: float = 0.1,
               place_value_weights: bool = False):
    """Σ_all CE + α·Σ_digit w·KL(p_d ‖ p_θ); p_d = dist2_target, p_θ the full-vocabulary softmax
    restricted to the digit tokens (the KL sums over v where p_d(v) > 0); normaliser N tokens."""
    valid, digits, logp, ce = _prepare(logits, labels, digit_token_ids)
    is_digit = digits >= 0
    table = torch.stack([dist2_target(d, tau) for d in range(10)]).to(logp.device)
    p = table[digits.clamp(min=0)]
    # A tiny τ underflows far digits to p = 0, whose KL term is 0 by convention (0·log 0 = 0).
    terms = p * (torch.log(p.clamp(min=torch.finfo(p.dtype).tiny)) - _digit_logp(logp, digit_token_ids))
    kl = torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)
    weights = torch.ones_like(kl)
    if place_value_weights:
        places = digit_places(labels, digit_token_ids)
        weights = (places.clamp(min=0, max=PLACE_WEIGHT_CAP - 1) + 1).to(kl.dtype)
    kl_total = torch.where(is_digit, weights * kl, torch.zeros_like(kl)).sum()
    return ce.sum() + alpha * kl_total, valid.sum().to(ce.dtype)

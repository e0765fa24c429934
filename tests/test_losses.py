"""SFT losses and target distributions against hand-computed values."""

import math

import pytest
import torch

from orchestrator.methods.losses import (
    DIGIT_CHARS,
    ce_loss,
    digit_places,
    digit_values,
    dist2_loss,
    dist2_target,
    psi_distribution,
    softlabel_loss,
    softlabel_target,
)

# A toy vocabulary of 12 tokens: ids 2..11 are the digits 0..9, ids 0 and 1 are regular tokens.
DIGITS = torch.arange(2, 12)
L3, L14 = math.log(3), math.log(14)


def test_digit_chars_and_registry():
    from orchestrator.methods.objectives import SFT_OBJECTIVES

    assert DIGIT_CHARS == "0123456789"
    assert SFT_OBJECTIVES.names() == ("ce", "softlabel", "dist2", "rvtc")
    assert [SFT_OBJECTIVES[n].answers_through_head for n in SFT_OBJECTIVES.names()] == [False, False, False, True]


# --------------------------------------------------------------------------- targets


def test_triangular_by_hand():
    # t=5: weights max(0, 2-|v-5|) = 1, 2, 1 at v = 4, 5, 6 -> /4; eta=0.08
    q = softlabel_target(5, "triangular", 0.08)
    assert q[5].item() == pytest.approx(0.92 + 0.08 * 2 / 4)  # 0.96
    assert q[4].item() == pytest.approx(0.08 / 4) and q[6].item() == pytest.approx(0.08 / 4)
    assert q[0].item() == 0.0 and q[3].item() == 0.0 and q[7].item() == 0.0
    # t=0 is truncated: weights 2 at 0, 1 at 1 -> 2/3, 1/3; t=9 mirrors it
    assert psi_distribution(0, "triangular")[:3].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert psi_distribution(9, "triangular")[7:].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert softlabel_target(0, "triangular", 0.08)[0].item() == pytest.approx(0.92 + 0.08 * 2 / 3)


def test_binomial_by_hand():
    # t=0: p=0 -> all mass on 0; t=9: p=1 -> all mass on 9
    assert psi_distribution(0, "binomial")[0].item() == pytest.approx(1.0)
    assert psi_distribution(9, "binomial")[9].item() == pytest.approx(1.0)
    # t=3: p=1/3, P(3) = C(9,3) (1/3)^3 (2/3)^6 = 84 * 64 / 3^9 = 5376 / 19683
    b3 = psi_distribution(3, "binomial")
    assert b3[3].item() == pytest.approx(5376 / 19683, rel=1e-6)
    for t in range(10):  # the mean is n p = 9 * t/9 = t
        assert (psi_distribution(t, "binomial") * torch.arange(10)).sum().item() == pytest.approx(t, abs=1e-5)


def test_poisson_by_hand():
    # t=2: lambda 2.5, weights 2.5^k / k! for k = 0..9, renormalised
    raw = [2.5**k / math.factorial(k) for k in range(10)]
    assert psi_distribution(2, "poisson").tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-6)
    # t=0: lambda 0.5: P(0)/P(1) = 1 / 0.5 = 2
    p0 = psi_distribution(0, "poisson")
    assert (p0[0] / p0[1]).item() == pytest.approx(2.0, rel=1e-6)
    for t in range(10):  # the mode of Poisson(t + 0.5) is floor(t + 0.5) = t
        assert int(psi_distribution(t, "poisson").argmax()) == t


def test_uniform_and_eta_extremes():
    assert psi_distribution(7, "uniform").tolist() == pytest.approx([0.1] * 10)
    # uniform, eta 0.05, t=7: 0.95 + 0.005 on 7, 0.005 elsewhere
    q = softlabel_target(7, "uniform", 0.05)
    assert q[7].item() == pytest.approx(0.955) and q[0].item() == pytest.approx(0.005)
    assert softlabel_target(4, "triangular", 0.0).tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]  # eta 0: one-hot
    assert softlabel_target(4, "triangular", 1.0).tolist() == pytest.approx(psi_distribution(4, "triangular").tolist())
    for psi in ("triangular", "binomial", "poisson", "uniform"):
        for d in range(10):
            q = softlabel_target(d, psi, 0.3)
            assert q.shape == (10,) and q.sum().item() == pytest.approx(1.0, abs=1e-6) and (q >= 0).all()


def test_dist2_target_by_hand():
    # t=4, tau=1: squared distances of v=0..9 are 16,9,4,1,0,1,4,9,16,25
    z = 1 + 2 * math.exp(-1) + 2 * math.exp(-4) + 2 * math.exp(-9) + 2 * math.exp(-16) + math.exp(-25)
    p = dist2_target(4, 1.0)
    assert p[4].item() == pytest.approx(1 / z, rel=1e-6)
    assert p[5].item() == pytest.approx(math.exp(-1) / z, rel=1e-6)
    assert p[9].item() == pytest.approx(math.exp(-25) / z, rel=1e-4)
    # tau=2 halves the exponent: p(5)/p(4) = exp(-1/2)
    p2 = dist2_target(4, 2.0)
    assert (p2[5] / p2[4]).item() == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert p2.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_bad_target_arguments():
    with pytest.raises(ValueError, match="unknown psi 'gauss'; allowed: triangular, binomial, poisson, uniform"):
        softlabel_target(3, "gauss")
    with pytest.raises(ValueError, match="digit must be in 0..9"):
        dist2_target(10)
    with pytest.raises(ValueError, match="digit must be in 0..9"):
        softlabel_target(-1)
    with pytest.raises(ValueError, match="digit must be an integer"):
        softlabel_target(3.5)
    with pytest.raises(ValueError, match="eta must be in"):
        softlabel_target(1, eta=1.5)
    with pytest.raises(ValueError, match="eta must be in"):
        softlabel_target(1, eta=-0.1)
    with pytest.raises(ValueError, match="tau must be positive"):
        dist2_target(1, tau=0.0)
    from orchestrator.methods.objectives import SFT_OBJECTIVES

    with pytest.raises(ValueError, match="unknown SFT objective 'mse'; allowed: ce, softlabel, dist2, rvtc"):
        SFT_OBJECTIVES["mse"]
    with pytest.raises(ValueError, match="10 ids"):
        ce_loss(torch.zeros(1, 12), torch.zeros(1, dtype=torch.long), DIGITS[:9])
    with pytest.raises(ValueError, match="expected logits"):
        ce_loss(torch.zeros(2, 12), torch.zeros(3, dtype=torch.long), DIGITS)


# --------------------------------------------------------------------------- digit places


def test_digit_values_and_places_by_hand():
    # tokens: "<" 1 2 3 ">" 4 [ignored] 5 6  (ids: digit d is d+2)
    labels = torch.tensor([0, 3, 4, 5, 1, 6, -100, 7, 8])
    assert digit_values(labels, DIGITS).tolist() == [-1, 1, 2, 3, -1, 4, -1, 5, 6]
    # run "123" -> hundreds, tens, units; "4" alone -> units; -100 breaks the run; "56" -> tens, units
    assert digit_places(labels, DIGITS).tolist() == [-1, 2, 1, 0, -1, 0, -1, 1, 0]


def test_digit_places_degenerate_and_batched():
    assert digit_places(torch.tensor([-100, 0, 1]), DIGITS).tolist() == [-1, -1, -1]  # no digits
    assert digit_places(torch.tensor([2, 2, 2, 2, 2]), DIGITS).tolist() == [4, 3, 2, 1, 0]  # one run to the end
    assert digit_places(torch.tensor([], dtype=torch.long), DIGITS).tolist() == []
    # [B, T] input: runs do not join across rows ([3,4] / [5,1] would be places 2,1,0 if flattened)
    assert digit_places(torch.tensor([[3, 4], [5, 1]]), DIGITS).tolist() == [[1, 0], [0, -1]]


# --------------------------------------------------------------------------- losses, by hand
# One logits row for every position: zeros, except log 3 on the token of digit 5 (id 7).
# Softmax: Z = 11·1 + 3 = 14, so log p = log(3/14) on id 7 and log(1/14) on every other id.
# Labels: regular id 0, digit 5 (id 7), ignored, digit 1 (id 3).


def _case():
    logits = torch.zeros(4, 12)
    logits[:, 7] = L3
    return logits, torch.tensor([0, 7, -100, 3])


def test_ce_loss_by_hand():
    logits, labels = _case()
    loss, n = ce_loss(logits, labels, DIGITS)
    # CE: regular log 14, digit 5: log 14 - log 3, digit 1: log 14
    assert n.item() == 3 and loss.item() == pytest.approx(3 * L14 - L3, rel=1e-6)
    loss2, n2 = ce_loss(logits, labels, DIGITS, digit_weight=2.0)
    # log 14 + 2 (log 14 - log 3) + 2 log 14; the normaliser does not change with the weight
    assert n2.item() == 3 and loss2.item() == pytest.approx(5 * L14 - 2 * L3, rel=1e-6)


def test_softlabel_loss_by_hand():
    logits, labels = _case()
    loss, n = softlabel_loss(logits, labels, DIGITS, psi="triangular", eta=0.08, lam=2.0)
    # digit 5: q = .96 on 5, .02 on 4 and 6 -> softCE = -(.96 log(3/14) + .04 log(1/14)) = log 14 - .96 log 3
    # digit 1: q puts nothing on 5                 -> softCE = log 14
    # total = log 14 + 2 (log 14 - .96 log 3) + 2 log 14 = 5 log 14 - 1.92 log 3
    assert n.item() == 3 and loss.item() == pytest.approx(5 * L14 - 1.92 * L3, rel=1e-6)
    loss, _ = softlabel_loss(logits, labels, DIGITS, psi="uniform", eta=0.05, lam=1.0)
    # uniform: q(5) = .955 for target 5 and .005 for target 1
    # total = log 14 + (log 14 - .955 log 3) + (log 14 - .005 log 3) = 3 log 14 - .96 log 3
    assert loss.item() == pytest.approx(3 * L14 - 0.96 * L3, rel=1e-6)
    # eta = 0 and lam = 1 is exactly CE
    hard, _ = ce_loss(logits, labels, DIGITS)
    same, _ = softlabel_loss(logits, labels, DIGITS, eta=0.0, lam=1.0)
    assert same.item() == pytest.approx(hard.item(), rel=1e-6)


def test_softlabel_gradient_is_softmax_minus_q():
    # d softCE / d logits = softmax - q over the FULL vocabulary; uniform logits -> softmax 1/12.
    logits = torch.zeros(1, 12, requires_grad=True)
    loss, _ = softlabel_loss(logits, torch.tensor([7]), DIGITS, psi="triangular", eta=0.08, lam=1.0)
    loss.backward()
    g = logits.grad[0]
    assert g[7].item() == pytest.approx(1 / 12 - 0.96, abs=1e-6)  # digit 5
    assert g[6].item() == pytest.approx(1 / 12 - 0.02, abs=1e-6)  # digit 4
    assert g[0].item() == pytest.approx(1 / 12, abs=1e-6)  # a regular token: q = 0 there
    assert g[11].item() == pytest.approx(1 / 12, abs=1e-6)  # digit 9: outside the triangle


def _neg_entropy_dist2(t: int) -> tuple[float, float]:
    """(Σ p log p, p(5)) of dist2_target(t, 1) from the closed form: log p(v) = -(v-t)² - log z."""
    w = [math.exp(-((v - t) ** 2)) for v in range(10)]
    z = sum(w)
    return sum(wi / z * (-((v - t) ** 2) - math.log(z)) for v, wi in enumerate(w)), w[5] / z


def test_dist2_loss_by_hand():
    logits, labels = _case()
    # KL(p_d || p_theta) = Σ p log p - Σ p log p_theta = Σ p log p + log 14 - p(5) log 3
    def kl(t):
        negent, p5 = _neg_entropy_dist2(t)
        return negent + L14 - p5 * L3

    loss, n = dist2_loss(logits, labels, DIGITS, tau=1.0, alpha=0.1)
    # CE over all three tokens (3 log 14 - log 3) + 0.1 (KL for target 5 + KL for target 1)
    assert n.item() == 3
    assert loss.item() == pytest.approx(3 * L14 - L3 + 0.1 * (kl(5) + kl(1)), rel=1e-6)
    without_kl = dist2_loss(logits, labels, DIGITS, alpha=0.0)[0].item()
    assert without_kl == pytest.approx(ce_loss(logits, labels, DIGITS)[0].item())


def test_dist2_place_value_weights_by_hand():
    # Uniform logits, five digits "00000" then a regular token: places 4,3,2,1,0 -> weights 4,4,3,2,1.
    # Every digit position has the same KL K, so the KL part is 14 K weighted vs 5 K plain.
    labels = torch.tensor([2, 2, 2, 2, 2, 0])
    logits = torch.zeros(6, 12)
    ce_part = 6 * math.log(12)
    weighted, _ = dist2_loss(logits, labels, DIGITS, alpha=1.0, place_value_weights=True)
    plain, _ = dist2_loss(logits, labels, DIGITS, alpha=1.0)
    negent, _ = _neg_entropy_dist2(0)
    k = negent + math.log(12)
    assert plain.item() == pytest.approx(ce_part + 5 * k, rel=1e-6)
    assert weighted.item() == pytest.approx(ce_part + 14 * k, rel=1e-6)


def test_dist2_tiny_tau_has_no_nan():
    # tau 1e-3 underflows every other digit's target to exactly 0: KL is then -log p_theta(t) alone.
    logits = torch.zeros(1, 12, requires_grad=True)
    loss, _ = dist2_loss(logits, torch.tensor([7]), DIGITS, tau=1e-3, alpha=1.0)
    assert loss.item() == pytest.approx(2 * math.log(12), rel=1e-6)  # CE + KL, both log 12
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------- degenerate inputs and plumbing


LOSS_FUNCTIONS = {"ce": ce_loss, "softlabel": softlabel_loss, "dist2": dist2_loss}


def sft_loss(name, logits, labels, digit_token_ids, **params):
    return LOSS_FUNCTIONS[name](logits, labels, digit_token_ids, **params)


@pytest.mark.parametrize("name", ["ce", "softlabel", "dist2"])
def test_all_ignored_and_empty(name):
    logits = torch.randn(3, 12, requires_grad=True)
    loss, n = sft_loss(name, logits, torch.full((3,), -100), DIGITS)
    assert loss.item() == 0.0 and n.item() == 0
    loss.backward()
    assert logits.grad.abs().sum().item() == 0.0
    loss, n = sft_loss(name, torch.zeros(0, 12), torch.zeros(0, dtype=torch.long), DIGITS)
    assert loss.item() == 0.0 and n.item() == 0


@pytest.mark.parametrize("name", ["ce", "softlabel", "dist2"])
def test_losses_have_gradients_only_where_labelled(name):
    logits = torch.zeros(3, 12, requires_grad=True)
    loss, n = sft_loss(name, logits, torch.tensor([-100, 7, 0]), DIGITS)
    (loss / n).backward()
    assert logits.grad[0].abs().sum().item() == 0.0 and logits.grad[1].abs().sum().item() > 0


@pytest.mark.parametrize(
    "name, params",
    [
        ("softlabel", {"psi": "poisson", "eta": 0.3, "lam": 2.0}),
        ("dist2", {"tau": 0.7, "alpha": 0.5, "place_value_weights": True}),
    ],
)
def test_vectorised_targets_match_one_position_at_a_time(name, params):
    # Every digit once, in runs of one (a regular token after each), so places are all units.
    torch.manual_seed(0)
    labels = torch.stack([torch.arange(2, 12), torch.zeros(10, dtype=torch.long)], 1).flatten()
    logits = torch.randn(len(labels), 12)
    whole, n = sft_loss(name, logits, labels, DIGITS, **params)
    parts = sum(sft_loss(name, logits[i : i + 1], labels[i : i + 1], DIGITS, **params)[0] for i in range(len(labels)))
    assert n.item() == 20 and whole.item() == pytest.approx(parts.item(), rel=1e-5)

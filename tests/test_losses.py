"""SFT losses and target distributions against hand-computed values."""

import math

import pytest
import torch

from orchestrator.losses import (
    ce_loss, digit_places, dist2_loss, dist2_target, psi_distribution, sft_loss, softlabel_loss, softlabel_target,
)

# A toy vocabulary of 12 tokens: ids 2..11 are the digits 0..9, ids 0 and 1 are regular tokens.
DIGITS = torch.arange(2, 12)


def test_triangular_by_hand():
    # t=5: weights max(0, 2-|v-5|) = 1 at 4, 2 at 5, 1 at 6 -> /4; eta=0.08
    q = softlabel_target(5, "triangular", 0.08)
    assert q[5].item() == pytest.approx(0.92 + 0.08 * 0.5)
    assert q[4].item() == pytest.approx(0.08 * 0.25) and q[6].item() == pytest.approx(0.08 * 0.25)
    assert q[0].item() == 0.0
    # t=0 is truncated: weights 2 at 0, 1 at 1 -> 2/3, 1/3
    assert psi_distribution(0, "triangular")[:2].tolist() == pytest.approx([2 / 3, 1 / 3])


def test_other_psi_families_by_hand():
    b = psi_distribution(0, "binomial")  # p = 0 -> all mass on 0
    assert b[0].item() == pytest.approx(1.0)
    b9 = psi_distribution(9, "binomial")
    assert b9[9].item() == pytest.approx(1.0)
    b3 = psi_distribution(3, "binomial")  # mean 9 * 3/9 = 3
    assert (b3 * torch.arange(10)).sum().item() == pytest.approx(3.0, abs=1e-5)
    p = psi_distribution(2, "poisson")  # lambda 2.5: P(k) ∝ 2.5^k/k!; mode 2
    raw = [2.5**k / math.factorial(k) for k in range(10)]
    assert p[2].item() == pytest.approx(raw[2] / sum(raw), rel=1e-5)
    assert int(p.argmax()) == 2
    assert psi_distribution(7, "uniform").tolist() == pytest.approx([0.1] * 10)
    for psi in ("triangular", "binomial", "poisson", "uniform"):
        for d in range(10):
            assert softlabel_target(d, psi, 0.3).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_dist2_target_by_hand():
    # t=4, tau=1: logits -(v-4)^2 -> 0 at 4, -1 at 3 and 5, -4 at 2 and 6 ...
    p = dist2_target(4, 1.0)
    z = sum(math.exp(-((v - 4) ** 2)) for v in range(10))
    assert p[4].item() == pytest.approx(1 / z, rel=1e-6)
    assert p[5].item() == pytest.approx(math.exp(-1) / z, rel=1e-6)


def test_bad_target_arguments():
    with pytest.raises(ValueError, match="unknown psi 'gauss'"):
        softlabel_target(3, "gauss")
    with pytest.raises(ValueError, match="digit must be in 0..9"):
        dist2_target(10)
    with pytest.raises(ValueError, match="eta must be in"):
        softlabel_target(1, eta=1.5)
    with pytest.raises(ValueError, match="unknown SFT loss"):
        sft_loss("mse", torch.zeros(1, 12), torch.zeros(1, dtype=torch.long), DIGITS)


def _uniform_case():
    # Uniform logits: every CE is log(12). Labels: regular(0), digit 5 (id 7), ignored, digit 1 (id 3).
    logits = torch.zeros(4, 12)
    labels = torch.tensor([0, 7, -100, 3])
    return logits, labels


def test_ce_loss_and_digit_weight_by_hand():
    logits, labels = _uniform_case()
    loss, n = ce_loss(logits, labels, DIGITS)
    assert n.item() == 3 and loss.item() == pytest.approx(3 * math.log(12))
    loss2, _ = ce_loss(logits, labels, DIGITS, digit_weight=2.0)
    assert loss2.item() == pytest.approx(math.log(12) + 2 * 2 * math.log(12))


def test_softlabel_loss_by_hand():
    logits, labels = _uniform_case()
    # With uniform logits, soft CE = -Σ q log(1/12) = log 12 for any q summing to one.
    loss, n = softlabel_loss(logits, labels, DIGITS, psi="triangular", eta=0.08, lam=2.0)
    assert n.item() == 3 and loss.item() == pytest.approx(math.log(12) + 2 * 2 * math.log(12), rel=1e-6)
    # A confident correct model: soft targets cost more than one-hot CE on the digit.
    logits = torch.full((1, 12), -10.0)
    logits[0, 7] = 10.0
    hard, _ = ce_loss(logits, torch.tensor([7]), DIGITS)
    soft, _ = softlabel_loss(logits, torch.tensor([7]), DIGITS, eta=0.08, lam=1.0)
    assert soft.item() > hard.item()


def test_dist2_loss_by_hand():
    logits, labels = _uniform_case()
    # p_theta = 1/12 everywhere; KL(p_d || p_theta) = Σ p log p + log 12 for each digit position.
    def kl(t):
        p = dist2_target(t, 1.0)
        return float((p * p.log()).sum()) + math.log(12)

    loss, n = dist2_loss(logits, labels, DIGITS, tau=1.0, alpha=0.1)
    assert n.item() == 3
    assert loss.item() == pytest.approx(3 * math.log(12) + 0.1 * (kl(5) + kl(1)), rel=1e-5)
    weighted, _ = dist2_loss(logits, labels, DIGITS, alpha=0.1, place_value_weights=True)
    # digit 5 is alone in its run (units, weight 1); so is digit 1 after the ignored position
    assert weighted.item() == pytest.approx(loss.item(), rel=1e-6)


def test_digit_places():
    # "<", 1, 2, 3, ">", 4, -100  -> places 2,1,0 for the run "123", 0 for "4"
    labels = torch.tensor([0, 3, 4, 5, 1, 6, -100])
    assert digit_places(labels, DIGITS).tolist() == [-1, 2, 1, 0, -1, 0, -1]
    weighted, _ = dist2_loss(torch.zeros(7, 12), labels, DIGITS, alpha=1.0, place_value_weights=True)
    plain, _ = dist2_loss(torch.zeros(7, 12), labels, DIGITS, alpha=1.0)
    assert weighted.item() > plain.item()


def test_losses_have_gradients_only_where_labelled():
    logits = torch.zeros(3, 12, requires_grad=True)
    loss, n = softlabel_loss(logits, torch.tensor([-100, 7, 0]), DIGITS)
    (loss / n).backward()
    assert logits.grad[0].abs().sum().item() == 0.0 and logits.grad[1].abs().sum().item() > 0

"""The CISPO loss against a hand-computed example: clipping on both sides, the stop-gradient on the
weight, token-level normalisation, and the KL term."""

from __future__ import annotations

import math

import pytest
import torch

from memento.train.rl.cispo import cispo_loss, k3_kl

EPS_LOW, EPS_HIGH, BETA = 0.2, 0.3, 0.1

# Two responses: row 0 has 3 loss tokens, row 1 has 2 (its third slot is padding).
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -7.0]]
OLD = [
    [-1.5, 0.0, -2.0],
    [-0.4, -1.1, -0.1],
]  # ratios e^0.5 (clipped high), e^-0.5 (clipped low), 1, e^0.1, e^-0.1
REF = [[-1.2, -0.4, -2.5], [-0.3, -1.0, -3.0]]
ADV = [2.0, -1.0]
MASK = [[1, 1, 1], [1, 1, 0]]


def hand_terms():
    """Per loss token: (weight, policy term, kl) computed with plain floats."""
    terms = []
    for b in range(2):
        for t in range(3):
            if not MASK[b][t]:
                continue
            ratio = math.exp(LOGP[b][t] - OLD[b][t])
            weight = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH)
            kl = math.exp(REF[b][t] - LOGP[b][t]) - (REF[b][t] - LOGP[b][t]) - 1
            terms.append((b, t, weight, -weight * ADV[b] * LOGP[b][t], kl))
    return terms


def run(beta=BETA, num_tokens=None, rows=slice(None)):
    logp = torch.tensor(LOGP, dtype=torch.float64)[rows].requires_grad_(True)
    loss, stats = cispo_loss(
        logp,
        torch.tensor(OLD, dtype=torch.float64)[rows],
        torch.tensor(ADV, dtype=torch.float64)[rows],
        torch.tensor(MASK)[rows],
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        beta=beta,
        ref_logp=torch.tensor(REF, dtype=torch.float64)[rows],
        num_tokens=num_tokens,
    )
    loss.backward()
    return loss, stats, logp.grad


def test_loss_matches_hand_computation_with_both_clips_and_kl():
    terms = hand_terms()
    weights = [w for _, _, w, _, _ in terms]
    assert weights[0] == pytest.approx(1 + EPS_HIGH) and weights[1] == pytest.approx(1 - EPS_LOW)
    assert weights[2] == pytest.approx(1.0) and 1 - EPS_LOW < weights[3] < 1 + EPS_HIGH
    expected = sum(pg + BETA * kl for _, _, _, pg, kl in terms) / 5
    loss, stats, _ = run()
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats.tokens == 5
    assert (stats.clipped_low, stats.clipped_high) == (1, 1)
    assert stats.kl_sum == pytest.approx(sum(kl for *_, kl in terms), abs=1e-12)
    assert stats.policy_sum == pytest.approx(sum(pg for _, _, _, pg, _ in terms), abs=1e-12)


def test_gradient_stops_at_the_clipped_weight():
    """d loss / d logp_t = (-w_t * A + beta * (1 - e^(ref - logp))) / N: the weight is a constant,
    so clipped tokens keep their gradient (unlike PPO's clip) and no d w / d logp term appears."""
    _, _, grad = run()
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for b, t, w, _, _ in hand_terms():
        expected[b, t] = (-w * ADV[b] + BETA * (1 - math.exp(REF[b][t] - LOGP[b][t]))) / 5
    assert torch.allclose(grad, expected, atol=1e-12)
    assert grad[1, 2] == 0  # padding carries nothing
    assert grad[0, 0] != 0 and grad[0, 1] != 0  # clipped on either side, still a gradient


def test_token_level_normalisation_and_micro_batches_add_up():
    full, _, grad = run(beta=0.0)
    per_token = [pg for *_, pg, _ in hand_terms()]
    assert full.item() == pytest.approx(sum(per_token) / 5, abs=1e-12)
    per_sequence = (sum(per_token[:3]) / 3 + sum(per_token[3:]) / 2) / 2
    assert full.item() != pytest.approx(per_sequence, abs=1e-6)  # not a mean of sequence means
    # the same step split in two micro-batches, each normalised by the step's token count
    a, _, ga = run(beta=0.0, num_tokens=5, rows=slice(0, 1))
    b, _, gb = run(beta=0.0, num_tokens=5, rows=slice(1, 2))
    assert (a + b).item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(torch.cat([ga, gb]), grad, atol=1e-12)


def test_on_policy_ratio_is_one_and_kl_is_zero_at_the_reference():
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    loss, stats = cispo_loss(
        logp, logp.detach(), torch.tensor(ADV), torch.tensor(MASK), eps_low=0.2, eps_high=0.3,
        beta=1.0, ref_logp=logp.detach(),
    )  # fmt: skip
    assert stats.ratio_sum == pytest.approx(5.0) and stats.clipped_low == stats.clipped_high == 0
    assert stats.kl_sum == 0.0
    assert torch.all(k3_kl(logp.detach(), logp.detach() + 0.3) > 0)


def test_rejects_beta_without_reference_and_negative_eps():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="reference"):
        cispo_loss(x, x, torch.ones(1), torch.ones(1, 2), eps_low=0.2, eps_high=0.2, beta=0.1)
    with pytest.raises(ValueError, match="eps_low"):
        cispo_loss(x, x, torch.ones(1), torch.ones(1, 2), eps_low=-1, eps_high=0.2)

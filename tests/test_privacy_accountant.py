"""The accountant's epsilon (Google's dp-accounting, RDP) against an independent one: Opacus's
RDP analysis (opacus.accountants.analysis.rdp), within 1 % for the same (q, sigma, rounds,
delta). Both need their packages (the dp extra; Opacus is a test-only check)."""

from __future__ import annotations

import pytest

pytest.importorskip("dp_accounting")
opacus_rdp = pytest.importorskip("opacus.accountants.analysis.rdp")

from fedberry.privacy.accountant import epsilon, last_round_within  # noqa: E402

# Opacus's default orders, as its RDPAccountant uses them.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def opacus_epsilon(q: float, sigma: float, rounds: int, delta: float) -> float:
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=rounds, orders=ORDERS)
    eps, _ = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


@pytest.mark.parametrize("q,sigma,rounds,delta", [
    (1.0, 1.1, 10, 1e-5),     # every worker every round: the plain Gaussian mechanism
    (1.0, 4.0, 200, 1e-5),
    (1.0, 0.8, 3, 1e-3),
    (0.1, 1.0, 1000, 1e-6),   # client sampling (when it lands): the sampled Gaussian
    (0.01, 1.3, 5000, 1e-5),
])
def test_epsilon_matches_opacus_within_one_percent(q, sigma, rounds, delta):
    ours = epsilon(sigma, rounds, delta, q)
    theirs = opacus_epsilon(q, sigma, rounds, delta)
    assert ours == pytest.approx(theirs, rel=0.01), (ours, theirs)


def test_the_last_round_within_budget_is_the_last_one_opacus_also_puts_within():
    sigma, delta, target = 1.5, 1e-5, 8.0
    last = last_round_within(target, sigma, delta)
    assert last > 1
    assert opacus_epsilon(1.0, sigma, last, delta) <= target * 1.01
    assert opacus_epsilon(1.0, sigma, last + 1, delta) > target * 0.99
    assert epsilon(sigma, last, delta) <= target < epsilon(sigma, last + 1, delta)


def test_no_noise_is_no_guarantee_and_no_round_costs_nothing():
    assert epsilon(0.0, 5, 1e-5) == float("inf")
    assert epsilon(1.0, 0, 1e-5) == 0.0
    assert last_round_within(100.0, 0.0, 1e-5) == 0

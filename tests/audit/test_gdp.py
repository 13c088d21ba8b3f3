"""Exact GDP <-> (epsilon, delta) conversions against independent computations."""

import math

import dp_accounting
import pytest
from dp_accounting.pld import privacy_loss_distribution
from scipy import optimize, stats

from dpjax.audit import gdp_delta, gdp_epsilon, gdp_mu

CASES = [(mu, delta) for mu in (0.1, 0.5, 1.0, 2.0, 4.0) for delta in (1e-10, 1e-5, 1e-2)]


def _delta_direct(mu, eps):
    """Dong, Roth, Su (2019), Corollary 2.13, in plain (not log) arithmetic."""
    return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("mu, eps", [(0.3, 0.0), (0.5, 0.7), (1.0, 2.0), (2.0, 5.0), (3.0, 1.0)])
def test_gdp_delta_is_the_closed_form(mu, eps):
    assert gdp_delta(mu, eps) == pytest.approx(_delta_direct(mu, eps), rel=1e-10)


@pytest.mark.parametrize("mu, delta", CASES)
def test_gdp_epsilon_solves_the_closed_form(mu, delta):
    direct = optimize.brentq(lambda e: _delta_direct(mu, e) - delta, 0.0, 200.0, xtol=1e-14)
    assert gdp_epsilon(mu, delta) == pytest.approx(direct, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mu, delta", CASES)
def test_gdp_epsilon_equals_dp_accounting_analytic_gaussian(mu, delta):
    # dp-accounting's exact (Balle & Wang) conversion for noise 1 / mu on sensitivity 1.
    expected = dp_accounting.get_epsilon_gaussian(1 / mu, delta)
    assert gdp_epsilon(mu, delta) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mu, delta", [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-5), (1.0, 1e-3)])
def test_gdp_epsilon_agrees_with_dp_accounting_pld(mu, delta):
    # The PLD accountant discretizes pessimistically: at interval 1e-3 it lies above the
    # exact value by at most 1e-5 (measured: <= 2e-6) and never below it.
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=1 / mu, value_discretization_interval=1e-3
    )
    gap = pld.get_epsilon_for_delta(delta) - gdp_epsilon(mu, delta)
    assert -1e-9 <= gap <= 1e-5


@pytest.mark.parametrize("mu, delta", CASES)
def test_gdp_mu_inverts_gdp_epsilon(mu, delta):
    eps = gdp_epsilon(mu, delta)
    if eps == 0:
        assert gdp_delta(mu, 0.0) <= delta
        return
    assert gdp_mu(eps, delta) == pytest.approx(mu, rel=1e-9)


@pytest.mark.parametrize("eps, delta", [(0.5, 1e-5), (2.0, 1e-5), (8.0, 1e-6), (1.0, 0.1)])
def test_gdp_mu_is_one_over_dp_accounting_sigma(eps, delta):
    assert gdp_mu(eps, delta) == pytest.approx(
        1 / dp_accounting.get_sigma_gaussian(eps, delta), rel=1e-9
    )


def test_edge_values():
    assert gdp_epsilon(0.0, 1e-5) == 0.0
    assert gdp_epsilon(1.0, 0.0) == math.inf
    assert gdp_epsilon(1.0, 0.5) == 0.0  # 0.5 > gdp_delta(1, 0) = 2 Phi(1/2) - 1 = 0.383
    assert gdp_delta(0.0, 1.0) == 0.0
    assert gdp_mu(1.0, 0.0) == 0.0
    assert gdp_delta(1.0, 0.0) == pytest.approx(2 * stats.norm.cdf(0.5) - 1, rel=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: gdp_epsilon(-1.0, 1e-5), "mu=-1.0"),
        (lambda: gdp_epsilon(math.nan, 1e-5), "mu=nan"),
        (lambda: gdp_epsilon(1.0, 1.0), r"delta=1.0 in \[0, 1\)"),
        (lambda: gdp_delta(1.0, -0.5), "epsilon=-0.5"),
        (lambda: gdp_mu(math.inf, 1e-5), "epsilon=inf"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()

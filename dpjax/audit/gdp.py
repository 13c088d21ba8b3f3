"""Exact conversions between Gaussian DP (mu-GDP) and (epsilon, delta)-DP.

A mechanism is mu-GDP when telling its outputs on neighbouring inputs apart is
no easier than telling N(0, 1) from N(mu, 1) (Dong, Roth, Su 2019, "Gaussian
Differential Privacy"). The Gaussian mechanism with noise multiplier ``sigma``
(noise ``sigma * sensitivity``) is exactly ``(1 / sigma)``-GDP. Their
Corollary 2.13 gives the whole (epsilon, delta) curve of mu-GDP:

    delta(epsilon) = Phi(-epsilon / mu + mu / 2) - e^epsilon Phi(-epsilon / mu - mu / 2),

the same curve as the analytic Gaussian mechanism (Balle & Wang 2018, Theorem 8).
Everything is evaluated in log space, so it stays exact for mu up to ~40 and
delta down to 1e-300.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special

_XTOL = 1e-13
# Stands in for log(0) inside root finding: below log(1e-300), so signs are kept.
_LOG_ZERO = -1e4


def _check_mu(mu: float) -> None:
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"Expected mu={mu!r} to be finite and >= 0.")


def _check_epsilon(epsilon: float) -> None:
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"Expected epsilon={epsilon!r} to be finite and >= 0.")


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 <= delta < 1):
        raise ValueError(f"Expected delta={delta!r} in [0, 1).")


def _log_delta(mu: float, epsilon: float) -> float:
    """log delta(epsilon) of mu-GDP, mu > 0; -inf where delta underflows to 0."""
    log_first = special.log_ndtr(-epsilon / mu + mu / 2)
    log_second = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    if log_second >= log_first:
        return -math.inf
    return float(log_first + np.log1p(-np.exp(log_second - log_first)))


def gdp_delta(mu: float, epsilon: float) -> float:
    """Returns the smallest delta for which a mu-GDP mechanism is (epsilon, delta)-DP.

    Exact (Dong, Roth, Su 2019, Corollary 2.13); ``mu = 0`` gives 0.
    """
    _check_mu(mu)
    _check_epsilon(epsilon)
    if mu == 0:
        return 0.0
    return math.exp(_log_delta(mu, epsilon))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Returns the smallest epsilon for which a mu-GDP mechanism is (epsilon, delta)-DP.

    Exact up to 1e-13 absolute; ``inf`` when ``delta = 0`` and ``mu > 0`` (a
    Gaussian trade-off curve is not pure DP), 0 when ``mu = 0`` or when delta is
    at least ``gdp_delta(mu, 0) = 2 Phi(mu / 2) - 1``.
    """
    _check_mu(mu)
    _check_delta(delta)
    if mu == 0:
        return 0.0
    if delta == 0:
        return math.inf
    log_target = math.log(delta)
    if _log_delta(mu, 0.0) <= log_target:
        return 0.0
    high = max(1.0, mu * mu)
    while _log_delta(mu, high) > log_target:
        high *= 2
    return float(
        optimize.brentq(
            lambda e: max(_log_delta(mu, e), _LOG_ZERO) - log_target, 0.0, high, xtol=_XTOL
        )
    )


def gdp_mu(epsilon: float, delta: float) -> float:
    """Returns the largest mu for which every mu-GDP mechanism is (epsilon, delta)-DP.

    The inverse of :func:`gdp_epsilon` in ``mu``: ``gdp_epsilon(gdp_mu(e, d), d) = e``
    (to 1e-9). For a Gaussian mechanism this is ``1 / sigma`` of the smallest
    noise multiplier that meets ``(epsilon, delta)``; 0 when ``delta = 0``.
    """
    _check_epsilon(epsilon)
    _check_delta(delta)
    if delta == 0:
        return 0.0
    log_target = math.log(delta)
    high = 1.0
    while _log_delta(high, epsilon) < log_target:
        high *= 2
    return float(
        optimize.brentq(
            lambda m: max(_log_delta(m, epsilon), _LOG_ZERO) - log_target, 1e-300, high, xtol=_XTOL
        )
    )

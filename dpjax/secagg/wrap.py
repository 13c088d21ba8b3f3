"""A bound on the probability that the decoded sum wraps around ``Z_{2^bits}`` (host, numpy).

Per coordinate ``j`` the decoded total is ``S_j = A_j + N_j`` with ``N_j`` the
summed noise (independent of everything else) and ``A_j`` the survivors'
rotated, rounded signal. The lift is correct iff ``-r <= S_j < r``,
``r = 2^(bits-1)``. The bound used:

1. Semi-Chernoff (exact noise tail, Chernoff on the signal): for ``t > 0``,
   ``P(A + N >= r) = E_A P(N >= ceil(r - A)) <= E[e^{tA}] sup_k P(N >= k) e^{t(k-r)}``,
   because ``e^{t(r - ceil(r - A))} <= e^{tA}``. The supremum is taken over
   every integer ``k``: exactly on a window of integers, and outside it by
   Chernoff (``E e^{t'N} e^{-t'k}`` with ``t' = t/2`` below, ``2t`` above).
2. Signal mgf: the rotated sum of the survivors' vectors ``Y`` (each
   ``||y_u|| <= c``, so ``||Y|| <= s c``) has coordinates that are
   Rademacher sums with ``E e^{t (RSY)_j} <= exp(t^2 flatness ||Y||^2 / (2D))``;
   each party's rounding error is in an interval of length 1 with mean
   ``<= 2^-24`` (Hoeffding: ``exp(t 2^-24 + t^2/8)``); float32 rotation
   error shifts each coordinate by at most ``shift_per_party``. Conditional
   rounding conditions each party on an event of probability
   ``>= 1 - beta_r``, which multiplies the mgf by at most ``(1 - beta_r)^-s``;
   the event that some party exhausts its tries (``<= s beta_r^tries``) is added.
3. Noise tail: Skellam: the exact pmf of ``Sk(s mu)`` (``scipy.special.ive``),
   summed over the window, with a Chernoff tail beyond it. Sum of ``s``
   discrete Gaussians ``N_Z(0, sigma^2)``: its pmf is within ``e^tau`` of
   ``N_Z(0, s sigma^2)`` (Kairouz, Liu, Steinke 2021, Theorem 1, ``tau = 10
   sum_{k<s} exp(-2 pi^2 sigma^2 k/(k+1))``), whose tail is at most
   ``Q(k/sd) + exp(-k^2/(2 sd^2)) / (sqrt(2 pi) sd)`` (integral comparison).
4. Both tails (``S >= r`` and ``S <= -r - 1``) and a union over the ``D``
   coordinates: ``P(wrap) <= 2 D inf_t [...] + s beta_r^tries``.

Survivors: for ``s <= n`` the noise sum is less spread (peakedness: a
symmetric unimodal integer ``X`` has ``P(|X + Z| <= a) <= P(|X| <= a)`` for
any independent integer ``Z``), and every other term grows with ``s``, so the
bound computed at ``s = n`` holds for every number of survivors. It assumes
the inputs do not depend on the round's rotation key (fresh, drawn after).

Tightness: the union bound is nearly exact for small targets and the noise
tail is exact; the loss is a factor ~ ``sqrt(1 + var_A / var_N)`` from the
signal's Chernoff step. When the total noise standard deviation exceeds
``2^17`` integer units the window would be too long and the noise tail is
bounded by Chernoff too (looser by a factor ~ ``z sqrt(2 pi)``, ~5% in ``gamma``);
likewise for a Skellam sum whose variance is past ``scipy.special.ive``'s range
(``2^30``: it returns NaN there).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special

_MAX_WINDOW_STD = 2.0**17
_MAX_WINDOW = 2**20
_MAX_T = 20.0
_CHERNOFF_GRID = tuple(np.linspace(0.0, 1.0, 33)[:-1])  # t'/t below, t/t' above


def ddg_tau(sigma: float, num_parties: int) -> float:
    """``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k+1))`` (Kairouz et al. 2021, Thm 1)."""
    k = np.arange(1, num_parties, dtype=np.float64)
    return float(10 * np.sum(np.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1))))


def _log_mgf_noise(noise: str, total: float, t: float) -> float:
    """``log E e^{tN}`` (upper bound) for the summed noise; ``inf`` past float range."""
    if noise == "skellam":
        if t > 700:
            return math.inf
        return total * (math.cosh(t) - 1)  # Sk(mu): exactly mu (cosh t - 1)
    return total * t * t / 2  # sum of DGs: each is sub-Gaussian (Canonne et al. 2020, Cor. 9)


def _log_tail_window(noise: str, total: float, tau: float, ks: np.ndarray) -> np.ndarray:
    """Upper bounds on ``log P(N >= k)`` for consecutive integers ``ks >= 1``."""
    if noise == "skellam":
        pmf = special.ive(ks, total)  # e^{-mu} I_k(mu) = P(Sk(mu) = k)
        beyond = ks[-1] + 1.0
        t_prime = math.asinh(beyond / total)
        log_rest = total * (math.cosh(t_prime) - 1) - t_prime * beyond
        tail = np.cumsum(pmf[::-1])[::-1] + math.exp(log_rest)
        with np.errstate(divide="ignore"):
            return np.log(tail)
    sd = math.sqrt(total)
    z = ks / sd
    log_extra = -0.5 * z * z - math.log(math.sqrt(2 * math.pi) * sd)
    return tau + np.logaddexp(special.log_ndtr(-z), log_extra)


def wrap_probability_bound(
    *,
    bits: int,
    padded_dim: int,
    num_parties: int,
    party_signal_norm: float,
    flatness: float,
    noise: str,
    party_noise: float,
    shift_per_party: float = 0.0,
    rounding_beta: float | None = None,
    max_rounding_tries: int = 1,
    units_per_party: int = 1,
) -> float:
    """Upper bound on ``P(some coordinate of the decoded sum wraps)`` in one round.

    Args:
      bits: the modulus is ``2^bits``.
      padded_dim: ``D``, the rotated dimension.
      num_parties: ``n``, the most parties whose inputs can arrive.
      party_signal_norm: ``c``, bound on each party's scaled vector's L2 norm
        (integer units, before rounding).
      flatness: of the rotation (1 Hadamard, 2 DFT).
      noise: ``"skellam"`` (``party_noise`` = its ``mu``) or ``"ddgauss"``
        (``party_noise`` = its ``sigma``), per party.
      shift_per_party: bound on each party's per-coordinate float error.
      rounding_beta: conditional rounding's ``beta`` (None: plain rounding).
      max_rounding_tries: conditional rounding's retry cap.
      units_per_party: how many units (each of norm ``<= c``, rounded on its own) a
        party may hold: a user-level round with more users than slots. The signal,
        rounding, shift and conditioning terms are those of ``n * units_per_party``
        parties; the noise is still ``n`` parties'.

    Returns:
      The bound, capped at 1 (see the module docstring for the derivation).
    """
    n, r, size = num_parties, 2.0 ** (bits - 1), padded_dim
    if noise == "skellam":
        total, tau = n * party_noise, 0.0
    else:
        total, tau = n * party_noise**2, ddg_tau(party_noise, n)
    noise_sd = math.sqrt(total)
    units = n * units_per_party
    var_a = flatness * (units * party_signal_norm) ** 2 / size + units / 4
    shift = units * (shift_per_party + 2.0**-24)
    log_cond = -units * math.log1p(-rounding_beta) if rounding_beta else 0.0
    t0 = r / (total + var_a)
    k0 = t0 * total  # where sup_k P(N >= k) e^{tk} is attained near the optimal t
    k_a = max(1, math.floor(0.6 * k0 - 10 * noise_sd))
    k_b = math.ceil(1.3 * k0 + 14 * noise_sd + 10)
    window = None
    if noise_sd <= _MAX_WINDOW_STD and k_b - k_a <= _MAX_WINDOW:
        ks = np.arange(k_a, k_b + 1, dtype=np.float64)
        log_tail = _log_tail_window(noise, total, tau, ks)
        # scipy's ive(k, mu) is NaN for mu >= 2^30 (scipy 1.x; a Skellam sum's variance
        # at 18 bits and 128 parties is past it). Python's max() skips a NaN, which made
        # this bound ~1e-4 where the wrap probability was ~1: without an exact tail,
        # Chernoff alone.
        if not np.any(np.isnan(log_tail)):
            window = (ks, log_tail)

    def log_h(t: float) -> float:
        if window is None:
            return -t * r + max(0.0, _log_mgf_noise(noise, total, t))
        ks, log_tail = window
        inside = float(np.max(log_tail + t * ks))
        # k < k_a: P(N >= k) e^{tk} <= E e^{t'N} e^{(t - t')(k_a - 1)} for t' in [0, t];
        # k > k_b: <= E e^{t'N} e^{-(t' - t)(k_b + 1)} for t' > t. Any such t' is valid.
        fractions = _CHERNOFF_GRID
        below = min(
            _log_mgf_noise(noise, total, t * f) + t * (1 - f) * (k_a - 1) for f in fractions
        )
        above = min(_log_mgf_noise(noise, total, t / f) - t * (1 / f - 1) * (k_b + 1)
                    for f in fractions[1:])  # fmt: skip
        return -t * r + max(0.0, below, inside, above)

    def objective(log_t: float) -> float:
        t = math.exp(log_t)
        return log_h(t) + t * shift + t * t * var_a / 2 + log_cond

    # Any t > 0 gives a valid bound; t <= 20 keeps cosh finite (beyond, the bound is ~e^{-20 r}).
    t_high = min(50 * t0, _MAX_T)
    t_low = min(t0, _MAX_T) / 1000
    best = optimize.minimize_scalar(
        objective, bounds=(math.log(t_low), math.log(t_high)), method="bounded",
        options={"xatol": 1e-6},
    )  # fmt: skip
    log_bound = math.log(2 * size) + min(best.fun, objective(math.log(min(t0, t_high))))
    failures = units * rounding_beta**max_rounding_tries if rounding_beta else 0.0
    return min(1.0, math.exp(min(log_bound, 0.0)) + failures)

"""Rényi-DP accounting for distributed discrete noise, and Poisson subsampling of any mechanism.

dp-accounting has no event for the Skellam or the distributed discrete Gaussian
mechanism, and it subsamples only Gaussian events. This module gives their RDP
curves from the papers' bounds, subsamples any RDP curve with the general bound
of Zhu & Wang (2019), or, for additive symmetric noise like theirs, with the
binomial expansion that is exact for the Gaussian (the remove direction never
exceeds the add direction when the privacy loss is symmetric:
:func:`symmetric_loss_lemma_terms`), composes by adding curves, and converts to
(epsilon, delta).

One DP-SGD step with distributed noise, as the accountant sees it::

    parties encode their clipped sums as integer vectors (scale, rotate, round)
    each of n honest parties adds noise:  Sk(mu_i) or N_Z(0, sigma^2) per coordinate
    only the sum is decoded: sum of inputs + (sum of the parties' noise)
    one example added or removed moves the integer sum by at most
        l2_sensitivity (L2) and l1_sensitivity (L1), in integer units
    Poisson sampling at rate q picks each example; T steps compose

Everything is in integer units (after scaling), under the add/remove-one
relation that Poisson subsampling needs. All orders are integers >= 2: the
subsampling bound is proven for integer orders only.

Sources:

- Skellam: Agarwal, Kairouz, Liu (NeurIPS 2021), "The Skellam Mechanism for
  Differentially Private Federated Learning", arXiv:2110.04995, Theorem 3.5 (the
  multi-dimensional Skellam mechanism's RDP from its L1 and L2 sensitivities).
- Distributed discrete Gaussian: Kairouz, Liu, Steinke (ICML 2021), "The
  Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
  Aggregation", arXiv:2102.06387, Theorem 1 (the tau term of a sum of discrete
  Gaussians) and Proposition 14 (the RDP bound with both sensitivities).
- Subsampling: Zhu, Wang (ICML 2019), "Poisson Subsampled Rényi Differential
  Privacy", Theorem 5 (general upper bound, integer orders >= 2); for
  symmetric losses the add-direction expansion of Mironov, Talwar, Zhang (2019),
  "Rényi Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3, with
  the lemma proven in :func:`symmetric_loss_lemma_terms`.
- Conversion: Canonne, Kamath, Steinke (2020), Proposition 12; Balle et al.
  (2020), arXiv:2001.05990, Eq. 20; through dp-accounting's ``rdp.compute_epsilon``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence

import numpy as np
from dp_accounting import rdp as dp_rdp
from scipy import special

import dpjax._validate as _validate

# Integer counterpart of dp-accounting's RdpAccountant grid (which adds fractional
# orders 1.1..10.9 that the subsampling bound does not cover). The optimum moves
# to high orders only for small epsilon: ~log(1/delta)/epsilon.
DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 64)) + (64, 80, 96, 128, 192, 256, 512, 1024)

# The sum-of-discrete-Gaussians bound (Kairouz et al. 2021, Theorem 1) assumes sigma >= 1/2.
DDGAUSS_MIN_SIGMA = 0.5
MAX_PARTY_NOISE = 1e30
# The subsampling bound sums over every integer order up to the largest asked for.
MAX_ORDER = 4096


class DiscreteNoise(enum.StrEnum):
    """The per-party noise of distributed DP; closed, because each has its own proof.

    Every member must be symmetric, full-support additive noise: :func:`step_rdp`
    subsamples it with ``symmetric_loss=True`` (no factor 3), which needs that."""

    SKELLAM = "skellam"
    DDGAUSS = "ddgauss"


def _orders(orders: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(orders)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise ValueError(f"Expected orders={orders!r} to be a non-empty 1-D sequence of numbers.")
    bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)) & (arr >= 2) & (arr <= MAX_ORDER))]
    if bad.size:
        raise ValueError(
            f"Expected orders={bad.tolist()!r} to be integers from 2 to {MAX_ORDER}: the "
            "subsampling, Skellam and discrete-Gaussian bounds used here are proven for "
            "integer orders."
        )
    return arr.astype(np.int64)


def _sensitivities(l1_sensitivity: float, l2_sensitivity: float) -> None:
    _validate.non_negative("l1_sensitivity", l1_sensitivity)
    _validate.non_negative("l2_sensitivity", l2_sensitivity)


def skellam_rdp(
    orders: Sequence[int] | np.ndarray,
    *,
    mu: float,
    l1_sensitivity: float,
    l2_sensitivity: float,
) -> np.ndarray:
    """RDP epsilons at ``orders`` of adding Skellam noise ``Sk(mu)`` to each coordinate.

    ``Sk(mu) = Poisson(mu/2) - Poisson(mu/2)`` has variance ``mu`` and pmf
    ``exp(-mu) I_k(mu)`` (the paper's ``Sk_{0,mu}``); independent ``Sk(mu_i)``
    sum to ``Sk(sum mu_i)``, so ``mu`` is the total variance per coordinate of
    the noise of the honest parties. Guarantee (Agarwal et al. 2021, Theorem
    3.5): for an integer-valued query whose neighbouring values differ by at
    most ``D1 = l1_sensitivity`` in L1 and ``D2 = l2_sensitivity`` in L2, at
    every integer order ``a >= 2`` the mechanism is ``(a, eps(a))``-RDP with
    ``eps(a) = a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))``.
    The first term is the Gaussian mechanism's with the same variance.
    """
    a = _orders(orders).astype(np.float64)
    _validate.positive("mu", mu)
    _sensitivities(l1_sensitivity, l2_sensitivity)
    d1, d2sq = float(l1_sensitivity), float(l2_sensitivity) ** 2
    extra = np.minimum(((2 * a - 1) * d2sq + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu))
    return a * d2sq / (2 * mu) + extra


def ddgauss_tau(sigma: float, num_parties: int) -> float:
    """``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))`` (Kairouz et al., Theorem 1).

    How far the sum of ``n`` independent ``N_Z(0, sigma^2)`` is from one
    discrete Gaussian ``N_Z(0, n sigma^2)``: 0 for one party.
    """
    _validate.positive("sigma", sigma)
    _validate.positive_int("num_parties", num_parties)
    k = np.arange(1, num_parties, dtype=np.float64)
    return float(10 * np.sum(np.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1))))


def ddgauss_rdp(
    orders: Sequence[int] | np.ndarray,
    *,
    sigma: float,
    num_parties: int,
    l1_sensitivity: float,
    l2_sensitivity: float,
    dim: int,
) -> np.ndarray:
    """RDP epsilons at ``orders`` of the sum of ``num_parties`` discrete Gaussians per coordinate.

    Each of ``n = num_parties`` honest parties adds ``N_Z(0, sigma^2)``
    (pmf proportional to ``exp(-x^2 / (2 sigma^2))`` on the integers) to each of
    the ``dim`` coordinates. The sum is not a discrete Gaussian; ``tau =
    ddgauss_tau(sigma, n)`` pays for that. Guarantee (Kairouz et al. 2021,
    Proposition 14 with Theorem 1's tau; needs ``sigma >= 1/2`` when ``n >= 2``):
    for an integer-valued query whose neighbouring values differ by at most
    ``D1 = l1_sensitivity`` in L1 and ``D2 = l2_sensitivity`` in L2, with
    ``s = sqrt(n) sigma`` and ``d = dim``, at every integer order ``a >= 2`` the
    mechanism is ``(a, eps(a))``-RDP with ``eps(a) = min(a D2^2 / (2 s^2) + tau d,
    a/2 (D2^2 / s^2 + 2 D1 tau / s + tau^2 d), a/2 (D2 / s + tau sqrt(d))^2)``.
    With one party (``tau = 0``) this is the discrete Gaussian's ``a D2^2 / (2 sigma^2)``.
    """
    a = _orders(orders).astype(np.float64)
    _validate.positive("sigma", sigma)
    _validate.positive_int("num_parties", num_parties)
    _validate.positive_int("dim", dim)
    _sensitivities(l1_sensitivity, l2_sensitivity)
    if num_parties >= 2 and sigma < DDGAUSS_MIN_SIGMA:
        raise ValueError(
            f"Expected sigma={sigma} >= {DDGAUSS_MIN_SIGMA} with num_parties={num_parties}: "
            "the bound on a sum of discrete Gaussians (Kairouz et al. 2021) assumes it."
        )
    tau = ddgauss_tau(sigma, num_parties)
    s = math.sqrt(num_parties) * sigma
    d1, d2 = float(l1_sensitivity), float(l2_sensitivity)
    near_gaussian = a * d2**2 / (2 * s**2) + tau * dim
    l1_form = a / 2 * (d2**2 / s**2 + 2 * d1 * tau / s + tau**2 * dim)
    l2_form = a / 2 * (d2 / s + tau * math.sqrt(dim)) ** 2
    return np.minimum(np.minimum(near_gaussian, l1_form), l2_form)


def subsampled_rdp(
    orders: Sequence[int] | np.ndarray,
    base_rdp_fn: Callable[[np.ndarray], np.ndarray],
    sample_rate: float,
    *,
    symmetric_loss: bool = False,
) -> np.ndarray:
    """RDP epsilons at integer ``orders`` of a mechanism run on a Poisson sample of rate ``q``.

    ``base_rdp_fn(orders) -> rdp`` (vectorized, integer orders) is the base
    mechanism's RDP curve: at each integer ``l`` from 2 to ``max(orders)`` it must
    bound the Rényi divergence of order ``l`` between its outputs on any two
    datasets that differ by adding or removing one element, in both directions.
    Guarantee (Zhu & Wang 2019, Theorem 5, general upper bound; no other
    assumption on the mechanism): with ``e(l) = base_rdp_fn(l)``, at integer ``a >= 2``
    the subsampled mechanism is ``(a, eps(a))``-RDP, ``eps(a) = min(e(a), 1/(a-1) log(
    (1-q)^(a-1) (1 + (a-1) q) + C(a,2) q^2 (1-q)^(a-2) e^{e(2)}
    + 3 sum_{l=3}^{a} C(a,l) q^l (1-q)^(a-l) e^{(l-1) e(l)}))``;
    the ``min`` holds because subsampling never increases a Rényi divergence
    (quasi-convexity). At ``q = 1`` it is ``e(a)``. Computed in log space.

    ``symmetric_loss=True`` drops the factor 3: ``eps(a) = min(e(a), 1/(a-1) log(
    (1-q)^(a-1) (1 + (a-1) q) + sum_{l=2}^{a} C(a,l) q^l (1-q)^(a-l) e^{(l-1) e(l)}))``,
    the exact sampled-Gaussian formula when ``e`` is the Gaussian's. Only for
    mechanisms whose every neighbouring pair ``(P, Q)`` (``P`` without the
    element, ``Q`` with it, everything else fixed) has full support and a
    *symmetric privacy loss*: some invertible map of the outputs carries ``P``
    to ``Q`` and ``Q`` to ``P``. Additive noise ``N`` with ``N ~ -N`` and full
    support qualifies: ``P = s + N``, ``Q = s + v + N``, and ``y -> 2s + v - y``
    swaps them (so do Skellam and sums of discrete Gaussians, also modulo
    ``2^bits``). Proof (see :func:`symmetric_loss_lemma_terms` for the checked
    inequality): the add direction ``D_a((1-q)P + qQ || P)`` equals ``1/(a-1)
    log sum_l C(a,l) (1-q)^(a-l) q^l E_P[(Q/P)^l]`` at integer ``a`` (binomial
    expansion; ``E_P[(Q/P)^l] = e^{(l-1) D_l(Q||P)}``); the remove direction
    ``D_a(P || (1-q)P + qQ)`` is never larger when the loss is symmetric.
    """
    a = _orders(orders)
    _validate.sample_rate("sample_rate", sample_rate)
    q = float(sample_rate)
    ells = np.arange(2, int(a.max()) + 1)
    base = np.asarray(base_rdp_fn(ells), dtype=np.float64)
    if base.shape != ells.shape or np.isnan(base).any() or (base < 0).any():
        raise ValueError(
            f"Expected base_rdp_fn to return {ells.size} RDP values >= 0 (inf allowed) for "
            f"orders 2..{int(a.max())}; got {base!r}."
        )
    base_at_a = base[a - 2]
    if q == 1.0:
        return base_at_a.copy()
    af = a[:, None].astype(np.float64)
    lf = ells[None, :].astype(np.float64)
    inside = lf <= af
    rest = np.where(inside, af - lf, 0.0)
    log1mq, logq = math.log1p(-q), math.log(q)
    log_comb = special.gammaln(af + 1) - special.gammaln(lf + 1) - special.gammaln(rest + 1)
    log_three = np.where((lf >= 3) & (not symmetric_loss), math.log(3.0), 0.0)
    terms = log_three + log_comb + lf * logq + rest * log1mq + (lf - 1) * base[None, :]
    terms = np.where(inside, terms, -np.inf)
    first = (a - 1) * log1mq + np.log1p((a - 1) * q)
    log_sum = special.logsumexp(np.concatenate([first[:, None], terms], axis=1), axis=1)
    bound = np.maximum(log_sum, 0.0) / (a - 1)
    return np.minimum(bound, base_at_a)


def symmetric_loss_lemma_terms(ratio, sample_rate: float, order: float) -> np.ndarray:
    """Add-minus-remove moment gap of one symmetric pair of loss values; ``>= 0`` is the lemma.

    Lemma (used by ``subsampled_rdp(..., symmetric_loss=True)``): let ``L =
    log(dQ/dP)`` have a law ``m`` under ``P`` that is symmetric in the sense
    ``m(-dl) = e^l m(dl)`` (true when an invertible map swaps ``P`` and ``Q``).
    Then for real ``a >= 1`` and ``q`` in [0, 1],
    ``D_a(P || (1-q)P + qQ) <= D_a((1-q)P + qQ || P)``.

    Proof. With ``M = (1-q)P + qQ`` and ``z(l) = 1 - q + q e^l``, the two
    exponentiated divergences are ``A = int z^a dm`` (add) and ``B = int z^(1-a)
    dm`` (remove). Pairing ``l > 0`` with ``-l`` (mass ``x = e^l`` times as
    large), ``A - B = int_{l>0} G(e^l) dm(l)`` with ``G(x) = u^a + x w^a - u^(1-a)
    - x w^(1-a)``, ``u = 1 - q + q x``, ``w = 1 - q + q/x``. Write ``a = 1/2 + s``,
    ``alpha = log u``, ``beta = -log w``: ``G(x) = 2 (sqrt(u) sinh(s alpha) - x
    sqrt(w) sinh(s beta))``. ``u w = 1 + q(1-q)(x + 1/x - 2) >= 1`` gives
    ``alpha >= beta >= 0``; at ``s = 1/2`` the bracket is ``(u - 1) - x (1 - w)
    = 0``; and ``sinh(s alpha) / sinh(s beta)`` is nondecreasing in ``s`` (its
    log-derivative is ``(g(s alpha) - g(s beta)) / s`` with ``g(t) = t coth t``
    increasing), so for ``s >= 1/2`` the bracket is ``>= 0``. QED. (For the
    Gaussian this is Mironov, Talwar, Zhang 2019, Sec. 3.3.)

    Returns ``G(ratio)`` for ``ratio >= 1`` (vectorized): the quantity the
    tests check to be ``>= 0`` on a grid, next to direct summations.
    """
    x = np.asarray(ratio, dtype=np.float64)
    q, a = float(sample_rate), float(order)
    u, w = 1 - q + q * x, 1 - q + q / x
    return u**a + x * w**a - u ** (1 - a) - x * w ** (1 - a)


def rdp_to_epsilon(
    orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray, delta: float
) -> float:
    """The smallest epsilon over ``orders`` such that the RDP curve ``rdp`` is (epsilon, delta)-DP.

    Uses dp-accounting's public ``dp_accounting.rdp.compute_epsilon``: per order
    ``a``, ``eps = rdp + log((a-1)/a) - (log delta + log a) / (a-1)`` (Canonne,
    Kamath, Steinke 2020, Proposition 12; Balle et al. 2020), and ``eps = 0``
    when ``rdp`` is so small that ``delta`` alone covers it.
    """
    arr = np.asarray(orders, dtype=np.float64)
    values = np.asarray(rdp, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or values.shape != arr.shape:
        raise ValueError(
            f"Expected orders and rdp of the same non-empty 1-D shape; got {arr.shape} "
            f"and {values.shape}."
        )
    if not (np.isfinite(arr) & (arr > 1)).all():
        raise ValueError(f"Expected orders={arr.tolist()!r} to be finite and > 1.")
    if np.isnan(values).any() or (values < 0).any():
        raise ValueError(f"Expected rdp={values.tolist()!r} to be >= 0 (inf allowed).")
    _validate.delta("delta", delta)
    eps, _ = dp_rdp.compute_epsilon(arr, values, delta)
    return float(eps)


def _noise_kind(noise: DiscreteNoise | str) -> DiscreteNoise:
    _validate.one_of("noise", str(noise), tuple(n.value for n in DiscreteNoise))
    return DiscreteNoise(str(noise))


def _base_fn(noise, party_noise, num_parties, l1_sensitivity, l2_sensitivity, dim):
    if noise is DiscreteNoise.SKELLAM:
        total_mu = num_parties * party_noise
        return lambda o: skellam_rdp(
            o, mu=total_mu, l1_sensitivity=l1_sensitivity, l2_sensitivity=l2_sensitivity
        )
    return lambda o: ddgauss_rdp(
        o,
        sigma=party_noise,
        num_parties=num_parties,
        l1_sensitivity=l1_sensitivity,
        l2_sensitivity=l2_sensitivity,
        dim=dim,
    )


def _check_step(noise, party_noise, sample_rate, num_parties, l1, l2, dim, orders):
    kind = _noise_kind(noise)
    _validate.positive("party_noise", party_noise)
    _validate.sample_rate("sample_rate", sample_rate)
    _validate.positive_int("num_parties", num_parties)
    _validate.positive_int("dim", dim)
    _sensitivities(l1, l2)
    _orders(orders)
    return kind


def step_rdp(
    party_noise: float,
    sample_rate: float,
    *,
    noise: DiscreteNoise | str,
    num_parties: int,
    l1_sensitivity: float,
    l2_sensitivity: float,
    dim: int,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> np.ndarray:
    """RDP curve of one Poisson-subsampled step of distributed discrete noise, at ``orders``.

    ``party_noise`` is what each of the ``num_parties`` honest parties adds per
    coordinate: the Skellam variance ``mu`` (``noise="skellam"``; the sum is
    ``Sk(num_parties * mu)``) or the discrete Gaussian ``sigma``
    (``noise="ddgauss"``). Count only parties whose noise the adversary does not
    know: survivors of the round, minus colluders. Sensitivities are of the
    integer sum under adding or removing one example. T identical steps
    compose to ``T * step_rdp(...)``; different steps add their curves.
    """
    kind = _check_step(
        noise, party_noise, sample_rate, num_parties, l1_sensitivity, l2_sensitivity, dim, orders
    )
    base = _base_fn(kind, party_noise, num_parties, l1_sensitivity, l2_sensitivity, dim)
    # Symmetric loss: for fixed rounding uniforms, other examples and sampling, the two
    # neighbouring releases are s + N and s + v + N (mod 2^bits) with N the honest parties'
    # symmetric, full-support noise; y -> 2s + v - y swaps them.
    return subsampled_rdp(orders, base, sample_rate, symmetric_loss=True)


def epsilon(
    party_noise: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    noise: DiscreteNoise | str,
    num_parties: int,
    l1_sensitivity: float,
    l2_sensitivity: float,
    dim: int,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> float:
    """Epsilon at ``delta`` of ``steps`` Poisson-subsampled steps of distributed discrete noise.

    The steps' RDP curves add (composition), then :func:`rdp_to_epsilon`.
    Arguments as in :func:`step_rdp`.
    """
    _validate.delta("delta", delta)
    _validate.positive_int("steps", steps)
    curve = step_rdp(
        party_noise,
        sample_rate,
        noise=noise,
        num_parties=num_parties,
        l1_sensitivity=l1_sensitivity,
        l2_sensitivity=l2_sensitivity,
        dim=dim,
        orders=orders,
    )
    return rdp_to_epsilon(orders, steps * curve, delta)


def calibrate_party_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    noise: DiscreteNoise | str,
    num_parties: int,
    l1_sensitivity: float,
    l2_sensitivity: float,
    dim: int,
    orders: Sequence[int] = DEFAULT_ORDERS,
    rtol: float = 1e-3,
) -> float:
    """The smallest per-party noise (to ``rtol`` relative) whose :func:`epsilon` is <= target.

    Skellam: the variance ``mu`` each party adds; discrete Gaussian: each
    party's ``sigma``, never below 1/2 with two or more parties (the bound's
    assumption; if 1/2 already meets the target, 1/2 is returned). Bisection on
    a log scale, like ``accounting.calibrate_noise_multiplier``; the returned
    value always meets the target. Raises ``ValueError`` if even
    ``MAX_PARTY_NOISE`` does not.
    """
    _validate.positive("target_epsilon", target_epsilon)
    _validate.delta("delta", delta)
    _validate.positive_int("steps", steps)
    _validate.positive("rtol", rtol)
    _validate.positive("l2_sensitivity", l2_sensitivity)
    kind = _check_step(
        noise, 1.0, sample_rate, num_parties, l1_sensitivity, l2_sensitivity, dim, orders
    )
    floor = DDGAUSS_MIN_SIGMA if (kind is DiscreteNoise.DDGAUSS and num_parties >= 2) else 1e-6

    def eps(x):
        return epsilon(
            x,
            delta,
            sample_rate,
            steps,
            noise=kind,
            num_parties=num_parties,
            l1_sensitivity=l1_sensitivity,
            l2_sensitivity=l2_sensitivity,
            dim=dim,
            orders=orders,
        )

    hi = max(1.0, floor)
    while eps(hi) > target_epsilon:
        if hi >= MAX_PARTY_NOISE:
            raise ValueError(
                f"Expected target_epsilon={target_epsilon} to be reachable: even party "
                f"noise {MAX_PARTY_NOISE:g} gives epsilon={eps(hi):.4g} ({kind.value}, "
                f"delta={delta}, sample_rate={sample_rate}, steps={steps})."
            )
        hi = min(2 * hi, MAX_PARTY_NOISE)
    lo = hi / 2
    while lo > floor and eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
    if lo <= floor:
        if eps(floor) <= target_epsilon:
            return floor
        lo = floor
    while hi / lo - 1 > rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


__all__: Sequence[str] = (
    "DDGAUSS_MIN_SIGMA",
    "DEFAULT_ORDERS",
    "MAX_ORDER",
    "DiscreteNoise",
    "calibrate_party_noise",
    "ddgauss_rdp",
    "ddgauss_tau",
    "epsilon",
    "rdp_to_epsilon",
    "skellam_rdp",
    "step_rdp",
    "subsampled_rdp",
    "symmetric_loss_lemma_terms",
)

"""RDP accounting of distributed discrete noise against independent references.

References used here, none of them the module's own helpers: dp-accounting's
RdpAccountant (Gaussian), the closed-form RDP of the Poisson-sampled Gaussian at
integer orders (Mironov, Talwar, Zhang 2019, Sec. 3.3) written out as a loop,
and Rényi divergences summed directly over the pmfs (scipy.stats.skellam, a
normalized discrete Gaussian, and the convolution of two of them).
"""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp as dp_rdp
from scipy import special, stats

from dpjax import accounting, rdp

ORDERS = np.array(rdp.DEFAULT_ORDERS)
FEW_ORDERS = (2, 3, 4, 8, 16, 32)
# Float noise of the log-space sums (absolute ~1e-16 per term); a true bound may
# sit on the exact value (the one-party discrete Gaussian does, at integer orders).
FLOAT_RTOL = 1e-9


def _gaussian_curve(sigma):
    return lambda a: np.asarray(a, np.float64) / (2 * sigma**2)


def _sampled_gaussian_rdp(q, sigma, alpha):
    """Mironov et al. 2019: log(sum_k C(a,k) (1-q)^(a-k) q^k e^{(k^2-k)/(2 sigma^2)}) / (a-1)."""
    terms = [
        math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
        for k in range(alpha + 1)
    ]
    return special.logsumexp(terms) / (alpha - 1)


def _dp_accounting_epsilon(sigma, q, steps, delta, orders=None):
    acc = dp_rdp.RdpAccountant(orders=None if orders is None else list(orders))
    event = dp_accounting.GaussianDpEvent(sigma)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


def _renyi_of_shift(logp, shift, alpha):
    """D_alpha(P(. - shift) || P) by direct summation over the support of ``logp``.

    The support must be wide enough: the summands at its two ends must be 40
    nats below the largest (the sums decay faster than geometrically beyond).
    """
    v = alpha * logp[:-shift] + (1 - alpha) * logp[shift:]
    assert np.isfinite(v).all()
    assert max(v[0], v[-1]) < v.max() - 40, "support too narrow for this order and shift"
    return special.logsumexp(v) / (alpha - 1)


def _discrete_gaussian_logpmf(sigma, half_width):
    x = np.arange(-half_width, half_width + 1)
    w = -(x**2) / (2 * sigma**2)
    return w - special.logsumexp(w)


def _log_convolve(la, lb):
    """log of the pmf of X + Y from log pmfs on the same centered support."""
    n = la.size
    rows = np.arange(n)[:, None]
    grid = np.full((n, 2 * n - 1), -np.inf)
    grid[rows, rows + np.arange(n)[None, :]] = la[:, None] + lb[None, :]
    return special.logsumexp(grid, axis=0)


# --- Poisson subsampling: the general bound against the tight Gaussian one ---------------


@pytest.mark.parametrize(
    "sigma, q, steps, max_eps_ratio",
    [
        # observed epsilon ratios (general / dp-accounting): 1.166, 1.089, 1.000 (the optimum is
        # order 2, where the general bound has no order->=3 terms and equals the tight one),
        # 1.055, 2.302 (high noise: the factor 3 on the order->=3 terms dominates)
        (1.0, 0.01, 1000, 1.17),
        (1.1, 0.004, 10000, 1.09),
        (0.6, 0.02, 500, 1.001),
        (2.0, 0.001, 100000, 1.06),
        (5.0, 0.01, 1000, 2.31),
    ],
)
def test_subsampled_gaussian_is_above_the_tight_bound_and_close(sigma, q, steps, max_eps_ratio):
    general = rdp.subsampled_rdp(ORDERS, _gaussian_curve(sigma), q)
    tight = np.array([_sampled_gaussian_rdp(q, sigma, int(a)) for a in ORDERS])
    assert (general >= tight * (1 - FLOAT_RTOL)).all()
    assert (general <= ORDERS / (2 * sigma**2)).all()
    eps_general = rdp.rdp_to_epsilon(ORDERS, steps * general, 1e-5)
    eps_tight = _dp_accounting_epsilon(sigma, q, steps, 1e-5, ORDERS)
    assert eps_tight == pytest.approx(rdp.rdp_to_epsilon(ORDERS, steps * tight, 1e-5), rel=1e-9)
    assert eps_tight * (1 - FLOAT_RTOL) <= eps_general <= max_eps_ratio * eps_tight
    # also not below dp-accounting's own default grid (fractional orders included)
    assert eps_general >= _dp_accounting_epsilon(sigma, q, steps, 1e-5) * (1 - FLOAT_RTOL)


def test_subsampling_at_rate_one_is_the_base_curve_exactly():
    sigma = 1.3
    got = rdp.subsampled_rdp(ORDERS, _gaussian_curve(sigma), 1.0)
    np.testing.assert_array_equal(got, ORDERS / (2 * sigma**2))
    eps = rdp.rdp_to_epsilon(ORDERS, 20 * got, 1e-5)
    assert eps == pytest.approx(_dp_accounting_epsilon(sigma, 1.0, 20, 1e-5, ORDERS), rel=1e-12)


@pytest.mark.parametrize("q", [1e-4, 1e-3, 0.1, 0.5, 0.99])
@pytest.mark.parametrize("sigma", [0.7, 4.0])
def test_subsampled_bound_is_finite_and_valid_up_to_order_1024(q, sigma):
    orders = np.array([2, 3, 64, 128, 256, 512, 1024])
    got = rdp.subsampled_rdp(orders, _gaussian_curve(sigma), q)
    assert np.isfinite(got).all()
    tight = np.array([_sampled_gaussian_rdp(q, sigma, int(a)) for a in orders])
    assert (got >= tight * (1 - FLOAT_RTOL)).all()
    assert (got <= orders / (2 * sigma**2)).all()
    # more sampling never gives a smaller bound
    assert (rdp.subsampled_rdp(orders, _gaussian_curve(sigma), min(1.0, 2 * q)) >= got).all()


def test_subsampled_bound_passes_infinite_base_values_through():
    got = rdp.subsampled_rdp([2, 5], lambda a: np.where(a >= 4, np.inf, 0.1 * a), 0.01)
    assert np.isfinite(got[0]) and got[1] == np.inf


# --- Poisson subsampling of symmetric noise: the add direction bounds the remove one --------


def _subsampled_divergences(logp, logq, q, alpha):
    """Exact (add, remove) Rényi divergences of M = (1-q)P + qQ against P, by summation."""
    logm = np.logaddexp(math.log1p(-q) + logp, math.log(q) + logq)
    add = special.logsumexp(alpha * logm + (1 - alpha) * logp) / (alpha - 1)
    remove = special.logsumexp(alpha * logp + (1 - alpha) * logm) / (alpha - 1)
    return add, remove


def test_symmetric_loss_lemma_holds_on_a_grid_and_fails_without_symmetry():
    """The lemma's two-point gap G(x) >= 0 for x >= 1, q in (0, 1), orders 1..1024 (it is 0 at
    x = 1 and at order 1); then on 3000 random pairs on 7 points, symmetric ones (Q = P
    reversed) never have remove > add, while asymmetric ones do (so the assumption matters)."""
    for order in (1.0, 1.5, 2, 3, 7, 32, 1024):
        for q in (1e-4, 0.01, 0.1, 0.5, 0.9, 0.999):
            x = np.geomspace(1.0, 10 ** min(6.0, 250 / order), 400)
            scale = np.maximum.reduce([np.ones_like(x), (1 - q + q * x) ** order, x])
            assert (rdp.symmetric_loss_lemma_terms(x, q, order) / scale >= -1e-12).all()
    rng = np.random.default_rng(0)
    worst_symmetric, worst_asymmetric = -np.inf, -np.inf
    for _ in range(3000):
        logp = np.log(rng.dirichlet(np.full(7, 0.5)) + 1e-300)
        q, alpha = rng.uniform(0.01, 0.99), int(rng.integers(2, 9))
        add, remove = _subsampled_divergences(logp, logp[::-1], q, alpha)
        worst_symmetric = max(worst_symmetric, remove - add)
        other = np.log(rng.dirichlet(np.full(7, 0.5)) + 1e-300)
        add, remove = _subsampled_divergences(logp, other, q, alpha)
        worst_asymmetric = max(worst_asymmetric, remove - add)
    assert worst_symmetric <= 1e-9
    assert worst_asymmetric > 0.1


@pytest.mark.parametrize("sigma, q", [(0.7, 0.01), (1.0, 0.1), (4.0, 0.5), (2.0, 1e-3)])
def test_symmetric_subsampling_of_the_gaussian_is_the_exact_sampled_gaussian(sigma, q):
    got = rdp.subsampled_rdp(ORDERS, _gaussian_curve(sigma), q, symmetric_loss=True)
    exact = np.array([_sampled_gaussian_rdp(q, sigma, int(a)) for a in ORDERS])
    np.testing.assert_allclose(got, np.minimum(exact, ORDERS / (2 * sigma**2)), rtol=1e-9)
    general = rdp.subsampled_rdp(ORDERS, _gaussian_curve(sigma), q)
    assert (got <= general * (1 + FLOAT_RTOL)).all()
    # dp-accounting at the same integer orders: the same epsilon
    eps = rdp.rdp_to_epsilon(ORDERS, 100 * got, 1e-5)
    assert eps == pytest.approx(_dp_accounting_epsilon(sigma, q, 100, 1e-5, ORDERS), rel=1e-7)


@pytest.mark.parametrize("noise", ["skellam", "ddgauss"])
def test_subsampled_discrete_step_bounds_the_exact_subsampled_divergences(noise):
    """One Poisson-sampled step of Skellam (total variance 400) or the sum of two discrete
    Gaussians (sigma 1.5 each), shift 3, q 0.1 and 0.5: both exact directions, summed over the
    pmfs, stay below step_rdp at every order 2..16; observed step_rdp / max(add, remove) at
    most 1.0042 for Skellam (the paper's extra term; 1.35 at variance 40, order 16) and
    1.0000 for the two DGs."""
    shift, orders = 3, np.array([2, 3, 4, 6, 8, 12, 16])
    if noise == "skellam":
        logp, party_noise, parties = _skellam_logpmf(400.0, 800), 200.0, 2
    else:
        one = _discrete_gaussian_logpmf(1.5, 120)
        logp, party_noise, parties = _log_convolve(one, one), 1.5, 2
    assert math.exp(special.logsumexp(logp)) == pytest.approx(1.0, abs=1e-12)
    logq = np.concatenate([np.full(shift, -np.inf), logp[:-shift]])
    for q in (0.1, 0.5):
        exact = np.array([max(_subsampled_divergences(logp[shift:-shift], logq[shift:-shift],
                                                      q, int(a))) for a in orders])
        bound = rdp.step_rdp(party_noise, q, noise=noise, num_parties=parties,
                             l1_sensitivity=shift, l2_sensitivity=shift, dim=1, orders=orders)
        assert (bound >= exact * (1 - FLOAT_RTOL)).all()
        assert (bound <= 1.01 * exact).all()


# --- Skellam ------------------------------------------------------------------------------


def _skellam_logpmf(mu, half_width):
    """scipy's Skellam log pmf where it is accurate.

    scipy evaluates the pmf in linear space, so below ~1e-282 it loses digits
    and then underflows; the support is cut where log pmf < -650 (the divergence
    sums check that the cut-off tails do not matter).
    """
    with np.errstate(all="ignore"):
        logp = stats.skellam.logpmf(np.arange(-half_width, half_width + 1), mu / 2, mu / 2)
    return logp[np.isfinite(logp) & (logp > -650)]


@pytest.mark.parametrize("mu", [2.0, 10.0, 50.0, 500.0, 5000.0])
def test_skellam_rdp_bounds_the_exact_divergence(mu):
    logp = _skellam_logpmf(mu, int(150 + 40 * math.sqrt(mu)))
    assert math.exp(special.logsumexp(logp)) == pytest.approx(1.0, abs=1e-12)
    assert logp.size > 2 * 20 * math.sqrt(mu)
    for shift in (1, 2, 5):
        bound = rdp.skellam_rdp(FEW_ORDERS, mu=mu, l1_sensitivity=shift, l2_sensitivity=shift)
        exact = np.array([_renyi_of_shift(logp, shift, a) for a in FEW_ORDERS])
        assert (bound >= exact).all()
        if mu >= 500:
            # observed at most 1.0253 (mu=500, shift 5, order 32); 1.0004 at mu=5000
            assert (bound <= 1.03 * exact).all()


def test_skellam_rdp_of_a_vector_bounds_the_sum_over_coordinates():
    mu, shift = 30.0, np.array([1, 2, 0, 3, 1])
    logp = _skellam_logpmf(mu, 500)
    exact = [sum(_renyi_of_shift(logp, int(s), a) for s in shift if s) for a in FEW_ORDERS]
    bound = rdp.skellam_rdp(
        FEW_ORDERS, mu=mu, l1_sensitivity=np.abs(shift).sum(),
        l2_sensitivity=np.linalg.norm(shift),
    )
    assert (bound >= np.array(exact)).all()
    # observed 1.052 at order 2 up to 1.117 at order 8 (1.59 at order 32: mu = 30 is small)
    assert (bound[:4] <= 1.12 * np.array(exact[:4])).all()


# --- distributed discrete Gaussian --------------------------------------------------------


def test_ddgauss_tau_matches_the_formula():
    assert rdp.ddgauss_tau(1.0, 1) == 0.0
    assert rdp.ddgauss_tau(1.0, 2) == pytest.approx(10 * math.exp(-math.pi**2), rel=1e-12)
    want = 10 * (math.exp(-math.pi**2 * 0.36) + math.exp(-4 * math.pi**2 * 0.36 / 3))
    assert rdp.ddgauss_tau(0.6, 3) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_ddgauss_one_party_equals_the_discrete_gaussian_divergence(sigma):
    logp = _discrete_gaussian_logpmf(sigma, 400)
    for shift in (1, 2, 3):
        bound = rdp.ddgauss_rdp(
            FEW_ORDERS[:5], sigma=sigma, num_parties=1, l1_sensitivity=shift,
            l2_sensitivity=shift, dim=1,
        )
        exact = np.array([_renyi_of_shift(logp, shift, a) for a in FEW_ORDERS[:5]])
        # for integer orders and shifts the discrete Gaussian's divergence is exactly a D^2/(2 s^2)
        np.testing.assert_allclose(bound, exact, rtol=FLOAT_RTOL)


@pytest.mark.parametrize("sigma", [0.5, 0.6, 0.75, 1.0])
def test_ddgauss_two_parties_bounds_the_convolution(sigma):
    party = _discrete_gaussian_logpmf(sigma, 150)
    logp = _log_convolve(party, party)
    assert math.exp(special.logsumexp(logp)) == pytest.approx(1.0, abs=1e-12)
    for shift in (1, 2, 3):
        bound = rdp.ddgauss_rdp(
            FEW_ORDERS, sigma=sigma, num_parties=2, l1_sensitivity=shift,
            l2_sensitivity=shift, dim=1,
        )
        exact = np.array([_renyi_of_shift(logp, shift, a) for a in FEW_ORDERS])
        assert (bound >= exact * (1 - FLOAT_RTOL)).all()
        if sigma >= 0.75:
            # observed at most 1.044 (sigma 0.75, shift 1, order 2); 1.001 at sigma 1
            assert (bound <= 1.05 * exact).all()


@pytest.mark.parametrize("sigma", [0.6, 0.75])
def test_ddgauss_l1_form_bounds_a_sparse_shift_in_many_dimensions(sigma):
    """10 of d = 300 coordinates move by 1. With d >> L1 the L1 form (tau per unit of L1,
    tau^2 per coordinate) binds instead of the near-Gaussian form (tau per coordinate)."""
    dim, moved = 300, 10
    party = _discrete_gaussian_logpmf(sigma, 150)
    logp = _log_convolve(party, party)
    exact = moved * np.array([_renyi_of_shift(logp, 1, a) for a in FEW_ORDERS])
    bound = rdp.ddgauss_rdp(
        FEW_ORDERS, sigma=sigma, num_parties=2, l1_sensitivity=moved,
        l2_sensitivity=math.sqrt(moved), dim=dim,
    )
    tau, s = rdp.ddgauss_tau(sigma, 2), math.sqrt(2) * sigma
    near_gaussian = np.array(FEW_ORDERS) * moved / (2 * s**2) + tau * dim
    assert (bound[:3] < near_gaussian[:3]).all()
    assert (bound >= exact).all()
    if sigma == 0.75:
        # observed at most 1.133 (order 2)
        assert (bound[:5] <= 1.14 * exact[:5]).all()


# --- limits and realistic settings --------------------------------------------------------


def _discrete_epsilons(noise_multiplier, q, steps, delta, *, scale, dim, num_parties, clip=1.0):
    """Skellam and DDG epsilons with the Gaussian's noise (std z * scale * C in integer units)
    and the sensitivity of a clipped row after scaling and rounding: scale * C + sqrt(d)."""
    l2 = scale * clip + math.sqrt(dim)
    l1 = min(math.sqrt(dim) * l2, l2**2)
    std = noise_multiplier * scale * clip
    common = dict(num_parties=num_parties, l1_sensitivity=l1, l2_sensitivity=l2, dim=dim)
    skellam = rdp.epsilon(std**2 / num_parties, delta, q, steps, noise="skellam", **common)
    ddg = rdp.epsilon(std / math.sqrt(num_parties), delta, q, steps, noise="ddgauss", **common)
    return skellam, ddg


def test_discrete_epsilons_approach_the_gaussian_as_mu_grows():
    """Fixed noise multiplier z: variance (z * scale)^2 in integer units over 64 parties,
    sensitivity scale. At scale 4 each party's DDG sigma is 1/2 (tau = 6.9)."""
    z, steps, delta, parties = 1.0, 50, 1e-5, 64
    gaussian = _dp_accounting_epsilon(z, 1.0, steps, delta, ORDERS)
    gaps = {"skellam": [], "ddgauss": []}
    for scale in (2.0**2, 2.0**3, 2.0**6, 2.0**10, 2.0**14):
        common = dict(num_parties=parties, l1_sensitivity=scale, l2_sensitivity=scale, dim=1)
        party_noise = {"skellam": (z * scale) ** 2 / parties,
                       "ddgauss": z * scale / math.sqrt(parties)}
        for noise, gap in gaps.items():
            eps = rdp.epsilon(party_noise[noise], delta, 1.0, steps, noise=noise, **common)
            gap.append(eps / gaussian - 1)
    for gap in gaps.values():
        assert min(gap) >= -FLOAT_RTOL
        assert gap == sorted(gap, reverse=True)
        assert gap[0] > 1e-3 and gap[-1] < 1e-6


def test_realistic_dp_sgd_settings_against_the_gaussian(capsys):
    """sigma 1, q 0.01, T 1000, delta 1e-5, d 2^16, scale 2^14 (rounding adds 1.6% to the L2
    sensitivity), 10 parties. Observed: Gaussian 2.1014 (dp-accounting), 2.1774 (dp-accounting
    at the rounding-inflated sensitivity), 2.4503 (the Gaussian through Zhu & Wang's general
    subsampling bound), Skellam and DDG 2.2058: 5.0% above the Gaussian (the issue's target:
    10%), 1.3% above it at the same sensitivity (the mechanisms' own terms and integer-only
    orders); through the general bound they were 2.5477, 21% above."""
    z, q, steps, delta = 1.0, 0.01, 1000, 1e-5
    scale, dim = 2.0**14, 2**16
    tight = accounting.epsilon(z, q, steps, delta)
    same_sensitivity = accounting.epsilon(z * scale / (scale + math.sqrt(dim)), q, steps, delta)
    general = rdp.rdp_to_epsilon(
        ORDERS, steps * rdp.subsampled_rdp(ORDERS, _gaussian_curve(z), q), delta
    )
    sk, dg = _discrete_epsilons(z, q, steps, delta, scale=scale, dim=dim, num_parties=10)
    with capsys.disabled():
        print(f"\n  gaussian tight {tight:.4f}  at L2 {same_sensitivity:.4f}  gaussian general "
              f"{general:.4f}  skellam {sk:.4f}  ddgauss {dg:.4f}")
    assert tight <= general <= 1.17 * tight
    for discrete in (sk, dg):
        assert same_sensitivity <= discrete <= 1.02 * same_sensitivity
        assert discrete <= 1.10 * tight


# --- conversion, composition, calibration -------------------------------------------------


def test_rdp_to_epsilon_is_the_tight_conversion():
    orders = np.array([2, 3, 5, 10, 20, 40])
    curve = 0.05 * orders
    direct = min(
        r + math.log((a - 1) / a) - (math.log(1e-6) + math.log(a)) / (a - 1)
        for a, r in zip(orders, curve, strict=True)
    )
    assert rdp.rdp_to_epsilon(orders, curve, 1e-6) == pytest.approx(direct, rel=1e-12)
    # weaker than the classical conversion rdp - log(delta)/(a-1) at every order
    assert direct < min(r - math.log(1e-6) / (a - 1) for a, r in zip(orders, curve, strict=True))


@pytest.mark.parametrize("noise, party_noise", [("skellam", 200.0**2), ("ddgauss", 150.0)])
def test_epsilon_composes_steps_by_adding_rdp(noise, party_noise):
    kwargs = dict(noise=noise, num_parties=5, l1_sensitivity=600.0, l2_sensitivity=300.0, dim=1000)
    curve = rdp.step_rdp(party_noise, 0.02, **kwargs)
    got = rdp.epsilon(party_noise, 1e-5, 0.02, 300, **kwargs)
    assert got == pytest.approx(rdp.rdp_to_epsilon(ORDERS, 300 * curve, 1e-5), rel=1e-12)
    assert rdp.epsilon(party_noise, 1e-5, 0.02, 600, **kwargs) > got


@pytest.mark.parametrize("noise", ["skellam", "ddgauss"])
def test_calibration_round_trips(noise):
    target, delta, q, steps = 2.0, 1e-5, 0.01, 500
    kwargs = dict(noise=noise, num_parties=8, l1_sensitivity=288.0 * 32, l2_sensitivity=288.0,
                  dim=2**10)
    party_noise = rdp.calibrate_party_noise(target, delta, q, steps, **kwargs)
    eps = rdp.epsilon(party_noise, delta, q, steps, **kwargs)
    assert 0.99 * target <= eps <= target
    # the smallest to 0.1%: slightly less noise misses the target
    assert rdp.epsilon(party_noise / 1.003, delta, q, steps, **kwargs) > target


def test_calibration_respects_the_discrete_gaussian_sigma_floor_and_unreachable_targets():
    kwargs = dict(noise="ddgauss", num_parties=3, l1_sensitivity=1.0, l2_sensitivity=1.0, dim=1)
    assert rdp.calibrate_party_noise(50.0, 1e-5, 0.01, 10, **kwargs) == rdp.DDGAUSS_MIN_SIGMA
    huge = dict(kwargs, l1_sensitivity=1e28, l2_sensitivity=1e28)
    with pytest.raises(ValueError, match="target_epsilon=0.1 to be reachable"):
        rdp.calibrate_party_noise(0.1, 1e-5, 1.0, 10_000, **huge)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rdp.skellam_rdp([1, 2], mu=1.0, l1_sensitivity=1, l2_sensitivity=1),
         r"orders=\[1\] to be integers from 2 to 4096"),
        (lambda: rdp.subsampled_rdp([2, 10**6], _gaussian_curve(1.0), 0.1),
         r"orders=\[1000000\]"),
        (lambda: rdp.skellam_rdp([2.5], mu=1.0, l1_sensitivity=1, l2_sensitivity=1),
         r"orders=\[2.5\]"),
        (lambda: rdp.skellam_rdp([], mu=1.0, l1_sensitivity=1, l2_sensitivity=1),
         "non-empty"),
        (lambda: rdp.skellam_rdp([2], mu=0.0, l1_sensitivity=1, l2_sensitivity=1), "mu=0.0"),
        (lambda: rdp.skellam_rdp([2], mu=1.0, l1_sensitivity=-1, l2_sensitivity=1),
         "l1_sensitivity=-1"),
        (lambda: rdp.ddgauss_rdp([2], sigma=0.4, num_parties=2, l1_sensitivity=1,
                                 l2_sensitivity=1, dim=1), "sigma=0.4 >= 0.5"),
        (lambda: rdp.ddgauss_rdp([2], sigma=1.0, num_parties=0, l1_sensitivity=1,
                                 l2_sensitivity=1, dim=1), "num_parties=0"),
        (lambda: rdp.ddgauss_rdp([2], sigma=1.0, num_parties=2, l1_sensitivity=1,
                                 l2_sensitivity=float("nan"), dim=1), "l2_sensitivity=nan"),
        (lambda: rdp.ddgauss_rdp([2], sigma=1.0, num_parties=2, l1_sensitivity=1,
                                 l2_sensitivity=1, dim=0), "dim=0"),
        (lambda: rdp.subsampled_rdp([2], _gaussian_curve(1.0), 0.0),
         r"sample_rate=0.0 in \(0, 1\]"),
        (lambda: rdp.subsampled_rdp([2], _gaussian_curve(1.0), 1.5), "sample_rate=1.5"),
        (lambda: rdp.subsampled_rdp([2, 3], lambda a: np.array([1.0]), 0.1),
         "base_rdp_fn to return 2 RDP values"),
        (lambda: rdp.subsampled_rdp([2], lambda a: np.full(a.shape, np.nan), 0.1), "base_rdp_fn"),
        (lambda: rdp.rdp_to_epsilon([2, 3], [0.1], 1e-5), "same non-empty 1-D shape"),
        (lambda: rdp.rdp_to_epsilon([2], [-0.1], 1e-5), "to be >= 0"),
        (lambda: rdp.rdp_to_epsilon([1], [0.1], 1e-5), "finite and > 1"),
        (lambda: rdp.rdp_to_epsilon([2], [0.1], 1.0), r"delta=1.0 in \(0, 1\)"),
        (lambda: rdp.epsilon(1.0, 1e-5, 0.1, 10, noise="gaussian", num_parties=1,
                             l1_sensitivity=1, l2_sensitivity=1, dim=1), "noise='gaussian'"),
        (lambda: rdp.epsilon(1.0, 1e-5, 0.1, 0, noise="skellam", num_parties=1,
                             l1_sensitivity=1, l2_sensitivity=1, dim=1), "steps=0"),
        (lambda: rdp.calibrate_party_noise(1.0, 1e-5, 0.1, 10, noise="skellam", num_parties=1,
                                           l1_sensitivity=0, l2_sensitivity=0, dim=1),
         "l2_sensitivity=0"),
    ],
)
def test_bad_input_is_refused_with_an_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()

"""Discrete Gaussian, Skellam and Poisson samplers against scipy and directly normalized pmfs.

Discrete Gaussian and Skellam draws with a standard deviation up to 2^10 come from the alias
table (:mod:`dpjax.secagg.alias`), larger ones from the rejection samplers; the ``path``
parameter runs the goodness-of-fit tests through both (``rejection`` turns the alias table
off)."""

import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from scipy import stats

from dpjax.secagg import alias, discrete

N_DRAWS = 100_000  # every goodness-of-fit test below uses this many draws
# Eager calls share one compiled sampler per shape across noise levels (the scale is traced);
# test_samplers_run_under_jit checks the same code inside jit.
SIGNIFICANCE = 1e-3  # chi-square tests reject a correct sampler with probability 1e-3


@pytest.fixture
def rejection(monkeypatch):
    """Every discrete Gaussian and Skellam draw through the rejection samplers."""
    monkeypatch.setattr(alias, "ALIAS_MAX_STD", 0.0)


@pytest.fixture(params=["alias", "rejection"])
def path(request):
    if request.param == "rejection":
        request.getfixturevalue("rejection")
    return request.param


def _chi_square_pvalue(samples: np.ndarray, support: np.ndarray, pmf: np.ndarray) -> float:
    """Pearson chi-square p-value over bins of ``~std/4`` integers, sparse tails merged.

    Every bin expects >= 20 draws; ``support`` must carry all but ~1e-12 of the mass.
    """
    std = math.sqrt(float(np.sum(pmf * (support - np.sum(pmf * support)) ** 2)))
    width = max(1, int(std / 4))
    bins = (support - support[0]) // width
    expected = np.bincount(bins, weights=pmf) * len(samples)
    clipped = np.clip(samples, support[0], support[-1])
    observed = np.bincount((clipped - support[0]) // width, minlength=len(expected))
    dense = np.flatnonzero(expected >= 20)
    lo, hi = dense[0], dense[-1]
    exp = np.concatenate([[expected[: lo + 1].sum()], expected[lo + 1 : hi], [expected[hi:].sum()]])
    obs = np.concatenate([[observed[: lo + 1].sum()], observed[lo + 1 : hi], [observed[hi:].sum()]])
    chi2 = np.sum((obs - exp) ** 2 / exp)
    return float(stats.chi2.sf(chi2, df=len(exp) - 1))


def _dg_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Directly normalized ``N_Z(0, sigma^2)`` pmf over ``|y| <= 30 sigma + 10``."""
    half = int(30 * sigma) + 10
    support = np.arange(-half, half + 1)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma**2))
    return support, weights / weights.sum()


@pytest.mark.parametrize("sigma", [0.8, 5.0, 60.0, 1000.0])
def test_discrete_gaussian_fits_the_directly_normalized_pmf(sigma, path):
    draws, failed = discrete.discrete_gaussian(jax.random.key(11), (N_DRAWS,), sigma)
    assert draws.dtype == jnp.int32 and int(failed) == 0
    samples = np.asarray(draws, np.int64)
    support, pmf = _dg_pmf(sigma)
    assert _chi_square_pvalue(samples, support, pmf) > SIGNIFICANCE
    # Mean and variance within 4 standard errors of the pmf's.
    var = float(np.sum(pmf * support.astype(np.float64) ** 2))
    assert abs(samples.mean()) < 4 * math.sqrt(var / N_DRAWS)
    fourth = float(np.sum(pmf * support.astype(np.float64) ** 4))
    assert abs(samples.var() - var) < 4 * math.sqrt((fourth - var**2) / N_DRAWS)


@pytest.mark.parametrize("mu", [1.4, 30.0, 400.0, 2.0e5])  # rejection at 1.4, 30: Poisson inversion
def test_skellam_fits_scipy(mu, path):
    draws, failed = discrete.skellam(jax.random.key(12), (N_DRAWS,), mu)
    assert draws.dtype == jnp.int32 and int(failed) == 0
    samples = np.asarray(draws, np.int64)
    half = int(30 * math.sqrt(mu)) + 20
    support = np.arange(-half, half + 1)
    pmf = stats.skellam.pmf(support, mu / 2, mu / 2)
    assert _chi_square_pvalue(samples, support, pmf) > SIGNIFICANCE
    assert abs(samples.mean()) < 4 * math.sqrt(mu / N_DRAWS)
    # Var of the sample variance: (kurtosis excess 1/mu) -> (2 mu^2 + mu) / N.
    assert abs(samples.var() - mu) < 4 * math.sqrt((2 * mu**2 + mu) / N_DRAWS)


@pytest.mark.parametrize("lam", [0.05, 0.7, 2.5, 41.3, 1.0e6])  # < 16: inversion; else rejection
def test_poisson_fits_scipy(lam):
    # 2 N draws: the shape of the Poisson pair inside skellam(N), so the compile is shared.
    # 0.7 at this key was a strict xfail (chi-square p = 9e-4) before inversion replaced
    # rejection below lam = 16; 0.05 is the smallest lam whose bins {0}, {1}, {>= 2} all
    # expect >= 20 draws (~240 at >= 2).
    draws, failed = discrete.poisson(jax.random.key(13), (2 * N_DRAWS,), lam)
    assert int(failed) == 0
    samples = np.asarray(draws, np.int64)
    support = np.arange(
        max(0, int(lam - 30 * math.sqrt(lam)) - 20), int(lam + 30 * math.sqrt(lam)) + 20
    )
    assert _chi_square_pvalue(samples, support, stats.poisson.pmf(support, lam)) > SIGNIFICANCE


@pytest.mark.slow  # 8M draws, ~10 s
def test_poisson_at_small_lam_has_no_excess_mass_at_zero_over_8m_draws():
    # The old symptom: one 8M-draw call at lam = 0.7 left 13722 coordinates unsampled (the
    # rejection loop's fixed 4096-coordinate capacity) and returned them as 0: +4.1 standard
    # errors at 0, -3.4 at 1. Bound: each of P(0), P(1), P(2) within 4 standard errors.
    n, lam = 8_000_000, 0.7
    draws, failed = discrete.poisson(jax.random.key(13), (n,), lam)
    assert int(failed) == 0
    counts = np.bincount(np.asarray(draws), minlength=3)[:3]
    pmf = stats.poisson.pmf(np.arange(3), lam)
    z = (counts - n * pmf) / np.sqrt(n * pmf * (1 - pmf))
    np.testing.assert_array_less(np.abs(z), 4.0)


@pytest.mark.slow  # ~30 s: a 2^21 rejection sampler compile and run
def test_low_acceptance_rejection_sampler_leaves_no_coordinate_unsampled_at_2_to_21(rejection):
    # sigma = 0.3: acceptance 0.30 per candidate, so the staged candidates leave ~0.0043 * 2^21
    # ~ 9000 coordinates to the final loop; its old fixed 64 x 64 capacity left 5026 of them
    # unsampled (returned as 0). P(0) within 4 standard errors of the normalized pmf's.
    n, sigma = 2**21, 0.3
    draws, failed = discrete.discrete_gaussian(jax.random.key(5), (n,), sigma)
    assert int(failed) == 0
    support, pmf = _dg_pmf(sigma)
    p0 = float(pmf[support == 0][0])
    zeros = int(np.sum(np.asarray(draws) == 0))
    assert abs(zeros - n * p0) < 4 * math.sqrt(n * p0 * (1 - p0))


@pytest.mark.parametrize("lam", [1e-9, 1e-3, 0.7, 2.5, 15.99])
def test_poisson_inversion_table_matches_mpmath(lam):
    high, low = discrete.poisson_inversion_table(lam)
    thresholds = [int(h) << 32 | int(lo) for h, lo in zip(high, low, strict=True)]
    assert thresholds == sorted(thresholds)
    # Value j is drawn with probability (C_j - C_{j-1}) / 2^64; the last value, len(table),
    # with (2^64 - C_last) / 2^64.
    got = np.diff([0, *thresholds, 2**64]).astype(object)
    with mpmath.workdps(40):
        pmf = [mpmath.exp(-lam) * mpmath.mpf(lam) ** j / mpmath.factorial(j)
               for j in range(len(thresholds))]  # fmt: skip
        want = [*pmf, 1 - mpmath.fsum(pmf)]
        errors = [abs(mpmath.mpf(int(g)) / 2**64 - w) for g, w in zip(got, want, strict=True)]
    # Each C_k is within one unit of 2^64 P(X <= k): every probability within 2^-63.
    assert float(max(errors)) <= 2.0**-63
    assert float(mpmath.fsum(errors)) / 2 < 2.0**-56  # total variation per draw


@pytest.mark.parametrize("lam", [16.0, 41.3, 1.0e6, 2.0**38])
def test_poisson_rejection_acceptance_per_value_matches_mpmath(lam):
    # The sampler accepts candidate y with probability threshold(y) / 2^32; exactly it should be
    # p(center + y) e^{floor(|y| / t)} / M (M: the sampler's own envelope constant), <= 1.
    consts, _ = discrete.poisson_constants(lam)
    consts = discrete._Constants(*(jnp.asarray(c) for c in consts))
    center, t = math.floor(lam), int(consts.t)
    reach = int(12 * math.sqrt(lam)) + 5  # where acceptance is above ~2^-100
    # One length for every lam, so the eager ops compile once (repeated offsets are harmless).
    offsets = np.linspace(-min(reach, center), reach, 241).astype(np.int64)
    exponent = discrete._poisson_exponent(jnp.asarray(offsets, jnp.int32), consts)
    got = np.asarray(discrete._acceptance_threshold(exponent), np.float64) / 2**32
    with mpmath.workdps(30):
        log_m, log_lam = mpmath.mpf(float(consts.a)), mpmath.log(lam)
        want = np.array([
            float(mpmath.exp(-lam + (center + y) * log_lam - mpmath.loggamma(center + y + 1)
                             + abs(y) // t - log_m))
            for y in offsets.tolist()
        ])  # fmt: skip
    assert want.max() <= 1.0  # the envelope holds exactly, not only in float32
    # float32 log-pmf (absolute error ~1e-6) and the 2^-32 resolution: within 2^-19 absolute.
    np.testing.assert_array_less(np.abs(got - want), 2.0**-19)


@pytest.mark.parametrize("lam", [20.5, 1.0e4, 2.0**36])
def test_float32_poisson_log_pmf_matches_mpmath(lam):
    # scipy's float64 logpmf itself loses ~1e-4 at lam = 2^36; mpmath at 30 digits does not.
    consts, _ = discrete.poisson_constants(lam)
    consts = discrete._Constants(*(jnp.asarray(c) for c in consts))
    center = math.floor(lam)
    reach = int(12 * math.sqrt(lam))  # 12 standard deviations, where acceptance matters
    offsets = np.unique(np.linspace(-min(reach, center), reach, 121).astype(np.int64)).tolist()
    got = np.asarray(discrete._poisson_log_pmf(jnp.asarray(offsets, jnp.int32), consts))
    with mpmath.workdps(30):
        log_lam = mpmath.log(lam)
        want = np.array(
            [
                float(-lam + (center + y) * log_lam - mpmath.loggamma(center + y + 1))
                for y in offsets
            ]
        )
    offsets = np.asarray(offsets)
    # ~1e-6 relative: the pmf is exact to ~1e-5 even 12 standard deviations out.
    np.testing.assert_array_less(np.abs(got - want), 2e-6 * (10 + np.abs(want)))
    # The envelope holds in float32: every acceptance probability is <= 1 before clipping.
    assert np.max(got + np.abs(offsets) / float(consts.t)) <= float(consts.a)


def test_samplers_refuse_scales_beyond_exact_float32_integers():
    with pytest.raises(ValueError, match=r"2\^19"):
        discrete.discrete_gaussian(jax.random.key(0), (4,), 2.0**20)
    with pytest.raises(ValueError, match="sigma"):
        discrete.discrete_gaussian(jax.random.key(0), (4,), -1.0)
    with pytest.raises(ValueError, match=r"2\^19"):
        discrete.skellam(jax.random.key(0), (4,), 2.0**41)


def test_noise_depends_only_on_its_own_key():
    a1, _ = discrete.skellam(jax.random.key(1), (N_DRAWS,), 100.0)
    a2, _ = discrete.skellam(jax.random.key(1), (N_DRAWS,), 100.0)
    b, _ = discrete.skellam(jax.random.key(2), (N_DRAWS,), 100.0)
    np.testing.assert_array_equal(a1, a2)
    assert np.any(np.asarray(a1) != np.asarray(b))


@pytest.mark.slow  # two fresh compilations (~10 s idle)
def test_samplers_run_under_jit_and_return_integers(path):
    @jax.jit
    def draw(key):
        g, g_failed = discrete.discrete_gaussian(key, (3, 5), 2.5)
        s, s_failed = discrete.skellam(jax.random.fold_in(key, 1), (3, 5), 9.0)
        return g, s, g_failed + s_failed

    g, s, failed = draw(jax.random.key(3))
    assert g.shape == s.shape == (3, 5) and g.dtype == s.dtype == jnp.int32
    assert int(failed) == 0
    eager, _ = discrete.discrete_gaussian(jax.random.key(3), (3, 5), 2.5)
    np.testing.assert_array_equal(g, eager)

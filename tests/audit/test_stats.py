"""Audit statistics against independent computations, and their validity and sharpness.

Statistical tests run 200 fixed seeds and accept at most ``_LIMIT`` bounds above the
truth: the 99th percentile of Binomial(200, 0.05), so a procedure that is valid at
confidence 0.95 fails such a test with probability at most 1% (for a fixed seed set:
deterministically pass or fail).
"""

import math

import numpy as np
import pytest
from scipy import optimize, stats
from sklearn.metrics import roc_auc_score

from dpjax import audit
from dpjax.audit import _thresholds, gdp_epsilon

SEEDS = range(200)
_LIMIT = int(stats.binom.ppf(0.99, len(SEEDS), 0.05))  # 18


# ------------------------------------------------------------ references


def _cp_reference(k, n, alpha):
    """Clopper-Pearson upper bounds of counts k (scalar or array) of n, by scipy's beta.ppf."""
    k = np.asarray(k)
    return np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1)), 1.0)


def _dp_value(fpr_ub, fnr_ub, delta):
    values = [-math.inf]
    if 1 - delta - fnr_ub > 0:
        values.append(math.log((1 - delta - fnr_ub) / fpr_ub))
    if 1 - delta - fpr_ub > 0:
        values.append(math.log((1 - delta - fpr_ub) / fnr_ub))
    return max(values)


def _gdp_value(fpr_ub, fnr_ub):
    return stats.norm.ppf(1 - fpr_ub) - stats.norm.ppf(fnr_ub)


def _per_threshold(in_s, out_s, level, value):
    """Every distinct score (and +inf) as a threshold, counted in a Python loop: (t, value).

    ``value(fpr_ub, fnr_ub)`` takes the arrays of all thresholds' bounds at once.
    """
    thresholds = np.unique(np.concatenate([in_s, out_s, [np.inf]]))
    fp = np.array([np.sum(out_s >= t) for t in thresholds])
    fn = np.array([np.sum(in_s < t) for t in thresholds])
    fpr_ub, fnr_ub = _cp_reference(fp, out_s.size, level), _cp_reference(fn, in_s.size, level)
    return list(zip(thresholds, value(fpr_ub, fnr_ub), strict=True))


def _dp_values(delta):
    def values(fpr_ub, fnr_ub):
        return [_dp_value(a, b, delta) for a, b in zip(fpr_ub, fnr_ub, strict=True)]

    return values


def _correct_reference(scores, included, k_plus, k_minus):
    """Right guesses with ties broken against the auditor, by sorting with a tie key."""
    top = np.lexsort((included, -scores))[:k_plus]  # among ties, "out" canaries first
    bottom = np.lexsort((-included, scores))[:k_minus]  # among ties, "in" canaries first
    return int(included[top].sum() + (1 - included[bottom]).sum())


def _p_reference(m, r, v, eps, delta):
    """The one-run p-value summed term by term (the paper's Appendix D loop)."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    return min(beta + 2 * m * delta * alpha, 1.0)


# ----------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize("k, n", [(0, 1), (0, 50), (7, 50), (49, 50), (50, 50), (123, 20000)])
@pytest.mark.parametrize("alpha", [0.05, 1e-6])
def test_clopper_pearson_upper_matches_scipy(k, n, alpha):
    got = audit.clopper_pearson_upper(k, n, alpha)
    exact = stats.binomtest(k, n, alternative="less").proportion_ci(1 - alpha, method="exact")
    assert got == pytest.approx(exact.high, rel=1e-10)
    assert got == pytest.approx(_cp_reference(k, n, alpha), rel=1e-10)


def test_clopper_pearson_upper_is_vectorized_and_shaped():
    k = np.array([[0, 3], [9, 10]])
    got = audit.clopper_pearson_upper(k, 10, 0.05)
    assert got.shape == (2, 2)
    assert got[1, 1] == 1.0
    assert np.all(np.diff(got.reshape(-1)) > 0)


# ----------------------------------------- two worlds, against brute force


def _tied_pair(seed, n_in=300, n_out=260, shift=1.0, decimals=1):
    rng = np.random.default_rng(seed)
    in_s = np.round(rng.normal(shift, 1, n_in), decimals)
    out_s = np.round(rng.normal(0, 1, n_out), decimals)
    return in_s, out_s


@pytest.mark.parametrize("seed, decimals", [(0, 1), (1, 2), (2, 6)])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 0.05])
def test_bonferroni_clopper_pearson_is_the_max_over_every_threshold(seed, decimals, delta):
    in_s, out_s = _tied_pair(seed, decimals=decimals)
    level = 0.05 / (in_s.size + out_s.size)
    rows = _per_threshold(in_s, out_s, level, _dp_values(delta))
    expected = max(0.0, max(v for _, v in rows))
    got = audit.epsilon_lower_bound(
        in_s, out_s, delta=delta, method="clopper_pearson", selection="bonferroni"
    )
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert got > 0


@pytest.mark.parametrize("seed, decimals", [(0, 1), (3, 6)])
def test_bonferroni_gdp_is_the_max_over_every_threshold(seed, decimals):
    in_s, out_s = _tied_pair(seed, decimals=decimals)
    level = 0.05 / (in_s.size + out_s.size)
    expected = max(v for _, v in _per_threshold(in_s, out_s, level, _gdp_value))
    got = audit.gdp_mu_lower_bound(in_s, out_s, selection="bonferroni")
    assert got == pytest.approx(expected, rel=1e-9)
    assert audit.epsilon_lower_bound(
        in_s, out_s, delta=1e-5, method="gdp", selection="bonferroni"
    ) == pytest.approx(gdp_epsilon(expected, 1e-5), rel=1e-9)


@pytest.mark.parametrize("method", ["clopper_pearson", "gdp"])
def test_bonferroni_search_over_thousands_of_thresholds_is_exact(method):
    # Enough thresholds that U is bracketed on a grid and evaluated only where needed.
    in_s, out_s = _tied_pair(6, n_in=4000, n_out=3500, shift=1.0, decimals=8)
    assert _thresholds.threshold_counts(in_s, out_s)[0].size > _thresholds._EXACT_BELOW
    level = 0.05 / (in_s.size + out_s.size)
    if method == "gdp":
        expected = max(v for _, v in _per_threshold(in_s, out_s, level, _gdp_value))
        got = audit.gdp_mu_lower_bound(in_s, out_s, selection="bonferroni")
    else:
        expected = max(v for _, v in _per_threshold(in_s, out_s, level, _dp_values(1e-5)))
        got = audit.epsilon_lower_bound(
            in_s, out_s, delta=1e-5, method=method, selection="bonferroni"
        )
    assert got == pytest.approx(expected, rel=1e-9)


def _first_part_split(monkeypatch):
    """Replace the random holdout split by "the first fraction, then the rest"."""

    def split(scores, fraction, rng):
        k = int(scores.size * fraction)
        return scores[:k], scores[k:]

    monkeypatch.setattr(_thresholds, "split", split)


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_holdout_clopper_pearson_tests_the_selected_threshold_on_the_rest(monkeypatch, delta):
    _first_part_split(monkeypatch)
    in_s, out_s = _tied_pair(4, n_in=1000, n_out=900, shift=2.0, decimals=8)
    k_in, k_out = 200, 180  # holdout_fraction 0.2
    rows = _per_threshold(in_s[:k_in], out_s[:k_out], 0.025, _dp_values(delta))
    t = max(rows, key=lambda row: row[1])[0]
    fp, fn = int(np.sum(out_s[k_out:] >= t)), int(np.sum(in_s[k_in:] < t))
    fpr_ub = _cp_reference(fp, out_s.size - k_out, 0.025)
    fnr_ub = _cp_reference(fn, in_s.size - k_in, 0.025)
    got = audit.epsilon_lower_bound(in_s, out_s, delta=delta, method="clopper_pearson")
    assert got == pytest.approx(max(0.0, _dp_value(fpr_ub, fnr_ub, delta)), rel=1e-9)
    assert got > 1


def test_holdout_gdp_tests_the_equal_error_threshold_by_total_errors(monkeypatch):
    _first_part_split(monkeypatch)
    in_s, out_s = _tied_pair(5, n_in=1000, n_out=900, shift=1.0, decimals=8)
    select_in, select_out = in_s[:200], out_s[:180]
    values = np.unique(np.concatenate([select_in, select_out]))
    gaps = [abs(np.mean(select_out >= t) - np.mean(select_in < t)) for t in values]
    t = values[int(np.argmin(gaps))]
    n = 720  # equal evaluation sizes: min(800, 720)
    errors = int(np.sum(out_s[180:][:n] >= t) + np.sum(in_s[200:][:n] < t))
    rate_ub = max(_cp_reference(errors, 2 * n, 0.05), (errors + 1) / (2 * n))
    expected = -2 * stats.norm.ppf(rate_ub)
    assert audit.gdp_mu_lower_bound(in_s, out_s) == pytest.approx(expected, rel=1e-9)
    assert expected > 0.5


@pytest.mark.parametrize("n", [4, 15, 40])
def test_hoeffding_total_errors_are_dominated_by_one_binomial(n):
    # The holdout gdp bound treats FP + FN (two binomials of rates p and q) as
    # Binomial(2n, (p + q) / 2) in the lower tail up to 2n (p + q) / 2 - 1 (Hoeffding 1956,
    # Theorem 4). Checked exactly, by convolution, on a grid of rates.
    worst = -1.0
    for p in np.linspace(0.01, 0.99, 15):
        for q in np.linspace(0.01, 0.99, 15):
            pmf = np.convolve(
                stats.binom.pmf(np.arange(n + 1), n, p), stats.binom.pmf(np.arange(n + 1), n, q)
            )
            s = np.arange(2 * n + 1)
            covered = s <= n * (p + q) - 1
            if covered.any():
                excess = np.cumsum(pmf) - stats.binom.cdf(s, 2 * n, (p + q) / 2)
                worst = max(worst, float(np.max(excess[covered])))
    assert worst <= 1e-12


# -------------------------------------------------------------- one run


@pytest.mark.parametrize("r, v", [(1, 1), (10, 7), (60, 45), (500, 300), (5000, 2700)])
@pytest.mark.parametrize("eps", [0.0, 0.4, 1.5, 4.0])
def test_one_run_p_value_without_delta_is_the_binomial_tail(r, v, eps):
    q = 1 / (1 + math.exp(-eps))
    expected = stats.binom.sf(v - 1, r, q)
    assert audit.one_run_p_value(r, r, v, eps, 0.0) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("m, r, v", [(20, 10, 9), (60, 40, 31), (60, 60, 60), (200, 50, 12)])
@pytest.mark.parametrize("eps", [0.0, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_one_run_p_value_with_delta_is_the_papers_sum(m, r, v, eps, delta):
    expected = _p_reference(m, r, v, eps, delta)
    assert audit.one_run_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("delta", [0.0, 1e-4])
@pytest.mark.parametrize("pair", [(5, 5), (12, 0), (0, 9), (20, 20)])
def test_one_run_bound_counts_ties_adversely_and_inverts_the_p_value(delta, pair):
    rng = np.random.default_rng(7)
    m = 60
    included = (rng.random(m) < 0.5).astype(int)
    scores = np.round(included * 3 + rng.normal(size=m)).clip(-1, 4)  # 6 values: many ties
    v = _correct_reference(scores, included, *pair)
    got = audit.epsilon_lower_bound(
        scores[included == 1],
        scores[included == 0],
        delta=delta,
        method="one_run",
        k_grid=[pair],
    )
    # got is where the reference p-value crosses 0.05: rejected there, not 1e-6 above.
    assert got > 0
    assert _p_reference(m, sum(pair), v, got, delta) <= 0.05 * (1 + 1e-9)
    assert _p_reference(m, sum(pair), v, got + 1e-6, delta) > 0.05


def test_one_run_bound_without_delta_is_the_exact_tail_crossing():
    rng = np.random.default_rng(8)
    included = rng.random(2000) < 0.5
    scores = included * 2.0 + rng.normal(size=2000)
    got = audit.one_run_epsilon_lower_bound(scores, included, delta=0.0, k_grid=[300])
    v = _correct_reference(scores, included.astype(int), 300, 300)
    crossing = optimize.brentq(
        lambda e: stats.binom.sf(v - 1, 600, 1 / (1 + math.exp(-e))) - 0.05, 0.0, 30.0, xtol=1e-12
    )
    assert got == pytest.approx(crossing, rel=1e-9)


def test_one_run_grid_is_bonferroni_corrected():
    rng = np.random.default_rng(9)
    included = rng.random(1000) < 0.5
    scores = included * 3.0 + rng.normal(size=1000)
    grid = [10, 50, 100, 200]
    got = audit.one_run_epsilon_lower_bound(scores, included, delta=0.0, k_grid=grid)
    each = [
        audit.one_run_epsilon_lower_bound(
            scores, included, delta=0.0, k_grid=[k], confidence=1 - 0.05 / len(grid)
        )
        for k in grid
    ]
    assert got == pytest.approx(max(each), rel=1e-12)
    assert got < audit.one_run_epsilon_lower_bound(scores, included, delta=0.0, k_grid=[100])


def test_one_run_two_entry_points_agree():
    rng = np.random.default_rng(10)
    included = rng.random(3000) < 0.5
    scores = included * 1.0 + rng.normal(size=3000)
    from_arrays = audit.epsilon_lower_bound(
        scores[included], scores[~included], delta=1e-5, method="one_run"
    )
    from_bits = audit.one_run_epsilon_lower_bound(scores, included, delta=1e-5)
    assert from_arrays == from_bits > 0.5


# ------------------------------------------------------------ ROC summaries


@pytest.mark.parametrize("seed", range(5))
def test_tpr_at_fpr_and_auc_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    in_s = np.round(rng.normal(0.8, 1, 37), 1)
    out_s = np.round(rng.normal(0, 1, 41), 1)
    thresholds = np.unique(np.concatenate([in_s, out_s, [np.inf]]))
    for fpr in (0.0, 0.05, 0.1, 0.29, 0.5, 1.0):
        allowed = [np.mean(in_s >= t) for t in thresholds if np.mean(out_s >= t) <= fpr]
        assert audit.tpr_at_fpr(in_s, out_s, fpr) == pytest.approx(max(allowed), abs=1e-15)
    pairs = (in_s[:, None] > out_s[None, :]) + 0.5 * (in_s[:, None] == out_s[None, :])
    assert audit.auc(in_s, out_s) == pytest.approx(pairs.mean(), rel=1e-12)
    labels = np.concatenate([np.ones(in_s.size), np.zeros(out_s.size)])
    assert audit.auc(in_s, out_s) == pytest.approx(
        roc_auc_score(labels, np.concatenate([in_s, out_s])), rel=1e-12
    )


# ----------------------------------------------------- validity over seeds


def _gauss_pair(seed, mu, n):
    rng = np.random.default_rng(seed)
    return rng.normal(mu, 1, n), rng.normal(0, 1, n)


@pytest.mark.parametrize("selection", ["bonferroni", "holdout"])
def test_two_world_bounds_stay_below_the_truth(selection):
    # 500 releases per world of N(mu, 1) vs N(0, 1) (true epsilon: exact GDP) and of
    # Laplace(1, 1/eps0) vs Laplace(0, 1/eps0) (pure eps0-DP).
    mu, delta, eps0 = 1.5, 1e-5, 2.0
    true_gauss = gdp_epsilon(mu, delta)
    above = {"cp_gauss": 0, "gdp_mu": 0, "cp_laplace": 0}
    for seed in SEEDS:
        in_s, out_s = _gauss_pair(seed, mu, 500)
        kw = {"selection": selection, "seed": seed}
        above["cp_gauss"] += (
            audit.epsilon_lower_bound(in_s, out_s, delta=delta, method="clopper_pearson", **kw)
            > true_gauss
        )
        above["gdp_mu"] += audit.gdp_mu_lower_bound(in_s, out_s, **kw) > mu
        rng = np.random.default_rng(10_000 + seed)
        lap_in, lap_out = rng.laplace(1, 1 / eps0, 500), rng.laplace(0, 1 / eps0, 500)
        above["cp_laplace"] += (
            audit.epsilon_lower_bound(lap_in, lap_out, delta=0.0, method="clopper_pearson", **kw)
            > eps0
        )
    assert max(above.values()) <= _LIMIT, above


def test_one_run_bounds_stay_below_the_truth():
    # m = 1000 canaries, each included with probability 1/2, per-canary mechanisms:
    # noise independent of inclusion (eps = 0); randomized response (eps = 1), where the
    # single pair guessing every canary by its response makes the test exact; Laplace
    # (eps = 2); Gaussian (mu = 2, exact GDP epsilon at delta = 1e-5).
    m, eps_rr, eps_lap, mu = 1000, 1.0, 2.0, 2.0
    true_gauss = gdp_epsilon(mu, 1e-5)
    above = {"noise": 0, "rr": 0, "rr_exact": 0, "laplace": 0, "gauss": 0}
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        inc = rng.random(m) < 0.5
        noise = rng.normal(size=m)
        above["noise"] += audit.one_run_epsilon_lower_bound(noise, inc, delta=0.0) > 0
        keep = rng.random(m) < 1 / (1 + math.exp(-eps_rr))
        response = np.where(keep, inc, ~inc)
        rr = response + 1e-3 * rng.random(m)
        above["rr"] += audit.one_run_epsilon_lower_bound(rr, inc, delta=0.0) > eps_rr
        pair = [(int(response.sum()), int(m - response.sum()))]
        above["rr_exact"] += (
            audit.one_run_epsilon_lower_bound(rr, inc, delta=0.0, k_grid=pair) > eps_rr
        )
        lap = inc + rng.laplace(scale=1 / eps_lap, size=m)
        above["laplace"] += audit.one_run_epsilon_lower_bound(lap, inc, delta=0.0) > eps_lap
        gauss = mu * inc + rng.normal(size=m)
        above["gauss"] += audit.one_run_epsilon_lower_bound(gauss, inc, delta=1e-5) > true_gauss
    assert max(above.values()) <= _LIMIT, above


def test_one_run_holdout_stays_below_the_truth_on_noise():
    above = 0
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        inc = rng.random(1000) < 0.5
        bound = audit.one_run_epsilon_lower_bound(
            rng.normal(size=1000), inc, delta=1e-5, selection="holdout", seed=seed
        )
        above += bound > 0
    assert above <= _LIMIT


# ---------------------------------------------------------------- sharpness


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gdp_detects_a_noise_multiplier_claimed_15_percent_too_high(sigma, seed):
    # R = 20,000 releases per world of a Gaussian mechanism with noise multiplier sigma:
    # the bound must exceed what the mechanism would claim with noise 1.15 sigma.
    # (Staying below the true epsilon is a 95% property, tested over seeds above.)
    in_s, out_s = _gauss_pair(seed, 1 / sigma, 20_000)
    bound = audit.epsilon_lower_bound(in_s, out_s, delta=1e-5, method="gdp", seed=seed)
    assert bound > gdp_epsilon(1 / (1.15 * sigma), 1e-5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_one_run_catches_a_non_private_mechanism(seed, delta):
    rng = np.random.default_rng(seed)
    inc = rng.random(1000) < 0.5
    scores = np.where(inc, rng.normal(3, 1, 1000), rng.normal(0, 1, 1000))
    assert audit.one_run_epsilon_lower_bound(scores, inc, delta=delta) > 2


# ---------------------------------------------------------------- arguments


_IN, _OUT = np.arange(10.0), np.arange(10.0) - 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_scores": []}, "in_scores to be a non-empty 1-D"),
        ({"out_scores": np.ones((2, 2))}, r"out_scores to be a non-empty 1-D .* \(2, 2\)"),
        ({"in_scores": [0.0, np.nan]}, "in_scores to be finite, it holds nan"),
        ({"out_scores": [np.inf]}, "out_scores to be finite, it holds inf"),
        ({"delta": 1.0}, r"delta=1.0 in \[0, 1\)"),
        ({"delta": -1e-9}, r"delta=-1e-09 in \[0, 1\)"),
        ({"confidence": 1.0}, r"confidence=1.0 in \(0, 1\)"),
        ({"confidence": 0}, r"confidence=0 in \(0, 1\)"),
        (
            {"method": "bayes"},
            r"method='bayes' to be one of \['clopper_pearson', 'gdp', 'one_run'\]",
        ),
        ({"selection": "best"}, r"selection='best' to be one of \['bonferroni', 'holdout'\]"),
        ({"holdout_fraction": 1.0}, r"holdout_fraction=1.0 in \(0, 1\)"),
        ({"holdout_fraction": 0.01}, "to leave in_scores on both sides"),
        ({"k_grid": [3]}, "keyword k_grid=.* with method='clopper_pearson'"),
        ({"method": "gdp", "delta": 0.0}, "delta=0 > 0 with method='gdp'"),
        ({"method": "one_run", "k_grid": [30]}, r"k_plus \+ k_minus <= 20 canaries"),
        ({"method": "one_run", "k_grid": [(0, 0)]}, "1 <= k_plus"),
        (
            {"method": "one_run", "selection": "holdout"},
            "keyword selection=.* with method='one_run'",
        ),
    ],
)
def test_bad_arguments_raise_before_any_compute(kwargs, match):
    call = {
        "in_scores": _IN,
        "out_scores": _OUT,
        "delta": 1e-5,
        "method": "clopper_pearson",
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        audit.epsilon_lower_bound(call.pop("in_scores"), call.pop("out_scores"), **call)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: audit.one_run_epsilon_lower_bound(_IN, [1, 0], delta=0.0), "one 0/1"),
        (lambda: audit.one_run_epsilon_lower_bound(_IN, _IN, delta=0.0), "one 0/1"),
        (
            lambda: audit.one_run_epsilon_lower_bound(
                _IN, np.arange(10) % 2, delta=0.0, selection="holdout", k_grid=[5]
            ),
            "<= 5 canaries",
        ),
        (lambda: audit.one_run_p_value(10, 11, 3, 1.0, 0.0), "num_guesses=11 <= num_canaries"),
        (lambda: audit.one_run_p_value(10, 5, 6, 1.0, 0.0), "num_correct=6"),
        (lambda: audit.one_run_p_value(10, 5, 3, -1.0, 0.0), "epsilon=-1.0"),
        (lambda: audit.clopper_pearson_upper(3, 2, 0.05), "trials=2"),
        (lambda: audit.clopper_pearson_upper(1, 0, 0.05), "trials=0"),
        (lambda: audit.tpr_at_fpr(_IN, _OUT, 1.5), r"fpr=1.5 in \[0, 1\]"),
        (lambda: audit.gdp_mu_lower_bound(_IN, _OUT, seed=-1), "seed=-1"),
    ],
)
def test_other_entry_points_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()

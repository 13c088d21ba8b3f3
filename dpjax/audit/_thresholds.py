"""Threshold tests on two worlds of releases, with Clopper-Pearson confidence.

Arguments are validated by ``dpjax.audit.stats``. A threshold t guesses "in"
when score >= t; FP = #(out >= t), FN = #(in < t). An objective maps upper
bounds on (FPR, FNR) to the epsilon (or mu) they rule out and decreases in both.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import special

Objective = Callable[[np.ndarray, np.ndarray], np.ndarray]
_SPLIT_SALT = 0x5EED_5B17
# Below this many thresholds, evaluating every bound costs less than bracketing.
_EXACT_BELOW = 1024


def cp_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Clopper-Pearson upper bound: Beta(k + 1, n - k)'s 1 - alpha quantile, 1 at k = n."""
    k = np.asarray(k, dtype=np.float64)
    below = k < n
    upper = np.ones_like(k)
    upper[below] = special.betaincinv(k[below] + 1, n - k[below], 1 - alpha)
    return upper


def _bracketed_cp(counts: np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper brackets of ``cp_upper(counts)`` from ~600 exact evaluations.

    ``cp_upper`` increases with the count, so its values at the grid counts just
    below and above a count bracket it.
    """
    grid = np.unique(
        np.concatenate([np.arange(min(n, 128) + 1), np.geomspace(128, max(n, 128), 512).round()])
    )
    grid = grid[grid <= n]
    values = cp_upper(grid, n, alpha)
    below = np.searchsorted(grid, counts, side="right") - 1
    above = np.minimum(below + (grid[below] != counts), grid.size - 1)
    return values[below], values[above]


def dp_objective(delta: float) -> Objective:
    """Epsilon ruled out at delta: max of log((1 - delta - FNR) / FPR) and its mirror."""

    def objective(fpr_ub: np.ndarray, fnr_ub: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            forward = np.log(np.maximum(1 - delta - fnr_ub, 0)) - np.log(fpr_ub)
            backward = np.log(np.maximum(1 - delta - fpr_ub, 0)) - np.log(fnr_ub)
        return np.maximum(forward, backward)

    return objective


def gdp_objective(fpr_ub: np.ndarray, fnr_ub: np.ndarray) -> np.ndarray:
    """mu ruled out: Phi^-1(1 - FPR) - Phi^-1(FNR), which is its own mirror."""
    return -special.ndtri(fpr_ub) - special.ndtri(fnr_ub)


def threshold_counts(
    in_scores: np.ndarray, out_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thresholds worth trying, increasing, with their FP and FN counts.

    Raising t past a value held only by "in" scores only adds false negatives,
    past one held only by "out" scores only removes false positives; so the
    undominated thresholds are the values that hold an "in" score and follow a
    value that holds an "out" score (or come first).
    """
    values = np.unique(np.concatenate([in_scores, out_scores]))
    in_sorted, out_sorted = np.sort(in_scores), np.sort(out_scores)
    fn = np.searchsorted(in_sorted, values, side="left")
    out_below = np.searchsorted(out_sorted, values, side="left")
    holds_in = np.searchsorted(in_sorted, values, side="right") > fn
    holds_out = np.searchsorted(out_sorted, values, side="right") > out_below
    keep = holds_in & np.concatenate([[True], holds_out[:-1]])
    return values[keep], (out_sorted.size - out_below)[keep], fn[keep]


def best_threshold(
    fp: np.ndarray, fn: np.ndarray, n_out: int, n_in: int, alpha: float, objective: Objective
) -> tuple[float, int]:
    """max_j objective(U(fp_j), U(fn_j)) and its index, U the bound at level alpha.

    Exact: the brackets bound each threshold's objective from both sides, and U
    is evaluated exactly only where the upper side reaches the best lower side.
    """
    if fp.size <= _EXACT_BELOW:
        exact = objective(cp_upper(fp, n_out, alpha), cp_upper(fn, n_in, alpha))
        j = int(np.argmax(exact))
        return float(exact[j]), j
    fp_low, fp_high = _bracketed_cp(fp, n_out, alpha)
    fn_low, fn_high = _bracketed_cp(fn, n_in, alpha)
    best_low = np.max(objective(fp_high, fn_high))
    live = np.flatnonzero(objective(fp_low, fn_low) >= best_low)
    exact = objective(cp_upper(fp[live], n_out, alpha), cp_upper(fn[live], n_in, alpha))
    j = int(np.argmax(exact))
    return float(exact[j]), int(live[j])


def bonferroni_bound(
    in_scores: np.ndarray, out_scores: np.ndarray, alpha: float, objective: Objective
) -> float:
    """Largest objective over all thresholds; valid with probability 1 - alpha.

    U depends on a threshold only through its count, and U fails at count k
    only if Binomial(n, p) <= k for some p above U(k): Clopper-Pearson's event,
    of probability <= level whichever (data-chosen) thresholds share that count.
    Counts n_out (FP) and n_in (FN) give U = 1, which never fails, so the other
    n_out + n_in counts share alpha; then both rates hold at every threshold at
    once, and both directions may be used.
    """
    _, fp, fn = threshold_counts(in_scores, out_scores)
    level = alpha / (in_scores.size + out_scores.size)
    return best_threshold(fp, fn, out_scores.size, in_scores.size, level, objective)[0]


def split_rng(seed: int) -> np.random.Generator:
    """The generator of holdout splits: salted, so that ``seed`` never replays the stream
    ``np.random.default_rng(seed)`` may have used to make the scores."""
    return np.random.default_rng([seed, _SPLIT_SALT])


def split(
    scores: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``fraction`` of the scores and the rest.

    Releases within a world are i.i.d., so a split that ignores the scores
    leaves the rest i.i.d. and independent of what is chosen on the first part.
    """
    shuffled = rng.permutation(scores)
    n_select = int(scores.size * fraction)
    return shuffled[:n_select], shuffled[n_select:]


def holdout_dp_bound(
    in_scores: np.ndarray,
    out_scores: np.ndarray,
    alpha: float,
    delta: float,
    fraction: float,
    seed: int,
) -> float:
    """Epsilon at delta from the threshold that maximizes it on a ``fraction`` of each world.

    On the rest, one FPR and one FNR bound at alpha / 2 each.
    """
    rng = split_rng(seed)
    select_in, eval_in = split(in_scores, fraction, rng)
    select_out, eval_out = split(out_scores, fraction, rng)
    objective = dp_objective(delta)
    thresholds, fp, fn = threshold_counts(select_in, select_out)
    _, j = best_threshold(fp, fn, select_out.size, select_in.size, alpha / 2, objective)
    fp_eval = np.array([np.count_nonzero(eval_out >= thresholds[j])])
    fn_eval = np.array([np.count_nonzero(eval_in < thresholds[j])])
    fpr_ub = cp_upper(fp_eval, eval_out.size, alpha / 2)
    fnr_ub = cp_upper(fn_eval, eval_in.size, alpha / 2)
    return float(objective(fpr_ub, fnr_ub)[0])


def holdout_gdp_mu(
    in_scores: np.ndarray, out_scores: np.ndarray, alpha: float, fraction: float, seed: int
) -> float:
    """mu from the equal-error threshold of a ``fraction`` of each world, tested on the rest.

    A mu-GDP mechanism has FPR + FNR >= 2 Phi(-mu / 2) for every test (the
    minimum of alpha + Phi(Phi^-1(1 - alpha) - mu), at alpha = Phi(-mu / 2)).
    On n "out" and n "in" evaluation releases, S = FP + FN is a sum of 2n
    independent Bernoullis of mean rate pbar = (FPR + FNR) / 2, and for
    s <= 2n pbar - 1, P[S <= s] <= P[Binomial(2n, pbar) <= s] (Hoeffding 1956,
    "On the distribution of the number of successes in independent trials",
    Theorem 4). So pbar <= max(U(S; 2n), (S + 1) / 2n) with probability
    1 - alpha, giving mu >= -2 Phi^-1 of that: one bound at level alpha on 2n
    releases instead of two at alpha / 2 on n each. The equal-error threshold is
    where a Gaussian trade-off makes this tightest.
    """
    rng = split_rng(seed)
    select_in, eval_in = split(in_scores, fraction, rng)
    select_out, eval_out = split(out_scores, fraction, rng)
    thresholds, fp, fn = threshold_counts(select_in, select_out)
    t = thresholds[np.argmin(np.abs(fp / select_out.size - fn / select_in.size))]
    n = min(eval_in.size, eval_out.size)
    errors = np.count_nonzero(eval_out[:n] >= t) + np.count_nonzero(eval_in[:n] < t)
    rate_ub = max(float(cp_upper(np.array([errors]), 2 * n, alpha)[0]), (errors + 1) / (2 * n))
    return float(-2 * special.ndtri(rate_ub))

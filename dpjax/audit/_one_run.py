"""One-run auditing statistics (Steinke, Nasr, Jagielski 2023).

m canaries are each included independently with probability 1/2; after one
run the auditor guesses "in" for the k_plus highest scores, "out" for the
k_minus lowest, and abstains on the rest. Arguments are validated by
``dpjax.audit.stats``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from dpjax.audit._thresholds import split_rng


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Bound on P[W >= v] for r guesses on m canaries of an (epsilon, delta)-DP mechanism.

    P[W' >= v] + 2 m delta max_{1<=i<=v} P[v > W' >= v - i] / i, with
    W' ~ Binomial(r, e^epsilon / (1 + e^epsilon)), capped at 1.
    """
    if v == 0:
        return 1.0
    tail = float(special.bdtrc(v - 1, r, special.expit(epsilon)))
    if delta == 0:
        return min(tail, 1.0)
    return min(tail + 2 * m * delta * _delta_term(r, v, epsilon), 1.0)


def _delta_term(r: int, v: int, epsilon: float) -> float:
    """max_{1<=i<=v} P[v - i <= W' <= v - 1] / i, W' ~ Binomial(r, expit(epsilon)).

    The pmf is summed down from v - 1 to 12 standard deviations below the mean;
    every longer i has a ratio at most (window mass + mass below the window) /
    (window length + 1), which is taken as one more candidate. So the result is
    never below the maximum, to floating-point accuracy (about 1e-10 relative).
    """
    q = special.expit(epsilon)
    spread = math.sqrt(r * q * (1 - q))
    low = int(min(v - 1, max(0, math.floor(r * q - 12 * spread) - 1)))
    j = np.arange(v - 1, low - 1, -1, dtype=np.float64)
    log_pmf = (
        -math.log(r + 1)
        - special.betaln(r - j + 1, j + 1)
        + j * special.log_expit(epsilon)
        + (r - j) * special.log_expit(-epsilon)
    )
    masses = np.cumsum(np.exp(log_pmf))
    best = float(np.max(masses / np.arange(1, masses.size + 1)))
    if low > 0:
        below = float(special.bdtr(low - 1, r, q))
        best = max(best, (masses[-1] + below) / (masses.size + 1))
    return best


def epsilon_bound(m: int, r: int, v: int, alpha: float, delta: float) -> float:
    """The largest epsilon whose p-value is at most alpha (0 if none).

    Without delta the tail P[W' >= v] = I_q(v, r - v + 1) increases with
    epsilon, so the answer is its exact crossing. With delta the p-value need
    not be monotone; bisection keeps p(low) < alpha, so the value returned is
    always one the test rejects (a valid bound, at worst below the largest).
    Rejecting epsilon rejects every smaller one ((epsilon, delta)-DP implies
    (epsilon', delta)-DP for epsilon' > epsilon), so this is a lower bound.
    """
    if v == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    high = float(special.logit(special.betaincinv(v, r - v + 1, alpha)))
    if delta == 0:
        return high
    low = 0.0
    while high - low > 1e-7 * max(1.0, high):
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < alpha:
            low = middle
        else:
            high = middle
    return low


def default_k_grid(m: int) -> np.ndarray:
    """k_plus = k_minus = m // 2, m // 4, ..., m // 256 (at least 1)."""
    ks = np.unique(np.maximum(m // 2 ** np.arange(1, 9), 1))
    return np.stack([ks, ks], axis=1)


def _worst_case_hits(sizes: np.ndarray, hits: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Fewest right guesses when taking k items from tie groups in order.

    Breaking ties by input order would leak which array a canary came from, so
    in the group where the k-th item falls the wrong items count as taken first.
    """
    ends = np.concatenate([[0], np.cumsum(sizes)])
    hit_ends = np.concatenate([[0], np.cumsum(hits)])
    g = np.clip(np.searchsorted(ends, k, side="left") - 1, 0, sizes.size - 1)
    return hit_ends[g] + np.maximum(0, k - ends[g] - (sizes[g] - hits[g]))


def correct_guesses(scores: np.ndarray, included: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Right guesses for each (k_plus, k_minus) row of ``pairs``, ties counted adversely."""
    values, group = np.unique(scores, return_inverse=True)
    sizes = np.bincount(group, minlength=values.size)
    ins = np.bincount(group, weights=included, minlength=values.size).round().astype(np.int64)
    top = _worst_case_hits(sizes[::-1], ins[::-1], pairs[:, 0])
    bottom = _worst_case_hits(sizes, sizes - ins, pairs[:, 1])
    return top + bottom


def best_over_grid(
    scores: np.ndarray, included: np.ndarray, pairs: np.ndarray, alpha: float, delta: float
) -> tuple[float, int]:
    """Largest bound over the rows of ``pairs``, each tested at level alpha, and its row."""
    m = scores.size
    guesses = pairs.sum(axis=1)
    right = correct_guesses(scores, included, pairs)
    # The delta = 0 bound caps the bound with delta: try the highest cap first, stop
    # once no cap can beat the best so far.
    caps = np.array(
        [epsilon_bound(m, int(r), int(v), alpha, 0.0) for r, v in zip(guesses, right, strict=True)]
    )
    best, best_row = 0.0, 0
    for j in np.argsort(-caps, kind="stable"):
        if caps[j] <= best:
            break
        value = float(caps[j])
        if delta > 0:
            value = epsilon_bound(m, int(guesses[j]), int(right[j]), alpha, delta)
        if value > best:
            best, best_row = value, int(j)
    return best, best_row


def holdout_bound(
    scores: np.ndarray,
    included: np.ndarray,
    pairs: np.ndarray,
    alpha: float,
    delta: float,
    n_select: int,
    seed: int,
) -> float:
    """The row of ``pairs`` best on ``n_select`` random canaries, scaled to and tested on the rest.

    The split is drawn over canary positions fixed before the coins, so the
    rest's coins stay independent and fair given the chosen part, and the rest
    is an m = (number of the rest) one-run audit of its own.
    """
    chosen = np.zeros(scores.size, dtype=bool)
    chosen[split_rng(seed).permutation(scores.size)[:n_select]] = True
    _, j = best_over_grid(scores[chosen], included[chosen], pairs, alpha, delta)
    n_rest = scores.size - n_select
    scaled = np.round(pairs[j] * n_rest / n_select).astype(np.int64)
    scaled = np.minimum(np.maximum(scaled, 0), n_rest)
    if scaled.sum() > n_rest:
        scaled[1] = n_rest - scaled[0]
    if scaled.sum() == 0:
        scaled[0] = 1
    return best_over_grid(scores[~chosen], included[~chosen], scaled[None, :], alpha, delta)[0]

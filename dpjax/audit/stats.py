"""Statistics that turn membership scores into an epsilon lower bound.

An audit runs a mechanism with a canary ("in") and without it ("out"), scores
every release (higher means "in") and asks which epsilon the scores rule out.
Every bound here holds with probability at least ``confidence`` with the search
over thresholds (or guess counts) included: it is paid for by a Bonferroni
correction or by choosing on held-out scores (:class:`Selection`). A bound above
the epsilon a mechanism claims at the same delta refutes the claim (unless a
(1 - confidence)-probability event happened).

- ``clopper_pearson`` (Jagielski, Ullman, Oprea 2020): any mechanism.
- ``gdp`` (Nasr et al. 2023): only mechanisms whose trade-off curve is
  Gaussian (one Gaussian-mechanism release, everything else fixed); then sharp.
- ``one_run`` (Steinke, Nasr, Jagielski 2023): m canaries in one run, each
  included with probability 1/2; any mechanism.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

import dpjax.audit._one_run as _one_run
import dpjax.audit._thresholds as _thresholds
from dpjax.audit.gdp import gdp_epsilon


class Method(enum.StrEnum):
    """The statistics :func:`epsilon_lower_bound` offers."""

    CLOPPER_PEARSON = "clopper_pearson"
    GDP = "gdp"
    ONE_RUN = "one_run"


class Selection(enum.StrEnum):
    """How a search over thresholds (or guess counts) keeps the confidence valid.

    ``BONFERRONI``: every candidate is tried on all scores, and 1 - confidence
    is divided over all outcomes of the search. ``HOLDOUT``: the candidate is
    chosen on a random ``holdout_fraction`` of the scores and tested, without
    correction, on the rest.
    """

    BONFERRONI = "bonferroni"
    HOLDOUT = "holdout"


DEFAULT_HOLDOUT_FRACTION = 0.2
_TWO_WORLD_KWARGS = ("selection", "holdout_fraction", "seed")
_ONE_RUN_KWARGS = ("k_grid",)


# ---------------------------------------------------------------- validation


def _is_real(value: Any) -> bool:
    number = (int, float, np.integer, np.floating)
    return isinstance(value, number) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_scores(name: str, values: ArrayLike) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(
            f"Expected {name} to be a non-empty 1-D array of scores, got shape {scores.shape}."
        )
    if not np.all(np.isfinite(scores)):
        bad = float(scores[~np.isfinite(scores)][0])
        raise ValueError(f"Expected {name} to be finite, it holds {bad!r}.")
    return scores


def _check_delta(delta: Any) -> None:
    if not (_is_real(delta) and 0 <= delta < 1):
        raise ValueError(f"Expected delta={delta!r} in [0, 1).")


def _check_confidence(confidence: Any) -> None:
    if not (_is_real(confidence) and 0 < confidence < 1):
        raise ValueError(f"Expected confidence={confidence!r} in (0, 1).")


def _check_selection(selection: Any, holdout_fraction: Any, seed: Any) -> Selection:
    if selection not in tuple(Selection):
        accepted = [str(s) for s in Selection]
        raise ValueError(f"Expected selection={selection!r} to be one of {accepted}.")
    if not (_is_real(holdout_fraction) and 0 < holdout_fraction < 1):
        raise ValueError(f"Expected holdout_fraction={holdout_fraction!r} in (0, 1).")
    if not (_is_int(seed) and seed >= 0):
        raise ValueError(f"Expected seed={seed!r} to be an integer >= 0.")
    return Selection(selection)


def _check_split(n: int, fraction: float, what: str) -> int:
    n_select = int(n * fraction)
    if not 1 <= n_select < n:
        raise ValueError(
            f"Expected holdout_fraction={fraction!r} to leave {what} on both sides, got {n} in all."
        )
    return n_select


def _check_k_grid(k_grid: Any, m: int) -> np.ndarray:
    if k_grid is None:
        return _one_run.default_k_grid(m)
    pairs = np.asarray(k_grid)
    if pairs.ndim == 1:
        pairs = np.stack([pairs, pairs], axis=1)
    ok = (
        pairs.ndim == 2
        and pairs.shape[0] > 0
        and pairs.shape[1] == 2
        and np.issubdtype(pairs.dtype, np.integer)
        and np.all(pairs >= 0)
        and np.all(pairs.sum(axis=1) >= 1)
        and np.all(pairs.sum(axis=1) <= m)
    )
    if not ok:
        raise ValueError(
            f"Expected k_grid={k_grid!r} to be integers k (k_plus = k_minus = k) or "
            f"(k_plus, k_minus) pairs, each >= 0, with 1 <= k_plus + k_minus <= {m} canaries."
        )
    return pairs.astype(np.int64)


# -------------------------------------------------------------- entry points


def epsilon_lower_bound(
    in_scores: ArrayLike,
    out_scores: ArrayLike,
    *,
    delta: float,
    method: str,
    confidence: float = 0.95,
    **method_kwargs: Any,
) -> float:
    """Returns an epsilon the mechanism exceeds at ``delta``, with probability >= confidence.

    Guarantee: if the mechanism is (epsilon, delta)-DP (for ``gdp``: and its
    trade-off curve is Gaussian), the returned value (>= 0) is at most epsilon
    with probability at least ``confidence`` over the releases (for
    ``one_run``: and the inclusion coins), search over thresholds included.

    ``clopper_pearson`` and ``gdp``: ``in_scores`` / ``out_scores`` are i.i.d.
    releases with / without the canary. At a threshold t, FPR = P[out >= t] and
    FNR = P[in < t] get Clopper-Pearson upper bounds FPR_ub, FNR_ub.

    - ``clopper_pearson`` (Jagielski, Ullman, Oprea 2020), any mechanism:
      ``max_t max(log((1 - delta - FNR_ub) / FPR_ub), log((1 - delta - FPR_ub) / FNR_ub))``.
    - ``gdp`` (Nasr, Hayes, Steinke, Balle, Tramer, Jagielski, Carlini, Terzis
      2023): a lower bound on the Gaussian-DP parameter (see
      :func:`gdp_mu_lower_bound`) converted by :func:`~dpjax.audit.gdp_epsilon`
      (Dong, Roth, Su 2019). Valid ONLY if the releases' trade-off curve is
      Gaussian (a Gaussian mechanism with everything else fixed); for other
      mechanisms it can exceed the true epsilon. Needs ``delta > 0``.

    Keywords: ``selection`` (default ``"holdout"``), ``holdout_fraction``
    (default 0.2) and ``seed`` (default 0, the split). ``"bonferroni"`` tries
    every threshold on all scores, each rate bounded at level
    ``(1 - confidence) / (len(in_scores) + len(out_scores))``. ``"holdout"``
    chooses the threshold on ``holdout_fraction`` of each world's scores (for
    ``clopper_pearson`` the one maximizing the bound there, for ``gdp`` the
    equal-error one) and tests it on the rest: ``clopper_pearson`` with both
    rates at ``(1 - confidence) / 2``, ``gdp`` with the total error count at
    ``1 - confidence``. Bonferroni's price is a normal quantile growing like
    ``sqrt(2 log n)``, holdout's is fewer scores and a noisy choice. On
    Gaussian releases (100 to 20,000 per world, mu from 0.25 to 4) holdout
    was tighter everywhere (at 20,000 and mu = 1: by 6% for ``gdp``, 11% for
    ``clopper_pearson``; far more at a few hundred) except ``clopper_pearson``
    with mu = 4, where the two tie: Bonferroni pays off only when the best
    threshold makes almost no errors (``docs/audit.md``, "Statistics").
    Bonferroni varies less between runs and needs no seed.

    ``one_run``: ``in_scores`` / ``out_scores`` are the m included / excluded
    canaries of one run, each canary included independently with probability
    1/2 (the guarantee needs it). Guesses "in" for the ``k_plus`` highest
    scores and "out" for the ``k_minus`` lowest (ties counted adversely),
    abstains on the rest, and returns the largest epsilon whose p-value
    (:func:`one_run_p_value`) is at most ``(1 - confidence) / len(k_grid)``,
    the best over the grid. Keyword ``k_grid``: integers k (``k_plus = k_minus = k``)
    or ``(k_plus, k_minus)`` pairs; default ``m // 2, m // 4, ..., m // 256``.
    Choosing k on held-out canaries needs them in a fixed order:
    :func:`one_run_epsilon_lower_bound`.
    """
    in_arr = _check_scores("in_scores", in_scores)
    out_arr = _check_scores("out_scores", out_scores)
    _check_delta(delta)
    _check_confidence(confidence)
    if method not in tuple(Method):
        accepted = [str(m) for m in Method]
        raise ValueError(f"Expected method={method!r} to be one of {accepted}.")
    method = Method(method)
    accepted = _ONE_RUN_KWARGS if method == Method.ONE_RUN else _TWO_WORLD_KWARGS
    for name, value in method_kwargs.items():
        if name not in accepted:
            raise ValueError(
                f"Expected keyword {name}={value!r} to be one of {list(accepted)} "
                f"with method={str(method)!r}."
            )
    if method == Method.ONE_RUN:
        scores = np.concatenate([in_arr, out_arr])
        included = np.concatenate([np.ones(in_arr.size), np.zeros(out_arr.size)])
        pairs = _check_k_grid(method_kwargs.get("k_grid"), scores.size)
        alpha = (1 - confidence) / pairs.shape[0]
        return _one_run.best_over_grid(scores, included, pairs, alpha, delta)[0]
    if method == Method.GDP:
        if delta == 0:
            raise ValueError(
                "Expected delta=0 > 0 with method='gdp': a Gaussian trade-off curve is not "
                "(epsilon, 0)-DP for any finite epsilon."
            )
        mu = gdp_mu_lower_bound(in_arr, out_arr, confidence=confidence, **method_kwargs)
        return gdp_epsilon(mu, delta)
    selection = _check_selection(
        method_kwargs.get("selection", Selection.HOLDOUT),
        method_kwargs.get("holdout_fraction", DEFAULT_HOLDOUT_FRACTION),
        method_kwargs.get("seed", 0),
    )
    alpha = 1 - confidence
    if selection == Selection.BONFERRONI:
        value = _thresholds.bonferroni_bound(
            in_arr, out_arr, alpha, _thresholds.dp_objective(delta)
        )
    else:
        fraction = method_kwargs.get("holdout_fraction", DEFAULT_HOLDOUT_FRACTION)
        _check_split(in_arr.size, fraction, "in_scores")
        _check_split(out_arr.size, fraction, "out_scores")
        value = _thresholds.holdout_dp_bound(
            in_arr, out_arr, alpha, delta, fraction, method_kwargs.get("seed", 0)
        )
    return max(0.0, value)


def gdp_mu_lower_bound(
    in_scores: ArrayLike,
    out_scores: ArrayLike,
    *,
    confidence: float = 0.95,
    selection: str = "holdout",
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    seed: int = 0,
) -> float:
    """Returns a lower bound (>= 0) on the Gaussian-DP parameter mu of the releases.

    Holds with probability at least ``confidence`` if the releases' trade-off
    curve is Gaussian (``mu = 1 / noise_multiplier`` for a Gaussian mechanism).
    ``"bonferroni"``: ``max_t Phi^-1(1 - FPR_ub(t)) - Phi^-1(FNR_ub(t))`` over all
    thresholds (Nasr et al. 2023), each rate at level
    ``(1 - confidence) / (len(in_scores) + len(out_scores))``. ``"holdout"``: the
    equal-error threshold of ``holdout_fraction`` of each world, then, on n
    releases per world of the rest, ``mu >= -2 Phi^-1(U)`` with U the
    Clopper-Pearson bound at ``1 - confidence`` on (FP + FN) / 2n: mu-GDP forces
    FPR + FNR >= 2 Phi(-mu / 2), and Hoeffding (1956, Theorem 4) lets the
    2n unequal Bernoullis be treated as one binomial.
    """
    in_arr = _check_scores("in_scores", in_scores)
    out_arr = _check_scores("out_scores", out_scores)
    _check_confidence(confidence)
    chosen = _check_selection(selection, holdout_fraction, seed)
    alpha = 1 - confidence
    if chosen == Selection.BONFERRONI:
        value = _thresholds.bonferroni_bound(in_arr, out_arr, alpha, _thresholds.gdp_objective)
    else:
        _check_split(in_arr.size, holdout_fraction, "in_scores")
        _check_split(out_arr.size, holdout_fraction, "out_scores")
        value = _thresholds.holdout_gdp_mu(in_arr, out_arr, alpha, holdout_fraction, seed)
    return max(0.0, value)


def one_run_epsilon_lower_bound(
    scores: ArrayLike,
    included: ArrayLike,
    *,
    delta: float,
    confidence: float = 0.95,
    k_grid: Sequence[int] | Sequence[tuple[int, int]] | None = None,
    selection: str = "bonferroni",
    holdout_fraction: float = 0.5,
    seed: int = 0,
) -> float:
    """Returns the one-run epsilon lower bound from every canary's score and inclusion bit.

    ``scores[i]`` and ``included[i]`` belong to canary i, in an order fixed
    before the coins were tossed (each canary included independently with
    probability 1/2). ``selection="bonferroni"`` is ``method="one_run"`` of
    :func:`epsilon_lower_bound`, same guarantee. ``"holdout"`` picks the
    ``(k_plus, k_minus)`` row on a random ``holdout_fraction`` of the canaries at
    level ``1 - confidence``, scales it to the rest and tests it there as an
    audit of its own (m = the rest): no ``len(k_grid)`` factor, but a smaller m.
    """
    scores_arr = _check_scores("scores", scores)
    bits = np.asarray(included)
    if bits.shape != scores_arr.shape or not np.all((bits == 0) | (bits == 1)):
        raise ValueError(
            f"Expected included to hold one 0/1 (or bool) per score, shape {scores_arr.shape}, "
            f"got shape {bits.shape}."
        )
    _check_delta(delta)
    _check_confidence(confidence)
    chosen = _check_selection(selection, holdout_fraction, seed)
    alpha = 1 - confidence
    bits = bits.astype(np.float64)
    if chosen == Selection.BONFERRONI:
        pairs = _check_k_grid(k_grid, scores_arr.size)
        return _one_run.best_over_grid(scores_arr, bits, pairs, alpha / pairs.shape[0], delta)[0]
    n_select = _check_split(scores_arr.size, holdout_fraction, "canaries")
    pairs = _check_k_grid(k_grid, n_select)
    return _one_run.holdout_bound(scores_arr, bits, pairs, alpha, delta, n_select, seed)


def one_run_p_value(
    num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """Returns the one-run p-value of "the mechanism is (epsilon, delta)-DP".

    The main result of Steinke, Nasr, Jagielski (NeurIPS 2023, arXiv:2305.08846)
    for (epsilon, delta)-DP, delta term included: with m canaries each included
    independently with probability 1/2, and r guesses (the rest abstain) of
    which W are right, for every v

        P[W >= v] <= P[W' >= v] + 2 m delta max_{1<=i<=v} P[v > W' >= v - i] / i,
        W' ~ Binomial(r, e^epsilon / (1 + e^epsilon)),

    evaluated as their Appendix D does. Capped at 1.
    """
    for name, value in (("num_canaries", num_canaries), ("num_guesses", num_guesses)):
        if not (_is_int(value) and value >= 0):
            raise ValueError(f"Expected {name}={value!r} to be an integer >= 0.")
    if not (_is_int(num_correct) and 0 <= num_correct <= num_guesses):
        raise ValueError(f"Expected num_correct={num_correct!r} in [0, num_guesses].")
    if num_guesses > num_canaries:
        raise ValueError(f"Expected num_guesses={num_guesses!r} <= num_canaries={num_canaries}.")
    if not (_is_real(epsilon) and 0 <= epsilon < float("inf")):
        raise ValueError(f"Expected epsilon={epsilon!r} to be finite and >= 0.")
    _check_delta(delta)
    return _one_run.p_value(
        int(num_canaries), int(num_guesses), int(num_correct), float(epsilon), float(delta)
    )


def clopper_pearson_upper(successes: ArrayLike, trials: int, alpha: float) -> np.ndarray:
    """Returns the one-sided Clopper-Pearson upper bound on a binomial proportion.

    For ``k`` successes of ``n`` trials: the ``1 - alpha`` quantile of
    ``Beta(k + 1, n - k)`` (1 when ``k = n``), so ``p <= U(k)`` with
    probability at least ``1 - alpha``.
    """
    if not (_is_int(trials) and trials >= 1):
        raise ValueError(f"Expected trials={trials!r} to be an integer >= 1.")
    if not (_is_real(alpha) and 0 < alpha < 1):
        raise ValueError(f"Expected alpha={alpha!r} in (0, 1).")
    k = np.asarray(successes, dtype=np.float64)
    if np.any((k < 0) | (k > trials) | (k != np.round(k))):
        raise ValueError(f"Expected successes to be integers in [0, trials={trials}].")
    return _thresholds.cp_upper(k.reshape(-1), int(trials), float(alpha)).reshape(k.shape)


# ------------------------------------------------------------- ROC summaries


def tpr_at_fpr(in_scores: ArrayLike, out_scores: ArrayLike, fpr: float) -> float:
    """Returns the largest TPR among thresholds t (guess "in" when score >= t) whose
    empirical FPR, #(out >= t) / len(out_scores), is at most ``fpr``. A summary of
    the sample, not a confidence bound."""
    in_arr = _check_scores("in_scores", in_scores)
    out_arr = _check_scores("out_scores", out_scores)
    if not (_is_real(fpr) and 0 <= fpr <= 1):
        raise ValueError(f"Expected fpr={fpr!r} in [0, 1].")
    counts = np.arange(out_arr.size + 1)
    allowed = int(counts[counts / out_arr.size <= fpr].max())
    if allowed == out_arr.size:
        return 1.0
    # Exactly the thresholds above the (allowed + 1)-th largest "out" score keep FPR <= fpr.
    cutoff = np.sort(out_arr)[::-1][allowed]
    return float(np.count_nonzero(in_arr > cutoff) / in_arr.size)


def auc(in_scores: ArrayLike, out_scores: ArrayLike) -> float:
    """Returns P[in > out] + P[in = out] / 2 over all (in, out) pairs: the ROC AUC."""
    in_arr = _check_scores("in_scores", in_scores)
    out_sorted = np.sort(_check_scores("out_scores", out_scores))
    below = np.searchsorted(out_sorted, in_arr, side="left")
    tied = np.searchsorted(out_sorted, in_arr, side="right") - below
    wins = np.sum(below, dtype=np.float64) + 0.5 * np.sum(tied, dtype=np.float64)
    return float(wins / (in_arr.size * out_sorted.size))

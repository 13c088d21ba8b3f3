"""Shamir t-of-n secret sharing over a prime field (host side, exact integers).

Guarantee: each secret is the constant term of a polynomial of degree
``threshold - 1`` whose other coefficients are uniform in ``[0, prime)``, so
any ``threshold - 1`` shares are uniformly distributed whatever the secret
(perfect secrecy), and any ``threshold`` shares determine it.

Arithmetic is on Python integers held in numpy ``object`` arrays: exact for
any prime, fast enough for the few hundred words a SecAgg party shares.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpjax.secagg.randomness import random_below

MERSENNE_61 = 2**61 - 1


def _check_points(xs: Sequence[int], prime: int) -> list[int]:
    xs = [int(x) for x in xs]
    if any(x % prime == 0 for x in xs) or len({x % prime for x in xs}) != len(xs):
        raise ValueError(f"Expected evaluation points xs={xs} distinct and nonzero mod {prime}.")
    return xs


def shamir_evaluate(
    secrets: Sequence[int], coefficients: np.ndarray, xs: Sequence[int], prime: int
) -> np.ndarray:
    """Evaluates ``f_j(z) = secrets[j] + sum_i coefficients[i, j] * z^(i + 1)`` at ``xs``.

    ``coefficients`` is ``[threshold - 1, len(secrets)]``; the result is an
    object array ``[len(xs), len(secrets)]``.
    """
    points = np.array([int(x) for x in xs], dtype=object)[:, None]
    acc = np.zeros((len(xs), len(secrets)), dtype=object)
    for row in np.asarray(coefficients, dtype=object)[::-1]:  # Horner, highest degree first
        acc = (acc + row[None, :]) * points % prime
    return (acc + np.array([int(s) for s in secrets], dtype=object)[None, :]) % prime


def shamir_share(
    secrets: Sequence[int],
    *,
    threshold: int,
    xs: Sequence[int],
    prime: int = MERSENNE_61,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Shares of each secret at the points ``xs``: object array ``[len(xs), len(secrets)]``.

    Row ``i`` is what the holder with evaluation point ``xs[i]`` receives.
    Coefficients come from ``secrets.randbelow`` (``rng is None``) or ``rng``.
    """
    xs = _check_points(xs, prime)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"Expected threshold={threshold} in [1, {len(xs)}] (number of holders).")
    values = [int(s) for s in secrets]
    if any(not 0 <= s < prime for s in values):
        raise ValueError(f"Expected every secret in [0, prime={prime}).")
    coefficients = np.array(
        random_below(prime, (threshold - 1) * len(values), rng), dtype=object
    ).reshape(threshold - 1, len(values))
    return shamir_evaluate(values, coefficients, xs, prime)


def lagrange_at_zero(xs: Sequence[int], prime: int = MERSENNE_61) -> list[int]:
    """Weights ``w_j`` with ``f(0) = sum_j w_j f(xs[j])`` for every f of degree < len(xs)."""
    xs = _check_points(xs, prime)
    weights = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for i, xi in enumerate(xs):
            if i != j:
                num = num * xi % prime
                den = den * (xi - xj) % prime
        weights.append(num * pow(den, -1, prime) % prime)
    return weights


def shamir_reconstruct(
    xs: Sequence[int],
    shares: np.ndarray,
    *,
    threshold: int,
    prime: int = MERSENNE_61,
) -> list[int]:
    """The secrets from shares ``[len(xs), m]`` held at points ``xs``.

    Raises ``ValueError`` if fewer than ``threshold`` shares are given: with
    ``threshold - 1`` shares every secret is equally likely, so there is no
    answer to give.
    """
    if len(xs) < threshold:
        raise ValueError(
            f"Expected at least threshold={threshold} shares to reconstruct, got {len(xs)}."
        )
    xs, shares = list(xs)[:threshold], np.asarray(shares, dtype=object)[:threshold]
    weights = np.array(lagrange_at_zero(xs, prime), dtype=object)
    return [int(v) % prime for v in weights @ shares]

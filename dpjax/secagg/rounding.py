"""Randomized rounding to integers, plain and conditional (norm-bounded), in ``jnp``.

``randomized_round(y, key)`` rounds each coordinate up with probability
equal to its fractional part, so ``E[v] = y`` and ``|v - y| < 1`` always.
The rounding draws are 24-bit uniforms from ChaCha20 keyed by the caller's
key: the probability of rounding up is the fractional part rounded up to a
multiple of ``2^-24``.

``conditional_round`` (Kairouz, Liu, Steinke 2021, "conditional randomized
rounding", their Theorem 1 / Proposition 22) redraws the whole vector until
``||v||_2 <= l2_bound``, at most ``max_tries`` times (a static int): a
bounded loop. If every try fails, it returns the zero vector and
``failed=True``: the party then sends noise only, never an unbounded
vector. :func:`conditional_rounding_bound` gives the bound ``B`` for which
one try succeeds with probability ``>= 1 - beta`` whenever ``||y|| <= c``.

The norm check is exact in effect: ``||v||^2`` is summed in float32 by an
explicit pairwise tree (relative error at most ``(L + 2) 2^-24`` for
``2^L`` terms, conversion and squaring included), and the acceptance
threshold is lowered by that much (:func:`acceptance_threshold`), so every
accepted vector has true ``||v||_2 <= l2_bound``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import dpjax._validate as _validate
from dpjax.secagg.chacha import chacha20_stream

_NONCE = np.zeros(3, np.uint32)  # each ChaCha20 key below is fresh, used for one stream
ROUNDING_BIAS = 2.0**-24  # |P(round up) - fractional part|


def _uniforms(key: jax.Array, size: int) -> jax.Array:
    """``float32[size]`` on the grid ``k 2^-24`` from ChaCha20 keyed by 256 bits of ``key``."""
    seed = jax.random.bits(key, (8,), jnp.uint32)
    words = chacha20_stream(seed, _NONCE, size)
    return (words >> np.uint32(8)).astype(jnp.float32) * np.float32(2**-24)


def randomized_round(y: jax.Array, key: jax.Array) -> jax.Array:
    """Unbiased randomized rounding of float32 ``y`` to int32 (``|v - y| < 1``).

    ``floor(y)`` and the fractional part are exact in float32, so the error
    bound holds for every magnitude below 2^31 (above 2^23 every float32 is
    already an integer and nothing is rounded).
    """
    y = jnp.asarray(y, jnp.float32)
    low = jnp.floor(y)
    up = _uniforms(key, y.size).reshape(y.shape) < (y - low)
    return low.astype(jnp.int32) + up.astype(jnp.int32)


def squared_norm(v: jax.Array) -> jax.Array:
    """float32 ``||v||^2`` of an int32 vector by an explicit pairwise tree.

    Relative error at most ``(ceil(log2 len) + 2) 2^-24`` (first order):
    one rounding converting ``v`` to float32, one squaring, one per level.
    """
    squares = jnp.square(v.astype(jnp.float32))
    size = 1 << (squares.shape[0] - 1).bit_length()
    squares = jnp.pad(squares, (0, size - squares.shape[0]))
    while squares.shape[0] > 1:
        half = squares.shape[0] // 2
        squares = squares[:half] + squares[half:]
    return squares[0]


def _relative_error(size: int) -> float:
    levels = max(0, math.ceil(math.log2(size)))
    return 1.01 * (levels + 2) * 2.0**-24


def acceptance_threshold(l2_bound: float, size: int) -> np.float32:
    """float32 ``T`` such that ``squared_norm(v) <= T`` implies ``||v||_2 <= l2_bound``."""
    _validate.positive("l2_bound", l2_bound)
    target = l2_bound**2 * (1 - _relative_error(size))
    threshold = np.float32(target)
    if float(threshold) > target:  # round down, not to nearest
        threshold = np.nextafter(threshold, np.float32(0))
    return threshold


def conditional_rounding_bound(norm_bound: float, size: int, beta: float) -> float:
    """``B`` such that one randomized rounding of any ``y`` with ``||y|| <= c`` has ``||v|| <= B``
    with probability ``>= 1 - beta`` (``c = norm_bound``, ``size = len(y)``).

    ``B^2 = min(c^2 + size/4 + sqrt(2 log(1/beta)) (c + sqrt(size)/2), (c + sqrt(size))^2)``
    (Kairouz, Liu, Steinke 2021, Theorem 1; the second term holds surely,
    so with ``beta = 0`` the rounding never fails). Proof of the first term:
    with ``v = y + e``, ``||v||^2 = ||y||^2 + sum_i (2 y_i + 1 - 2 p_i) e_i
    + sum_i p_i (1 - p_i)``; the middle sum is sub-Gaussian with variance
    proxy ``(2c + sqrt(size))^2 / 4`` (Hoeffding), the last is ``<= size/4``.
    The result is then divided by ``1 - relative error`` of the float32 norm
    check, so the check accepts every vector the bound allows.
    """
    _validate.non_negative("norm_bound", norm_bound)
    _validate.positive_int("size", size)
    if not 0 <= beta < 1:
        raise ValueError(f"Expected beta={beta} in [0, 1).")
    sure = (norm_bound + math.sqrt(size)) ** 2
    if beta == 0:
        squared = sure
    else:
        tail = math.sqrt(2 * math.log(1 / beta)) * (norm_bound + math.sqrt(size) / 2)
        squared = min(norm_bound**2 + size / 4 + tail, sure)
    return math.sqrt(squared / (1 - _relative_error(size)))


def conditional_round(
    y: jax.Array, key: jax.Array, *, l2_bound: float, max_tries: int
) -> tuple[jax.Array, jax.Array]:
    """Randomized rounding of ``y`` redrawn until ``||v||_2 <= l2_bound``, at most ``max_tries``.

    Returns:
      ``(v, failed)``: ``v`` int32 with ``||v||_2 <= l2_bound`` guaranteed
      (the zero vector when ``failed``), ``failed`` a bool scalar, a
      non-private diagnostic the caller counts.
    """
    _validate.positive_int("max_tries", max_tries)
    y = jnp.asarray(y, jnp.float32)
    threshold = acceptance_threshold(l2_bound, y.shape[0])

    def attempt(tries):
        v = randomized_round(y, jax.random.fold_in(key, tries))
        return v, squared_norm(v) <= threshold

    def retry(state):
        tries, _, _ = state
        v, ok = attempt(tries)
        return tries + 1, v, ok

    v, ok = attempt(jnp.int32(0))
    _, v, ok = lax.while_loop(
        lambda state: (~state[2]) & (state[0] < max_tries), retry, (jnp.int32(1), v, ok)
    )
    return jnp.where(ok, v, 0), ~ok

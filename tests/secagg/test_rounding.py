"""Randomized and conditional rounding: unbiased, bounded norms, the retry cap, the fallback."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.secagg import rounding


def test_randomized_rounding_is_unbiased_and_within_one_unit():
    # 0.3 above an integer: each draw errs by +0.7 or -0.3 (sd sqrt(0.21)); the mean
    # error over 200_000 draws is within 4 standard errors of 0.
    n = 200_000
    y = jnp.full((n,), 1234.3, jnp.float32)
    v = rounding.randomized_round(y, jax.random.key(0))
    assert v.dtype == jnp.int32
    err = np.asarray(v, np.float64) - float(y[0])
    assert np.all(np.abs(err) < 1)
    assert abs(err.mean()) < 4 * math.sqrt(0.21 / n)
    big = jnp.asarray([-(2.0**30) + 0.5, 2.0**26, -3.75], jnp.float32)
    got = np.asarray(rounding.randomized_round(big, jax.random.key(1)), np.float64)
    assert np.all(np.abs(got - np.asarray(big, np.float64)) < 1)


def test_squared_norm_is_within_its_stated_relative_error():
    v = jnp.asarray(np.random.default_rng(0).integers(-(2**20), 2**20, size=4097), jnp.int32)
    exact = int(np.sum(np.asarray(v, np.int64) ** 2))  # exact integers, independent
    got = float(rounding.squared_norm(v))
    assert abs(got - exact) <= (math.ceil(math.log2(4097)) + 2) * 2.0**-24 * exact


def test_acceptance_threshold_never_admits_a_longer_vector():
    for bound in (3.0, 1000.5, 2.0**29):
        threshold = float(rounding.acceptance_threshold(bound, 2**20))
        worst = threshold / (1 - 22 * 2.0**-24)  # the largest true ||v||^2 it could accept
        assert worst <= bound**2


def _unit_vector(size, norm, seed=0):
    x = np.random.default_rng(seed).normal(size=size)
    return jnp.asarray(x / np.linalg.norm(x) * norm, jnp.float32)


def test_conditional_rounding_keeps_the_norm_bound():
    y = _unit_vector(512, 40.0)
    bound = rounding.conditional_rounding_bound(40.0, 512, beta=0.5)
    keys = jax.random.split(jax.random.key(2), 400)
    v, failed = jax.vmap(lambda k: rounding.conditional_round(y, k, l2_bound=bound, max_tries=3))(
        keys
    )
    norms = np.linalg.norm(np.asarray(v, np.float64), axis=1)
    assert np.all(norms <= bound)
    assert not np.any(np.asarray(failed))


def test_conditional_rounding_bound_holds_with_probability_one_minus_beta():
    # One try at the bound for beta = 0.2 (without the float margin): violation rate
    # over 4000 draws stays below beta + 4 standard errors.
    size, c, beta = 256, 12.0, 0.2
    y = _unit_vector(size, c, seed=1)
    bound = rounding.conditional_rounding_bound(c, size, beta)
    keys = jax.random.split(jax.random.key(3), 4000)
    v = jax.vmap(lambda k: rounding.randomized_round(y, k))(keys)
    norms = np.linalg.norm(np.asarray(v, np.float64), axis=1)
    rate = np.mean(norms > bound)
    assert rate <= beta + 4 * math.sqrt(beta * (1 - beta) / 4000)


@pytest.mark.parametrize("max_tries", [1, 3])
def test_retry_cap_failure_flag_and_noise_only_fallback(max_tries):
    # Bound at the median of one try's norm: each try passes with probability ~1/2,
    # so P(failed) ~ 2^-max_tries; measured over 4000 keys within 4 standard errors.
    size = 256
    y = _unit_vector(size, 12.0, seed=2)
    probe = jax.vmap(lambda k: rounding.randomized_round(y, k))(
        jax.random.split(jax.random.key(4), 4000)
    )
    squares = np.sum(np.asarray(probe, np.int64) ** 2, axis=1)  # exact integers
    median_sq = int(np.median(squares))
    bound = math.sqrt(median_sq + 0.5)  # between two attainable norms: no ties at the bound
    keys = jax.random.split(jax.random.key(5), 4000)
    v, failed = jax.vmap(
        lambda k: rounding.conditional_round(y, k, l2_bound=bound, max_tries=max_tries)
    )(keys)
    failed = np.asarray(failed)
    p_pass = float(np.mean(squares <= median_sq))
    expected = (1 - p_pass) ** max_tries
    assert abs(failed.mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / 4000)
    assert np.all(np.asarray(v)[failed] == 0)  # a failed party sends its noise only
    assert np.all(np.sum(np.asarray(v, np.int64)[~failed] ** 2, axis=1) <= median_sq)


def test_conditional_rounding_bound_formula():
    # Kairouz, Liu, Steinke 2021, Theorem 1, written out here independently.
    c, d, beta = 100.0, 1024, 1e-3
    squared = min(c**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2),
                  (c + math.sqrt(d)) ** 2)  # fmt: skip
    got = rounding.conditional_rounding_bound(c, d, beta)
    assert math.sqrt(squared) <= got <= math.sqrt(squared) * (1 + 1e-5)
    assert rounding.conditional_rounding_bound(0.5, 4, 1e-9) <= (0.5 + 2) * (1 + 1e-5)

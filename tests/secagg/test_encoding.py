"""Fixed-point encoding: accuracy, unbiased stochastic rounding, wrap guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.secagg import check_no_wrap, decode, encode, quantization_error_bound

SCALE = 2.0**10


def test_round_to_nearest_decodes_within_half_a_unit():
    x = jnp.asarray(np.random.default_rng(0).uniform(-50, 50, 10_000), jnp.float32)
    err = np.abs(np.asarray(decode(encode(x, SCALE), SCALE)) - np.asarray(x))
    assert err.max() <= 0.5 / SCALE


def test_stochastic_rounding_decodes_within_one_unit():
    x = jnp.asarray(np.random.default_rng(1).uniform(-50, 50, 10_000), jnp.float32)
    err = np.abs(np.asarray(decode(encode(x, SCALE, key=jax.random.key(0)), SCALE)) - x)
    assert err.max() < 1 / SCALE


def test_negative_values_are_twos_complement():
    encoded = encode(jnp.array([-1.0, -2.5, 3.0]), 2.0)
    np.testing.assert_array_equal(encoded, np.array([2**32 - 2, 2**32 - 5, 6], np.uint32))


def test_stochastic_rounding_is_unbiased():
    # x * scale = 0.3 units: each draw errs by +0.7 or -0.3 units, sd = sqrt(0.21).
    # Over N = 200_000 draws the mean error's standard error is sqrt(0.21 / N);
    # an unbiased rounding is within 4 standard errors with prob > 0.9999.
    n_draws = 200_000
    x = jnp.full((n_draws,), 0.3 / SCALE + 7.0, jnp.float32)
    decoded = decode(encode(x, SCALE, key=jax.random.key(42)), SCALE)
    err_units = (np.asarray(decoded, np.float64) - float(x[0])) * SCALE
    stderr = np.sqrt(0.21 / n_draws)
    assert abs(err_units.mean()) < 4 * stderr
    # round-to-nearest, by contrast, is off by the whole fraction: the test can fail.
    nearest = (np.asarray(decode(encode(x, SCALE), SCALE), np.float64) - float(x[0])) * SCALE
    assert abs(nearest.mean()) > 4 * stderr


def test_sums_of_encodings_decode_through_wraparound():
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (8, 100)), jnp.float32)
    encoded = jnp.stack([encode(x[i], SCALE, key=jax.random.key(i)) for i in range(8)])
    total = decode(jnp.sum(encoded, axis=0, dtype=jnp.uint32), SCALE)
    bound = quantization_error_bound(8, SCALE)
    assert np.abs(np.asarray(total) - np.asarray(x).sum(0)).max() < bound


def test_wrap_guard_raises_naming_the_bound():
    # 4 * (floor(2^20 * 2^9) + 1) = 2^31 + 4 >= 2^31: could wrap.
    with pytest.raises(ValueError, match=r"< 2\^31"):
        check_no_wrap(2.0**20, 2.0**9, 4)
    check_no_wrap(2.0**20 - 1, 2.0**9, 4)  # 4 * (2^29 - 511) < 2^31


def test_encode_checks_the_data_when_no_bound_is_given():
    x = jnp.array([0.0, 3.0e6])
    with pytest.raises(ValueError, match="wrap"):
        encode(x, 2.0**10, num_parties=1000)


def test_encode_inside_jit_needs_max_abs_and_clamps_to_it():
    with pytest.raises(ValueError, match="max_abs"):
        jax.jit(lambda x: encode(x, SCALE))(jnp.ones(3))
    out = jax.jit(lambda x: encode(x, SCALE, max_abs=2.0))(jnp.array([5.0, -5.0, 1.0]))
    np.testing.assert_array_equal(decode(out, SCALE), [2.0, -2.0, 1.0])


def test_quantization_error_bound_values():
    assert quantization_error_bound(100, 2.0**16) == 100 / 2**16
    assert quantization_error_bound(100, 2.0**16, stochastic=False) == 50 / 2**16
    with pytest.raises(ValueError, match="scale"):
        quantization_error_bound(10, 0.0)


def test_the_wrap_guard_holds_in_the_float32_arithmetic_of_the_clamp():
    """1073741822.0 rounds up to 2^30 in float32: two parties at the bound used to pass the
    guard and decode to -2.147e9 instead of +2.147e9."""
    with pytest.raises(ValueError, match="could wrap"):
        encode(jnp.full((2, 1), 1073741822.0), 1.0, max_abs=1073741822.0, num_parties=2)


@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0, 1 / 3])
def test_every_accepted_bound_decodes_parties_at_the_bound_without_wrapping(scale):
    """Near the 2^31 boundary, for bounds just below and above it: whenever check_no_wrap
    accepts (max_abs, scale, n), n parties all at +max_abs (and all at -max_abs), stochastically
    rounded up, decode to their true sum."""
    rng = np.random.default_rng(0)
    accepted = refused = 0
    for n in (1, 2, 3, 7):
        edge = 2.0**31 / n / scale
        for max_abs in edge * (1 + rng.uniform(-3e-7, 3e-7, 40)):
            try:
                check_no_wrap(float(max_abs), scale, n)
            except ValueError:
                refused += 1
                continue
            accepted += 1
            for sign in (1.0, -1.0):
                x = jnp.full((n, 1), sign * float(max_abs) * 1.0000001, jnp.float32)
                e = encode(x, scale, max_abs=float(max_abs), num_parties=n,
                           key=jax.random.PRNGKey(1))
                total = float(decode(jnp.sum(e, axis=0, dtype=jnp.uint32), scale)[0])
                assert np.sign(total) == sign, (n, max_abs, scale, total)
                clamp = float(np.float32(max_abs))
                assert abs(total - sign * n * clamp) <= n / scale + 1e-6 * n * clamp
    assert accepted > 20 and refused > 20  # both sides of the boundary were tried

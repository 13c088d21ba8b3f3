"""The distributed-DP round end to end: exact modular sums, decoding, who sees what."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from dpjax.secagg import ddp, ddp_params, modular, prepare_round, rotation


@pytest.mark.parametrize("bits", [8, 13, 31, 32])
def test_modular_round_trip_against_python_integers(bits):
    values = np.random.default_rng(bits).integers(-(2**31), 2**31 - 1, size=1000)
    got = np.asarray(
        modular.centered_lift(modular.to_modular(jnp.asarray(values, jnp.int32), bits), bits)
    )
    m = 2**bits
    want = [((int(v) + m // 2) % m) - m // 2 for v in values]  # centered residue, independent
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", [8, 12, 16, 24])
def test_secure_sum_mod_equals_the_survivors_sum_mod_2_to_the_bits(bits):
    """With a dropped party whose masks the aggregator recovers, at moduli whose masks are
    cut in 8-bit lanes (8), 16-bit lanes (12, 16) and whole words (24); 301 coordinates
    leave the last keystream word partly unused."""
    n, size = 6, 301
    encoded = np.random.default_rng(0).integers(0, 2**bits, size=(n, size)).astype(np.uint32)
    masks = prepare_round(n, threshold=4, survivors=[0, 1, 3, 4, 5], mode="simulation", seed=3)
    got = modular.secure_sum_mod(jnp.asarray(encoded), bits=bits, round_masks=masks)
    want = encoded[[0, 1, 3, 4, 5]].astype(np.int64).sum(0) % 2**bits
    np.testing.assert_array_equal(np.asarray(got), want)


def test_lane_masks_are_uniform_and_no_two_coordinates_share_one():
    """An attacker's view of one party at 16 bits (two masks per keystream word): its masked
    zero vector must look uniform mod 2^16 and adjacent coordinates (the two lanes of one
    word) must not be equal or complementary, as they would be if a lane were reused.
    2^16 coordinates: each of 16 bins within 5 standard errors of 1/16; equal or
    summing-to-0 adjacent pairs: expected 1 in 2^15 each, at most 8 allowed."""
    bits, size = 16, 2**16
    masks = prepare_round(4, threshold=3, mode="simulation", seed=5)
    masked = np.asarray(jax.jit(modular.masked_input_mod, static_argnames="bits")(
        jnp.zeros(size, jnp.uint32), masks.party_keys[0], masks.party_nonces[0],
        masks.party_weights[0], bits=bits)).astype(np.int64)
    assert masked.max() < 2**bits
    freq = np.bincount(masked >> 12, minlength=16) / size
    np.testing.assert_allclose(freq, 1 / 16, atol=5 * np.sqrt(1 / 16 * 15 / 16 / size))
    even, odd = masked[0::2], masked[1::2]
    assert np.sum(even == odd) <= 8 and np.sum((even + odd) % 2**bits == 0) <= 8


def _params(n, dim, bits, unit="user", noise="skellam"):
    return ddp_params.choose_parameters(
        noise_multiplier=1.0,
        l2_clip_norm=1.0,
        party_l2_bound=1.0 if unit == "user" else 4.0,
        dim=dim,
        num_parties=n,
        min_honest_survivors=max(1, n - 1),
        bits=bits,
        unit=unit,
        noise=noise,
        wrap_probability=1e-3,
    )


@functools.partial(jax.jit, static_argnames="params")
def _components(x, params, rotation_key, rounding_keys, noise_keys):
    """Every party's rounded vector and noise, recomputed from its keys (one compiled program)."""

    def one(args):
        xu, rounding_key, noise_key = args
        rounded, _ = ddp.party_round(
            xu, params, rotation_key=rotation_key, rounding_key=rounding_key
        )
        return rounded, ddp.party_noise(noise_key, params)[0]

    return jax.lax.map(one, (x, rounding_keys, noise_keys))


def _keys(n, seed):
    return jax.random.split(jax.random.key(seed), n), jax.random.split(jax.random.key(seed + 1), n)


@pytest.mark.parametrize(
    "n, unit, noise, neighbours",
    [
        (2, "user", "skellam", None),
        pytest.param(7, "example", "ddgauss", None, marks=pytest.mark.slow),
        pytest.param(100, "user", "ddgauss", 8, marks=pytest.mark.slow),
    ],
)
def test_decoded_sum_is_the_exact_noisy_integer_sum(n, unit, noise, neighbours):
    dim, bits = 200, 20
    params = _params(n, dim, bits, unit, noise)
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, dim))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * params.party_l2_bound * 0.9
    x = jnp.asarray(x, jnp.float32)
    survivors = list(range(max(n - 1, 2)))  # the last party drops (unless only 2)
    threshold = n // 2 + 1 if neighbours is None else neighbours // 2 + 1
    masks = prepare_round(
        n,
        threshold=threshold,
        num_neighbours=neighbours,
        survivors=survivors,
        mode="simulation",
        seed=n,
    )
    rkey = rotation.rotation_key(seed=1, round_index=n)
    rounding_keys, noise_keys = _keys(n, 10 * n)
    out, report = ddp.ddp_secure_sum(
        {"w": x},
        params=params,
        round_masks=masks,
        rotation_key=rkey,
        rounding_keys=rounding_keys,
        noise_keys=noise_keys,
    )
    assert not np.any(np.asarray(report.rounding_failed))
    assert not np.any(np.asarray(report.noise_failures))
    # The parties' integers, recomputed with their keys; summed exactly in int64.
    rounded, noise = _components(x, params, rkey, rounding_keys, noise_keys)
    rounded, noise = np.asarray(rounded)[survivors], np.asarray(noise)[survivors]
    integer_sum = np.asarray(rounded, np.int64).sum(0) + np.asarray(noise, np.int64).sum(0)
    assert np.max(np.abs(integer_sum)) < 2 ** (bits - 1)  # no wrap at this size
    # Decoding: inverse rotation (dense scipy Hadamard) of the integer sum, divided by gamma.
    size = params.padded_dim
    signs = np.asarray(rotation.random_signs(rkey, size), np.float64)
    want = (signs * (linalg.hadamard(size) / np.sqrt(size) @ integer_sum))[:dim] / params.gamma
    np.testing.assert_allclose(
        np.asarray(out["w"], np.float64), want, atol=1e-5 * np.max(np.abs(want))
    )
    # And within the rounding error of the true sum plus the (unrotated) noise.
    noise_float = signs * (
        linalg.hadamard(size) / np.sqrt(size) @ np.asarray(noise, np.int64).sum(0)
    )
    err = np.asarray(out["w"], np.float64) - np.asarray(x, np.float64)[survivors].sum(0)
    err = err - noise_float[:dim] / params.gamma
    assert np.linalg.norm(err) <= len(survivors) * np.sqrt(size) / params.gamma


def test_a_round_with_a_short_noise_vector_releases_zeros(monkeypatch):
    """A party whose sampler reports unsampled coordinates must not let the round release a
    sum with less noise than accounted: the round releases zeros (the failure depends only
    on noise keys, so the zero release is data-independent)."""
    n, dim, bits = 3, 64, 13  # party noise std ~520: the alias table, quick to compile
    params = _params(n, dim, bits)
    real = ddp.party_noise
    calls = []

    def flaky(noise_key, p):
        noise, failures = real(noise_key, p)
        calls.append(1)
        # every party reports 3 unsampled coordinates (lax.map traces this once)
        return noise, failures + jnp.int32(3)

    x = jnp.asarray(np.full((n, dim), 0.05), jnp.float32)
    masks = prepare_round(n, threshold=2, survivors=list(range(n)), mode="simulation", seed=3)
    rounding_keys, noise_keys = _keys(n, 5)
    rotation_key = rotation.rotation_key(seed=1, round_index=0)

    def secure_sum():  # a fresh jit: traced again, so it sees the patched party_noise
        return jax.jit(lambda x, masks, rk, nk: ddp.ddp_secure_sum(
            {"w": x}, params=params, round_masks=masks, rotation_key=rotation_key,
            rounding_keys=rk, noise_keys=nk))(x, masks, rounding_keys, noise_keys)

    healthy, report = secure_sum()
    assert not np.any(np.asarray(report.noise_failures))
    assert np.any(np.asarray(healthy["w"]) != 0)
    monkeypatch.setattr(ddp, "party_noise", flaky)
    short, report = secure_sum()
    assert calls and np.all(np.asarray(report.noise_failures) == 3)
    np.testing.assert_array_equal(np.asarray(short["w"]), 0.0)


def test_wrap_around_is_handled_modulo_2_to_the_bits():
    # 8 bits: the integer sums wrap; the aggregator's total is still their residue.
    n, dim, bits = 3, 64, 8
    params = _params(n, dim, 16)
    params = ddp_params.DDPParams(**{**params.__dict__, "bits": bits})
    x = jnp.asarray(np.random.default_rng(1).normal(size=(n, dim)) * 0.3, jnp.float32)
    masks = prepare_round(n, threshold=2, mode="simulation", seed=9)
    rkey = rotation.rotation_key(seed=2, round_index=0)
    rounding_keys, noise_keys = _keys(n, 5)
    encode = jax.jit(
        jax.vmap(functools.partial(ddp.party_encode, params=params, rotation_key=rkey))
    )
    encoded, _ = encode(x, rounding_key=rounding_keys, noise_key=noise_keys)
    total = modular.secure_sum_mod(encoded, bits=bits, round_masks=masks)
    rounded, noise = _components(x, params, rkey, rounding_keys, noise_keys)
    integer_sum = np.asarray(rounded, np.int64).sum(0) + np.asarray(noise, np.int64).sum(0)
    assert np.max(np.abs(integer_sum)) >= 2 ** (bits - 1)  # it did wrap
    np.testing.assert_array_equal(np.asarray(total, np.int64), integer_sum % 2**bits)


def test_aggregator_sees_only_masked_inputs_and_unmasking_seeds(monkeypatch):
    names = list(inspect.signature(modular.aggregate_masked_mod).parameters)
    assert names == ["masked_inputs", "unmask_keys", "unmask_nonces", "unmask_weights", "bits"]
    seen = []
    original = modular.aggregate_masked_mod

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(ddp.modular, "aggregate_masked_mod", spy)
    n, dim = 3, 40
    params = _params(n, dim, 16)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(n, dim)) * 0.2, jnp.float32)
    masks = prepare_round(n, threshold=2, mode="simulation", seed=4)
    rounding_keys, noise_keys = _keys(n, 7)
    ddp.ddp_secure_sum(
        x,
        params=params,
        round_masks=masks,
        rotation_key=jax.random.key(0),
        rounding_keys=rounding_keys,
        noise_keys=noise_keys,
    )
    ((args, kwargs),) = seen
    assert kwargs == {"bits": 16}
    masked, *seeds = args
    assert masked.shape == (n, params.padded_dim) and masked.dtype == jnp.uint32
    for got, want in zip(
        seeds, (masks.unmask_keys, masks.unmask_nonces, masks.unmask_weights), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    # The masked inputs are not the parties' encodings (those never reach it).
    encoded = ddp.party_encode(
        x[0],
        params,
        rotation_key=jax.random.key(0),
        rounding_key=rounding_keys[0],
        noise_key=noise_keys[0],
    )[0]
    assert np.mean(np.asarray(masked[0]) == np.asarray(encoded)) < 0.01

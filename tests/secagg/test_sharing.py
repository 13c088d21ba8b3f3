"""Additive n-of-n sharing: exact reconstruction, and n-1 shares reveal nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dpjax.secagg import fresh_seed, reconstruct, share

# Module-level so that jit's cache is reused across hypothesis examples.
_vmapped_share = jax.jit(jax.vmap(share, in_axes=(0, None, 0)), static_argnums=1)
_vmapped_reconstruct = jax.jit(jax.vmap(reconstruct))
shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


def _uint32_array(shape, seed):
    rng = np.random.default_rng(seed)
    # Values near the top of Z_2^32 make the share sums wrap around.
    return rng.integers(2**32 - 1000, 2**32, shape, dtype=np.uint64).astype(np.uint32) ^ (
        rng.integers(0, 2, shape, dtype=np.uint32) << np.uint32(31)
    )


# Each new (shape, num_parties) compiles (~1 s), hence the small example counts.
@settings(max_examples=8)
@given(shape=shapes, num_parties=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_reconstruct_inverts_share_under_jit(shape, num_parties, seed):
    x = _uint32_array(shape, seed)
    shares = jax.jit(share, static_argnums=1)(x, num_parties, jax.random.key(seed))
    assert shares.shape == (num_parties, *shape) and shares.dtype == jnp.uint32
    np.testing.assert_array_equal(jax.jit(reconstruct)(shares), x)


@settings(max_examples=6)
@given(num_parties=st.sampled_from([2, 5]), seed=st.integers(0, 2**31 - 1))
def test_reconstruct_inverts_share_under_vmap(num_parties, seed):
    xs = _uint32_array((3, 4), seed)
    keys = jax.random.split(jax.random.key(seed), 3)
    shares = _vmapped_share(xs, num_parties, keys)
    np.testing.assert_array_equal(_vmapped_reconstruct(shares), xs)


def test_secure_seed_shares_reconstruct():
    x = jnp.arange(10, dtype=jnp.uint32)
    np.testing.assert_array_equal(reconstruct(share(x, 4, fresh_seed())), x)


def test_first_n_minus_1_shares_do_not_depend_on_the_secret():
    key = fresh_seed()
    a = share(jnp.zeros(64, jnp.uint32), 5, key)
    b = share(jnp.full(64, 2**31 - 1, jnp.uint32), 5, key)
    np.testing.assert_array_equal(a[:-1], b[:-1])
    assert not np.array_equal(a[-1], b[-1])


@pytest.mark.parametrize("secret", [0, 2**31 - 1])
def test_last_share_is_uniform_chi_square(secret):
    # 2^16 shares binned by their top 8 bits: chi-square with 255 degrees of
    # freedom; a uniform share exceeds the 1e-4 upper quantile with prob 1e-4.
    num = 2**16
    shares = share(jnp.full(num, secret, jnp.uint32), 3, jax.random.key(7))
    counts = np.bincount(np.asarray(shares[-1]) >> 24, minlength=256)
    chi2 = ((counts - num / 256) ** 2 / (num / 256)).sum()
    assert chi2 < stats.chi2.ppf(1 - 1e-4, df=255)


def test_share_rejects_floats_and_bad_keys():
    with pytest.raises(ValueError, match="uint32"):
        share(jnp.ones(3, jnp.float32), 2, fresh_seed())
    with pytest.raises(ValueError, match="key"):
        share(jnp.ones(3, jnp.uint32), 2, jnp.zeros(2, jnp.uint32))

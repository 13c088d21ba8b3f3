"""Random rotations: orthogonal, invertible, shared within a round, fresh across rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from dpjax.secagg import rotation


def _signs(key, size):
    return np.asarray(rotation.random_signs(key, size), np.float64)


# jitted, as the training step runs them (and one compilation instead of op-by-op dispatch)
_rotate = jax.jit(rotation.rotate, static_argnums=2)
_unrotate = jax.jit(rotation.unrotate, static_argnums=(2, 3))


@pytest.mark.parametrize("dim", [1, 7, 1000, 1024])
def test_hadamard_rotation_matches_the_dense_matrix(dim):
    size = rotation.padded_dim(dim)
    assert size == 2 ** int(np.ceil(np.log2(dim))) and size >= dim
    x = np.random.default_rng(dim).normal(size=dim)
    key = jax.random.key(3)
    got = np.asarray(_rotate(jnp.asarray(x, jnp.float32), key, "hadamard"), np.float64)
    dense = linalg.hadamard(size) / np.sqrt(size)  # scipy's Sylvester Hadamard, independent
    want = dense @ (_signs(key, size) * np.pad(x, (0, size - dim)))
    err = np.linalg.norm(got - want)
    assert err <= rotation.float_error_bound(dim) * np.linalg.norm(x) + 1e-30


@pytest.mark.parametrize("kind", ["hadamard", "dft"])
@pytest.mark.parametrize("dim", [6, 999, 4096])
def test_rotation_is_orthogonal_and_invertible(kind, dim):
    x = jnp.asarray(np.random.default_rng(dim).normal(size=dim), jnp.float32)
    key = jax.random.key(4)
    y = _rotate(x, key, kind)
    assert y.shape == (rotation.padded_dim(dim, kind),)
    bound = rotation.float_error_bound(dim, kind)
    norm_x = float(np.linalg.norm(np.asarray(x, np.float64)))
    assert abs(float(np.linalg.norm(np.asarray(y, np.float64))) - norm_x) <= bound * norm_x
    back = _unrotate(y, key, dim, kind)
    assert float(np.linalg.norm(np.asarray(back - x, np.float64))) <= 2 * bound * norm_x


def test_dft_rotation_is_flat_and_orthogonal_as_a_matrix():
    dim = 10
    key = jax.random.key(5)
    columns = np.stack(
        [np.asarray(rotation.rotate(jnp.eye(dim)[i], key, "dft")) for i in range(dim)], 1
    )
    np.testing.assert_allclose(columns.T @ columns, np.eye(dim), atol=1e-6)
    assert np.max(columns**2) <= rotation.flatness("dft") / dim + 1e-6


def test_same_rotation_for_every_party_of_a_round_fresh_across_rounds():
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(5, 300)), jnp.float32)
    key = rotation.rotation_key(seed=7, round_index=12)
    rotate = jax.jit(lambda x, k: rotation.rotate(x, k))  # one compilation, not op by op
    per_party = jax.jit(jax.vmap(rotation.rotate, in_axes=(0, None)))(xs, key)
    # Rotations add up: sum of rotated = rotated sum (linear, same signs for all).
    np.testing.assert_allclose(per_party.sum(0), rotate(xs.sum(0), key), atol=1e-4)
    again = rotate(xs[0], rotation.rotation_key(seed=7, round_index=12))
    np.testing.assert_array_equal(per_party[0], again)
    other_round = rotate(xs[0], rotation.rotation_key(seed=7, round_index=13))
    high_round = rotate(xs[0], rotation.rotation_key(seed=7, round_index=12 + 2**32))
    assert float(jnp.max(jnp.abs(other_round - per_party[0]))) > 1e-2
    assert float(jnp.max(jnp.abs(high_round - per_party[0]))) > 1e-2

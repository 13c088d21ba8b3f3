"""secure_sum: matches the plain sum within the quantization bound, under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.secagg import prepare_round, quantization_error_bound, secure_sum

N, SCALE, MAX_ABS = 5, 2.0**16, 4.0


def _updates(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.uniform(-MAX_ABS, MAX_ABS, (N, 3, 4)), jnp.float32),
        "b": jnp.asarray(rng.uniform(-MAX_ABS, MAX_ABS, (N, 7)), jnp.float32),
    }


def _bound(total):
    # n / scale from rounding, plus float32 rounding of sums of size ~N * MAX_ABS.
    return quantization_error_bound(N, SCALE) + 2.0**-22 * N * MAX_ABS


@pytest.fixture(scope="module")
def masks_with_dropout():
    return prepare_round(N, threshold=3, survivors=[0, 2, 3, 4], mode="simulation", seed=11)


def test_jitted_secure_sum_matches_plain_sum_of_survivors(masks_with_dropout):
    updates = _updates()
    step = jax.jit(
        lambda u, m, k: secure_sum(u, scale=SCALE, round_masks=m, max_abs=MAX_ABS, rounding_key=k)
    )
    got = step(updates, masks_with_dropout, jax.random.key(0))
    for name, leaf in updates.items():
        plain = jnp.sum(leaf[jnp.array([0, 2, 3, 4])], axis=0)
        assert got[name].shape == plain.shape and got[name].dtype == plain.dtype
        assert float(jnp.max(jnp.abs(got[name] - plain))) <= _bound(plain)
        # Dropping party 1 matters: the full sum is far from the survivors' sum.
        assert float(jnp.max(jnp.abs(got[name] - jnp.sum(leaf, axis=0)))) > 1e-2


def test_secure_sum_without_dropouts_in_secure_mode():
    updates = _updates(1)
    got = secure_sum(updates, scale=SCALE, round_masks=prepare_round(N, threshold=3))
    for name, leaf in updates.items():
        assert float(jnp.max(jnp.abs(got[name] - jnp.sum(leaf, axis=0)))) <= _bound(None)


def test_secure_sum_refuses_a_scale_that_could_wrap(masks_with_dropout):
    with pytest.raises(ValueError, match=r"2\^31"):
        secure_sum(_updates(), scale=2.0**29, round_masks=masks_with_dropout)


def test_secure_sum_inside_jit_requires_max_abs(masks_with_dropout):
    with pytest.raises(ValueError, match="max_abs"):
        jax.jit(lambda u, m: secure_sum(u, scale=SCALE, round_masks=m))(
            _updates(), masks_with_dropout
        )


def test_secure_sum_checks_party_count(masks_with_dropout):
    updates = {"w": jnp.zeros((N + 1, 2))}
    with pytest.raises(ValueError, match="round_masks for 6 parties, got 5"):
        secure_sum(updates, scale=SCALE, round_masks=masks_with_dropout)

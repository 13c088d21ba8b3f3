import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpjax


def _zeros():
    # 3 leaves, 120_000 coordinates in all
    return {"a": jnp.zeros((100, 1000)), "b": jnp.zeros((19_000,)), "c": jnp.zeros((1000,))}


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def test_noise_std_is_sigma_c_over_b_and_mean_is_zero():
    sigma, c, b = 1.3, 0.7, 64.0
    out = _flat(dpjax.privatize(_zeros(), jax.random.PRNGKey(0), noise_multiplier=sigma,
                                l2_clip_norm=c, expected_batch_size=b))
    n = out.size
    assert n >= 100_000
    expected_std = sigma * c / b
    # 2% band on the std: its relative standard error at n=1.2e5 is 1/sqrt(2n) = 0.2%
    assert abs(out.std() / expected_std - 1) < 0.02
    # mean within 4 standard errors of 0
    assert abs(out.mean()) < 4 * expected_std / np.sqrt(n)


def test_noise_is_added_to_the_sum_then_divided_by_the_expected_batch_size():
    s = {"w": jnp.full((4,), 8.0)}
    out = dpjax.privatize(s, jax.random.PRNGKey(1), noise_multiplier=0.0, l2_clip_norm=1.0,
                          expected_batch_size=4.0)
    np.testing.assert_array_equal(out["w"], 2.0)


def test_per_layer_bounds_use_the_combined_sensitivity():
    bounds = {"a": 0.3, "b": 0.4, "c": 1.2}  # sqrt(0.09 + 0.16 + 1.44) = 1.3
    out = _flat(dpjax.privatize(_zeros(), jax.random.PRNGKey(2), noise_multiplier=1.0,
                                l2_clip_norm=bounds, expected_batch_size=1.0))
    assert abs(out.std() / 1.3 - 1) < 0.02


def test_same_key_gives_the_same_noise_and_steps_give_uncorrelated_noise():
    key = jax.random.PRNGKey(3)
    kw = dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0)
    a = _flat(dpjax.privatize(_zeros(), jax.random.fold_in(key, 7), **kw))
    a2 = _flat(dpjax.privatize(_zeros(), jax.random.fold_in(key, 7), **kw))
    b = _flat(dpjax.privatize(_zeros(), jax.random.fold_in(key, 8), **kw))
    np.testing.assert_array_equal(a, a2)
    # for independent N(0,1) vectors of n=1.2e5 the correlation has std 1/sqrt(n) ~ 0.003
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(a.size)


def test_leaves_get_independent_noise():
    same = {"a": jnp.zeros((50_000,)), "b": jnp.zeros((50_000,))}
    out = dpjax.privatize(same, jax.random.PRNGKey(4), noise_multiplier=1.0, l2_clip_norm=1.0,
                          expected_batch_size=1.0)
    assert abs(np.corrcoef(out["a"], out["b"])[0, 1]) < 4 / np.sqrt(50_000)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_multiplier=-0.1, l2_clip_norm=1.0, expected_batch_size=1.0),
         "noise_multiplier=-0.1"),
        (dict(noise_multiplier=1.0, l2_clip_norm=0.0, expected_batch_size=1.0), "l2_clip_norm=0.0"),
        (dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=0.0),
         "expected_batch_size=0.0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpjax.privatize(_zeros(), jax.random.PRNGKey(0), **kwargs)

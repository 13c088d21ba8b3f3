import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from dpjax.clipping import (
    count_nonfinite,
    per_example_grads,
    per_layer_clip_norms,
    sensitivity,
)

tree_leaves = jax.tree_util.tree_leaves


def _loop_grads(loss_fn, params, batch):
    """Reference: jax.grad on one example at a time."""
    x, y = batch
    one = jax.jit(jax.grad(lambda p, xi, yi: loss_fn(p, (xi, yi))[0]))
    return [one(params, x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in tree_leaves(tree)])


def _reference_clipped_sum(loss_fn, params, batch, mask, c):
    total = 0.0
    norms = []
    for i, g in enumerate(_loop_grads(loss_fn, params, batch)):
        v = _flat(g).astype(np.float64)
        n = np.linalg.norm(v)
        norms.append(n)
        if mask[i] and np.isfinite(n):
            total = total + v * min(1.0, c / n)
    return total, np.array(norms)


@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem"])
def test_per_example_grads_equal_a_loop_of_single_example_grads(problem, request):
    loss_fn, params, batch = request.getfixturevalue(problem)
    stacked = jax.jit(per_example_grads, static_argnums=0)(loss_fn, params, batch)
    for i, ref in enumerate(_loop_grads(loss_fn, params, batch)):
        got = _flat(jax.tree_util.tree_map(lambda a, i=i: a[i], stacked))
        # rtol 1e-5 on the whole gradient vector (float32 convolutions sum in other orders)
        assert np.linalg.norm(got - _flat(ref)) <= 1e-5 * np.linalg.norm(_flat(ref))


@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem"])
def test_clipped_sum_matches_reference_and_every_row_is_bounded(problem, request):
    loss_fn, params, batch = request.getfixturevalue(problem)
    b = batch[0].shape[0]
    c = 0.5
    mask = np.ones(b, np.float32)
    mask[-2:] = 0
    f = dpjax.clipped_grad(loss_fn, l2_clip_norm=c)
    clipped_sum, norms = f(params, batch, mask)
    ref_sum, ref_norms = _reference_clipped_sum(loss_fn, params, batch, mask, c)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
    np.testing.assert_allclose(_flat(clipped_sum), ref_sum, rtol=1e-5, atol=1e-6)
    # each row alone: contribution norm <= C (1 + 1e-6)
    for i in range(b):
        one = np.zeros(b, np.float32)
        one[i] = 1.0
        s, _ = f(params, batch, one)
        assert np.linalg.norm(_flat(s)) <= c * (1 + 1e-6)


def test_rows_under_the_bound_are_unchanged(mlp_problem):
    loss_fn, params, batch = mlp_problem
    b = batch[0].shape[0]
    big = 1e6
    s, _ = dpjax.clipped_grad(loss_fn, l2_clip_norm=big)(params, batch, jnp.ones(b))
    unclipped = sum(_flat(g) for g in _loop_grads(loss_fn, params, batch))
    np.testing.assert_allclose(_flat(s), unclipped, rtol=1e-5, atol=1e-7)


def test_masked_rows_contribute_exactly_zero(mlp_problem):
    loss_fn, params, (x, y) = mlp_problem
    f = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0)
    mask = jnp.zeros(x.shape[0]).at[:3].set(1.0)
    s_masked, _ = f(params, (x, y), mask)
    # garbage (huge values) in masked rows changes nothing
    x2 = x.at[3:].set(1e4)
    s_garbage, _ = f(params, (x2, y), mask)
    np.testing.assert_array_equal(_flat(s_masked), _flat(s_garbage))
    s_none, _ = f(params, (x, y), jnp.zeros(x.shape[0]))
    assert np.all(_flat(s_none) == 0)


def test_nan_rows_contribute_zero_and_are_counted(mlp_problem):
    loss_fn, params, (x, y) = mlp_problem
    f = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0)
    mask = jnp.ones(x.shape[0])
    clean, _ = f(params, (x, y), mask.at[0].set(0).at[1].set(0))
    x_bad = x.at[0].set(jnp.nan).at[1].set(jnp.inf)
    s, norms = f(params, (x_bad, y), mask)
    assert np.all(np.isfinite(_flat(s)))
    np.testing.assert_allclose(_flat(s), _flat(clean), rtol=1e-6, atol=1e-7)
    assert int(count_nonfinite(norms, mask)) == 2
    assert int(count_nonfinite(norms, mask.at[0].set(0))) == 1


def test_per_layer_clipping_bounds_each_layer_and_reports_the_combined_sensitivity(mlp_problem):
    loss_fn, params, (x, y) = mlp_problem
    bounds = per_layer_clip_norms({"params": params}, 1.0)["params"]
    assert sensitivity(bounds) == pytest.approx(1.0)
    bounds = {k: 0.01 * (i + 1) for i, k in enumerate(sorted(params))}
    f = dpjax.clipped_grad(loss_fn, l2_clip_norm=bounds)
    b = x.shape[0]
    for i in range(b):
        s, _ = f(params, (x, y), jnp.zeros(b).at[i].set(1.0))
        for layer, c in bounds.items():
            assert np.linalg.norm(_flat(s[layer])) <= c * (1 + 1e-6)
    assert sensitivity(bounds) == pytest.approx(np.sqrt(sum(c**2 for c in bounds.values())))
    # a layer whose gradient is under its bound is unchanged
    loose = {k: 1e6 for k in params}
    s, _ = dpjax.clipped_grad(loss_fn, l2_clip_norm=loose)(params, (x, y), jnp.ones(b))
    ref = sum(_flat(g) for g in _loop_grads(loss_fn, params, (x, y)))
    np.testing.assert_allclose(_flat(s), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("per_layer", [False, True])
def test_microbatched_and_unbatched_results_agree(mlp_problem, per_layer):
    loss_fn, params, (x, y) = mlp_problem
    c = {k: 0.3 for k in params} if per_layer else 0.3
    mask = jnp.ones(x.shape[0]).at[5].set(0.0)
    full = dpjax.clipped_grad(loss_fn, l2_clip_norm=c)(params, (x, y), mask)
    micro = dpjax.clipped_grad(loss_fn, l2_clip_norm=c, microbatch_size=4)(params, (x, y), mask)
    np.testing.assert_allclose(_flat(micro[0]), _flat(full[0]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(micro[1], full[1], rtol=1e-5)


def test_works_for_a_plain_dict_of_arrays():
    def loss_fn(params, batch):
        return (batch @ params["w"] + params["b"]) ** 2

    params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}
    batch = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    s, norms = dpjax.clipped_grad(loss_fn, l2_clip_norm=100.0)(params, batch, jnp.ones(2))
    # row 0: r=1.5, grad w = 2r x = [3, 0], grad b = 3; row 1: r=6.5, grad w=[0, 39], b=13
    np.testing.assert_allclose(s["w"], [3.0, 39.0], rtol=1e-6)
    np.testing.assert_allclose(s["b"], 16.0, rtol=1e-6)
    np.testing.assert_allclose(norms, [np.sqrt(18), np.sqrt(39**2 + 13**2)], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"l2_clip_norm": 0.0}, "l2_clip_norm=0.0"),
        ({"l2_clip_norm": -1.0}, "l2_clip_norm=-1.0"),
        ({"l2_clip_norm": float("nan")}, "l2_clip_norm=nan"),
        ({"l2_clip_norm": float("inf")}, "l2_clip_norm=inf"),
        ({"l2_clip_norm": 1.0, "microbatch_size": 0}, "microbatch_size=0"),
        ({"l2_clip_norm": 1.0, "method": "magic"}, "method='magic'"),
    ],
)
def test_bad_arguments_raise_before_compute(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpjax.clipped_grad(lambda p, b: b, **kwargs)


def test_mask_shape_must_match_the_batch(mlp_problem):
    loss_fn, params, batch = mlp_problem
    f = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0)
    with pytest.raises(ValueError, match=r"mask.shape=\(12,\)"):
        f(params, batch, jnp.ones(5))


def test_microbatch_size_must_divide_the_batch(mlp_problem):
    loss_fn, params, batch = mlp_problem
    f = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, microbatch_size=5)
    with pytest.raises(ValueError, match="microbatch_size=5"):
        f(params, batch, jnp.ones(12))

"""The three constructions that made the Linen fast path under-clip, measured through the library.

Each test measures what a step audit will see: the largest change of the
clipped sum when one example is added or removed (at most ``C``), replaced
(at most ``2 C``), or when the data of a masked row changes (exactly 0).

(a) a layer that sees a time-major input ``[T, B, d]`` with ``T == B`` (and a
    learned positional table fed to a Dense layer, ``T == B``): the batch axis
    is followed through the transposes, never guessed from sizes;
(b) a ghost norm that cancels in float32: an input ``512 * 1`` seen twice with
    per-example loss weights ``(4096, -4096 + 1/16)``; the rounding bound keeps
    the reported norm at the true 128;
(c) a loss that centres its input with the batch mean: refused, because the
    loss mixes examples.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import clipping
from dpjax.fast_clipping import RHO, discover
from dpjax.models.check import BatchMixingError

C = 1.0
TOL = 1e-5  # float32 sums


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in jax.tree_util.tree_leaves(tree)])


def neighbour_changes(f, params, batch, mask, row: int, replacements) -> dict[str, float]:
    """Norms of the change of ``f(params, batch, mask)[0]`` for the neighbours at ``row``.

    ``remove``: the row's mask set to 0; ``replace_k``: its data replaced by
    ``replacements[k]`` (a tuple of per-leaf rows); ``masked_k``: the same
    replacement while the row is masked.
    """
    base = _flat(f(params, batch, mask)[0])
    removed_mask = mask.at[row].set(0.0)
    removed = _flat(f(params, batch, removed_mask)[0])
    out = {"remove": float(np.linalg.norm(base - removed))}
    for k, new in enumerate(replacements):
        swapped = jax.tree_util.tree_map(lambda a, r: a.at[row].set(r), batch, new)
        out[f"replace_{k}"] = float(np.linalg.norm(base - _flat(f(params, swapped, mask)[0])))
        masked = _flat(f(params, swapped, removed_mask)[0])
        out[f"masked_{k}"] = float(np.linalg.norm(removed - masked))
    return out


def _assert_neighbours_bounded(changes: dict[str, float]) -> None:
    for name, change in changes.items():
        if name == "remove":
            assert change <= C * (1 + TOL), changes
        elif name.startswith("replace"):
            assert change <= 2 * C * (1 + TOL), changes
        else:
            assert change == 0.0, changes


class TimeMajor(nn.Module):
    """Transposes to [T, B, d] before its layers (as a time-major RNN library would)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.swapaxes(x, 0, 1)  # [T, B, d]; T == B in the test
        h = nn.Dense(6)(nn.LayerNorm()(h))
        return nn.Dense(3)(jnp.mean(jnp.tanh(jnp.swapaxes(h, 0, 1)), axis=1))


class PositionTable(nn.Module):
    """A learned [T, d] table sent through a Dense layer and added to every example."""

    length: int = 8

    @nn.compact
    def __call__(self, x):
        pos = self.param("pos", nn.initializers.normal(1.0), (self.length, x.shape[-1]))
        h = x + nn.Dense(x.shape[-1])(pos)  # the Dense sees [T, d] with T == B: no batch axis
        return nn.Dense(3)(jnp.mean(jnp.tanh(h), axis=1))


def _problem(model, b=8, t=8, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, b), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"]
    return optax_loss(model), params, (x, y)


def optax_loss(model):
    def loss_fn(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": params}, x), y)

    return loss_fn


def _replacements(batch, scale=100.0):
    x, y = batch
    return [(x[3] * scale, y[3]), (-x[5], (y[5] + 1) % 3)]


@pytest.mark.parametrize("model", [TimeMajor(), PositionTable()], ids=["time_major", "pos_table"])
def test_a_batch_axis_swapped_with_an_equal_sized_axis_is_followed(model):
    loss_fn, params, batch = _problem(model)
    plan = discover(loss_fn, params, batch)
    if isinstance(model, TimeMajor):  # the first Dense kernel sees the examples on axis 1
        use = next(lp for lp in plan.leaves if lp.name == "['Dense_0']['kernel']").uses[0]
        assert use.layout.x_state.axis == 1
    else:  # the table and the Dense that reads it are parameters composed before the batch
        assert plan.describe()["['pos']"] == "per-example: add"
    mask = jnp.ones(8)
    fast = clipping.clipped_grad(loss_fn, l2_clip_norm=C, method="fast")
    vmap = clipping.clipped_grad(loss_fn, l2_clip_norm=C, method="vmap")
    (s_fast, n_fast), (s_vmap, n_vmap) = fast(params, batch, mask), vmap(params, batch, mask)
    assert np.max(n_vmap) > C  # clipping is active
    np.testing.assert_allclose(n_fast, n_vmap, rtol=1e-5)
    np.testing.assert_allclose(_flat(s_fast), _flat(s_vmap), rtol=1e-5, atol=1e-6)
    for row in (0, 7):
        _assert_neighbours_bounded(neighbour_changes(fast, params, batch, mask, row,
                                                     _replacements(batch)))


class Cancel(nn.Module):
    """A bias-free Dense at two positions; the batch carries per-position loss weights."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, use_bias=False)(x)  # [B, 2, 4] -> [B, 2, 4]


def _cancel_problem(b=4):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, 2, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((b, 2)), jnp.float32)
    x = x.at[0].set(512.0)  # example 0: the input 512 * 1 at both positions ...
    w = w.at[0].set(jnp.array([4096.0, -4096.0 + 1 / 16]))  # ... with cancelling weights
    params = jax.jit(Cancel().init)(jax.random.PRNGKey(0), x)["params"]

    def loss_fn(params, batch):
        x, w = batch
        return jnp.sum(w[:, :, None] * Cancel().apply({"params": params}, x), axis=(1, 2))

    return loss_fn, params, (x, w)


def test_b_a_cancelling_ghost_norm_is_not_reported_below_the_true_norm():
    loss_fn, params, batch = _cancel_problem()
    assert discover(loss_fn, params, batch).describe()["['Dense_0']['kernel']"] == "dense: ghost"
    true_norm = 512 * (1 / 16) * np.sqrt(4 * 4)  # ||(512 * 1) (x) (1/16 * 1)||_F = 128
    fast = clipping.clipped_grad(loss_fn, l2_clip_norm=C, method="fast")
    alone = jnp.zeros(4).at[0].set(1.0)
    summed, norms = fast(params, batch, alone)
    assert norms[0] >= (1 - RHO) * true_norm
    assert np.linalg.norm(_flat(summed)) <= C * (1 + TOL)
    # The float32 ghost identity alone is off by half the true squared norm or more (0 here).
    x = batch[0][0]
    g = batch[1][0][:, None] * jnp.ones((2, 4))
    raw = jax.jit(lambda x, g: jnp.sum((x @ x.T) * (g @ g.T)))(x, g)
    assert abs(float(raw) - true_norm**2) >= 0.5 * true_norm**2
    _assert_neighbours_bounded(neighbour_changes(
        fast, params, batch, jnp.ones(4), 0, [(batch[0][1], batch[1][1])]))
    replaced = jax.tree_util.tree_map(lambda a: a.at[1].set(a[0]), batch)
    _assert_neighbours_bounded(neighbour_changes(
        fast, params, replaced, jnp.ones(4), 1, [(batch[0][2], batch[1][2])]))


def _centred_problem(b=6):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, b), jnp.int32)
    model = nn.Dense(3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]

    def loss_fn(params, batch):
        x, y = batch
        centred = x - jnp.mean(x, axis=0)  # batch statistics: rows depend on every example
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": params}, centred), y)

    return loss_fn, params, (x, y)


@pytest.mark.parametrize("method", ["fast", "auto"])
def test_c_a_loss_centred_with_the_batch_mean_is_refused(method):
    loss_fn, params, batch = _centred_problem()
    f = clipping.clipped_grad(loss_fn, l2_clip_norm=C, method=method)
    with pytest.raises(BatchMixingError, match="reduce_sum.* reduces over the batch axis"):
        f(params, batch, jnp.ones(6))


def test_c_the_vmap_path_evaluates_each_example_alone_so_masked_rows_cannot_move_the_sum():
    loss_fn, params, batch = _centred_problem()
    vmap = clipping.clipped_grad(loss_fn, l2_clip_norm=C, method="vmap")
    x, y = batch
    changes = neighbour_changes(vmap, params, batch, jnp.ones(6), 2,
                                [(x[2] * 1e3, y[2]), (x[4] - 7.0, (y[2] + 1) % 3)])
    _assert_neighbours_bounded(changes)

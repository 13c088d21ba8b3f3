"""The fast clipping path gives the vmap path's numbers, for Linen, NNX, Equinox and plain JAX."""

from __future__ import annotations

import functools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpjax import clipping
from dpjax.fast_clipping import describe, use_ghost
from dpjax.models.nets import CNN1D, DPCNN, MLP
from dpjax.train import cross_entropy_loss

RTOL = 1e-5
B = 9


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


# --- Flax Linen -----------------------------------------------------------------------------


class Block(nn.Module):
    """Embedding + pre-LN multi-head attention + MLP + readout."""

    vocab: int = 11
    d: int = 8
    heads: int = 2
    num_classes: int = 3

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d)(ids)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        h = nn.Dense(4 * self.d)(nn.LayerNorm()(x))
        x = x + nn.Dense(self.d)(nn.gelu(h))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=1))


class Scale(nn.Module):
    """A parameterized layer of no known kind: y = x * w + c."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1],))
        c = self.param("c", nn.initializers.normal(1.0), (1,))
        return x * w + c


class CustomNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Scale()(x.reshape((x.shape[0], -1)))
        return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


class TiedLM(nn.Module):
    """Embedding reused as the readout (``attend``): the table has two uses."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(7, 8)
        h = nn.GroupNorm(num_groups=2)(nn.Dense(8)(embed(ids)))
        return embed.attend(jnp.mean(h, axis=1))


class Mixed(nn.Module):
    """Two Dense layers on [B, 8, .]: one takes the ghost branch, one the direct one."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(64)(x)  # 2 * 8^2 = 128 < 16 * 64
        return jnp.mean(nn.Dense(2)(jnp.tanh(h)), axis=1)  # 128 >= 64 * 2


class Cell(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return nn.tanh(nn.Dense(6)(c)), None


class ScanNet(nn.Module):
    """A Dense cell repeated by ``nn.scan`` (params stacked on a leading axis)."""

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        c, _ = scan()(x.reshape((x.shape[0], -1))[:, :6], None)
        return nn.Dense(3)(c)


class Ensemble(nn.Module):
    """``nn.vmap`` over an ensemble axis: a dot_general with a parameter batch dimension."""

    @nn.compact
    def __call__(self, x):
        dense = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=1, out_axes=1)
        return jnp.sum(dense(3)(x), axis=1)


class FeatureNorm(nn.Module):
    """LayerNorm with its scale and bias on the second-to-last axis."""

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(feature_axes=-2, reduction_axes=(-2, -1))(x)
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def _linen(model, x, num_classes, seed=0):
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"]  # one compile, not per op
    y = jnp.arange(x.shape[0]) % num_classes
    return cross_entropy_loss(model.apply), params, (x, y)


# --- Flax NNX -------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(20, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x.reshape((x.shape[0], -1)))))


class NnxCNN(nnx.Module):
    """Strided, dilated and grouped convolutions, GroupNorm, Linear."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(2, 8, (3, 3), strides=2, rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), kernel_dilation=2, feature_group_count=4, rngs=rngs)
        self.norm = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = self.norm(self.c2(jax.nn.relu(self.c1(x))))
        return self.out(jnp.mean(h, axis=(1, 2)))


class NnxBlock(nnx.Module):
    def __init__(self, rngs, vocab=11, d=8):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)
        self.head = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.attn(self.ln1(x))
        x = x + self.down(jax.nn.gelu(self.up(self.ln2(x))))
        return self.head(jnp.mean(x, axis=1))


def _nnx(module_cls, x, num_classes):
    graphdef, state = nnx.split(nnx.jit(lambda: module_cls(nnx.Rngs(0)))(), nnx.Param)

    def loss_fn(state, batch):
        x, y = batch
        return _ce(nnx.merge(graphdef, state)(x), y)

    return loss_fn, state, (x, jnp.arange(x.shape[0]) % num_classes)


# --- Equinox and plain functions ------------------------------------------------------------


class EqxCNN(eqx.Module):
    conv: eqx.nn.Conv2d
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(2, 4, 3, stride=2, key=k1)
        self.out = eqx.nn.Linear(4, 3, key=k2)

    def __call__(self, x):  # one example [C, H, W]
        return self.out(jnp.mean(jax.nn.relu(self.conv(x)), axis=(1, 2)))


def _eqx(make, x, num_classes):
    params, static = eqx.partition(eqx.filter_jit(make)(jax.random.PRNGKey(0)), eqx.is_array)

    def loss_fn(params, batch):
        x, y = batch
        return _ce(jax.vmap(eqx.combine(params, static))(x), y)

    return loss_fn, params, (x, jnp.arange(x.shape[0]) % num_classes)


def _dict_mlp(x, num_classes=3):
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.standard_normal((x.shape[1], 8)) / 2, jnp.float32),
              "b1": jnp.full((8,), 0.1),
              "w2": jnp.asarray(rng.standard_normal((8, num_classes)), jnp.float32),
              "b2": jnp.zeros(num_classes)}

    def loss_fn(p, batch):
        x, y = batch
        return _ce(jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"], y)

    return loss_fn, params, (x, jnp.arange(x.shape[0]) % num_classes)


def _lora(x, num_classes=3):
    """A frozen kernel (closed over) plus a trainable low-rank product, used merged."""
    rng = np.random.default_rng(1)
    frozen = jnp.asarray(rng.standard_normal((x.shape[1], num_classes)), jnp.float32)
    params = {"a": jnp.asarray(rng.standard_normal((x.shape[1], 2)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal((2, num_classes)), jnp.float32)}

    def loss_fn(p, batch):
        x, y = batch
        return _ce(x @ (frozen + p["a"] @ p["b"]), y)

    return loss_fn, params, (x, jnp.arange(x.shape[0]) % num_classes)


def _images(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _tokens(b, t, vocab, seed=2):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def _mask(b, seed=3):
    m = (np.random.default_rng(seed).uniform(size=b) < 0.75).astype(np.float32)
    m[0] = 1.0
    return jnp.asarray(m)


CASES = {
    "mlp": lambda b: _linen(MLP(hidden=(32, 16)), _images((b, 4, 5)), 10),
    "dpcnn": lambda b: _linen(DPCNN(), _images((b, 16, 16, 1)), 10),
    "cnn1d": lambda b: _linen(CNN1D(channels=(8, 8, 8)), _images((b, 24)), 10),
    "transformer": lambda b: _linen(Block(), _tokens(b, 5, 11), 3),
    "custom": lambda b: _linen(CustomNet(), _images((b, 6)), 3),
    "tied": lambda b: _linen(TiedLM(), _tokens(b, 5, 7), 7),
    "mixed": lambda b: _linen(Mixed(), _images((b, 8, 16)), 2),
    "scan": lambda b: _linen(ScanNet(), _images((b, 8)), 3),
    "ensemble": lambda b: _linen(Ensemble(), _images((b, 2, 6)), 3),
    "feature_norm": lambda b: _linen(FeatureNorm(), _images((b, 3, 4)), 3),
    "nnx_mlp": lambda b: _nnx(NnxMLP, _images((b, 4, 5)), 10),
    "nnx_cnn": lambda b: _nnx(NnxCNN, _images((b, 12, 12, 2)), 3),
    "nnx_transformer": lambda b: _nnx(NnxBlock, _tokens(b, 5, 11), 3),
    "eqx_mlp": lambda b: _eqx(lambda key: eqx.nn.MLP(6, 3, 8, 2, key=key), _images((b, 6)), 3),
    "eqx_cnn": lambda b: _eqx(EqxCNN, _images((b, 2, 9, 9)), 3),
    "dict_mlp": lambda b: _dict_mlp(_images((b, 6))),
    "lora": lambda b: _lora(_images((b, 6))),
}

@functools.cache
def case(name: str, b: int):
    """``(loss_fn, params, batch)`` of a case, built once per batch size (arrays are immutable)."""
    return CASES[name](b)


# About the median per-example norm of each case at B=9 (seeds above): some rows clipped.
CLIP = {
    "mlp": 4.1, "dpcnn": 7.8, "cnn1d": 3.7, "transformer": 4.8, "custom": 1.8, "tied": 3.0,
    "mixed": 1.6, "scan": 3.1, "ensemble": 2.5, "feature_norm": 3.2, "nnx_mlp": 3.5,
    "nnx_cnn": 2.2, "nnx_transformer": 4.9, "eqx_mlp": 1.07, "eqx_cnn": 1.0, "dict_mlp": 4.7,
    "lora": 1.7,
}


def _fns(loss_fn, l2_clip_norm, microbatch_size=None):
    return {
        m: clipping.clipped_grad(loss_fn, l2_clip_norm=l2_clip_norm,
                                 microbatch_size=microbatch_size, method=m)
        for m in ("vmap", "fast")
    }


def _both(loss_fn, params, batch, mask, l2_clip_norm, microbatch_size=None):
    fns = _fns(loss_fn, l2_clip_norm, microbatch_size)
    return fns["vmap"](params, batch, mask), fns["fast"](params, batch, mask)


def _assert_close(expected, actual, rtol=RTOL):
    (s_exp, n_exp), (s_act, n_act) = expected, actual
    assert jax.tree_util.tree_structure(s_exp) == jax.tree_util.tree_structure(s_act)
    np.testing.assert_allclose(n_act, n_exp, rtol=rtol)
    leaves_exp, leaves_act = jax.tree_util.tree_leaves(s_exp), jax.tree_util.tree_leaves(s_act)
    # Entries whose true value is 0 (e.g. the attention key bias) are float noise in
    # both paths, so the absolute tolerance is relative to the largest entry of the sum.
    atol = rtol * max(float(jnp.max(jnp.abs(e))) for e in leaves_exp)
    for e, a in zip(leaves_exp, leaves_act, strict=True):
        assert e.shape == a.shape and e.dtype == a.dtype
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def assert_matches_reference(reference, got, mask, clip, nonfinite_rows: int) -> None:
    """``(clipped_sum, norms)`` of a fast path against the reference's: some rows clipped,
    the same rows non-finite (``nonfinite_rows`` of them counted), equal sums and finite
    norms (rtol ``RTOL``), and a finite sum."""
    (s_ref, n_ref), (s_got, n_got) = reference, got
    finite = jnp.isfinite(n_ref)
    assert jnp.min(n_ref[finite]) < clip < jnp.max(n_ref[finite])  # some rows clipped
    assert bool(jnp.all(jnp.isfinite(n_got) == finite))
    _assert_close((s_ref, jnp.where(finite, n_ref, 0)), (s_got, jnp.where(finite, n_got, 0)))
    assert int(clipping.count_nonfinite(n_got, mask)) == nonfinite_rows
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(s_got))


def _loop_reference(loss_fn, params, batch, mask, l2_clip_norm: float):
    """``(clipped_sum, norms)`` from ``jax.grad`` on one example at a time (float64 sums)."""
    x, y = batch
    one = jax.jit(jax.grad(lambda p, xi, yi: loss_fn(p, (xi, yi))[0]))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    total = [np.zeros(leaf.shape) for leaf in leaves]
    norms = []
    for i in range(x.shape[0]):
        g = [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(
            one(params, x[i : i + 1], y[i : i + 1]))]
        norm = np.sqrt(sum(np.sum(a**2) for a in g))
        norms.append(norm)
        if mask[i] and np.isfinite(norm):
            total = [t + a * min(1.0, l2_clip_norm / norm) for t, a in zip(total, g, strict=True)]
    summed = [jnp.asarray(t, leaf.dtype) for t, leaf in zip(total, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, summed), jnp.asarray(norms, jnp.float32)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in jax.tree_util.tree_leaves(tree)])


# With a grouped convolution, jax.vmap's per-example kernel gradients on CPU are all NaN as
# soon as one example is NaN (the batched grouped-convolution VJP mixes rows through 0 * NaN),
# so the vmap path drops every row. The reference there is a loop over single examples.
LOOP_REFERENCE = {"nnx_cnn"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping(name):
    loss_fn, params, (x, y) = case(name, B)
    floats = jnp.issubdtype(x.dtype, jnp.floating)
    if floats:  # row 2 NaN (counted), row 4 Inf (masked)
        x = x.at[2].set(jnp.nan).at[4].set(jnp.inf)
    mask = _mask(B).at[2].set(1.0).at[4].set(0.0)
    fns = _fns(loss_fn, CLIP[name])
    if name in LOOP_REFERENCE:
        s_vmap, n_vmap = _loop_reference(loss_fn, params, (x, y), mask, CLIP[name])
    else:
        s_vmap, n_vmap = fns["vmap"](params, (x, y), mask)
    s_fast, n_fast = fns["fast"](params, (x, y), mask)
    assert_matches_reference((s_vmap, n_vmap), (s_fast, n_fast), mask, CLIP[name],
                             nonfinite_rows=1 if floats else 0)
    # Adding one adversarial example (row 0, input scaled by 1e3 or fresh tokens) moves the
    # sum by at most C (float32: relative 1e-5).
    x_adv = x.at[0].set(x[1] * 1e3) if floats else x.at[0].set((x[1] * 5 + 3) % (x.max() + 1))
    with_row, _ = fns["fast"](params, (x_adv, y), mask)
    without_row, _ = fns["fast"](params, (x_adv, y), mask.at[0].set(0.0))
    assert np.linalg.norm(_flat(with_row) - _flat(without_row)) <= CLIP[name] * (1 + RTOL)


@pytest.mark.parametrize("name", ["eqx_cnn", "tied"])
def test_fast_matches_vmap_with_per_layer_bounds(name):
    loss_fn, params, batch = case(name, B)
    bounds = clipping.per_layer_clip_norms(params, 0.5, depth=1)
    _assert_close(*_both(loss_fn, params, batch, _mask(B), bounds))


def test_masked_rows_contribute_exactly_zero():
    loss_fn, params, batch = case("mlp", 4)
    summed, norms = clipping.clipped_grad(loss_fn, l2_clip_norm=1.0, method="fast")(
        params, batch, jnp.zeros(4)
    )
    assert all(bool(jnp.all(s == 0)) for s in jax.tree_util.tree_leaves(summed))
    assert bool(jnp.all(norms > 0))


@pytest.mark.parametrize(("name", "b"), [("mlp", 1), ("mlp", 257), ("transformer", 257)])
def test_fast_matches_vmap_at_batch_sizes_1_and_257(name, b):
    loss_fn, params, batch = case(name, b)
    _assert_close(*_both(loss_fn, params, batch, jnp.ones(b), 0.3))


def test_microbatching_gives_the_same_result():
    loss_fn, params, batch = case("mlp", 8)
    mask = _mask(8)
    whole = clipping.clipped_grad(loss_fn, l2_clip_norm=0.5, method="fast")(params, batch, mask)
    chunked = clipping.clipped_grad(loss_fn, l2_clip_norm=0.5, microbatch_size=2, method="fast")(
        params, batch, mask
    )
    _assert_close(whole, chunked)


def test_mixed_rule_takes_both_branches():
    assert use_ghost(8, 16, 64) and not use_ghost(8, 64, 2)
    loss_fn, params, batch = case("mixed", B)
    branches = describe(loss_fn, params, batch)
    assert branches["['Dense_0']['kernel']"] == "dense: ghost"
    assert branches["['Dense_1']['kernel']"] == "dense: direct"
    assert branches["['Dense_0']['bias']"] == "per-example: add"


def test_embedding_ghost_and_direct_branches_count_repeated_tokens():
    ids = jnp.array([[1, 1, 1, 2], [3, 3, 0, 3], [0, 1, 2, 3]])
    for vocab in (4, 40):  # 2 * 4^2 = 32 >= 4 * 4: direct; < 40 * 4: ghost
        model = nn.Sequential([nn.Embed(vocab, 4), lambda h: jnp.sum(h, axis=1)])
        loss_fn, params, batch = _linen(model, ids, 4)
        branch = describe(loss_fn, params, batch)["['layers_0']['embedding']"]
        assert branch == ("embed: direct" if vocab == 4 else "embed: ghost")
        _assert_close(*_both(loss_fn, params, batch, jnp.ones(3), 1e3))


def test_every_framework_finds_its_layers():
    kinds = {}
    for name in ("transformer", "nnx_transformer", "nnx_cnn", "eqx_cnn", "dict_mlp", "ensemble"):
        loss_fn, params, batch = case(name, B)
        kinds[name] = {how.split(":")[0] for how in describe(loss_fn, params, batch).values()}
    assert kinds["transformer"] == kinds["nnx_transformer"] == {"embed", "dense", "per-example"}
    assert kinds["nnx_cnn"] == kinds["eqx_cnn"] == {"conv", "dense", "per-example"}
    assert kinds["dict_mlp"] == kinds["ensemble"] == {"dense", "per-example"}


def test_shared_and_composed_parameters_are_summed_before_the_norm():
    loss_fn, params, batch = case("tied", B)
    branches = describe(loss_fn, params, batch)
    assert branches["['Embed_0']['embedding']"] == "per-example: dot_general, gather"
    loss_fn, params, batch = case("lora", B)
    assert describe(loss_fn, params, batch) == {"['a']": "per-example: dot_general",
                                                "['b']": "per-example: dot_general"}


def test_a_layer_called_twice_is_stacked_along_positions():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(5)
            return dense(x) * dense(2 * x + 1)

    loss_fn, params, batch = _linen(Twice(), _images((5, 4)), 5)
    assert describe(loss_fn, params, batch)["['Dense_0']['kernel']"] == "dense: ghost"  # T = 1 + 1
    _assert_close(*_both(loss_fn, params, batch, _mask(5), 0.5))


def test_a_nan_in_a_pixel_no_window_reads_does_not_drop_the_row():
    class Strided(nn.Module):  # a 1x1 convolution with stride 2 never reads odd pixels
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(4, (1, 1), strides=2, padding="VALID")(x)
            return nn.Dense(3)(jnp.mean(jnp.tanh(h), axis=(1, 2)))

    loss_fn, params, (x, y) = _linen(Strided(), _images((4, 6, 6, 2)), 3)
    x = x.at[1, 1, 1].set(jnp.nan)  # row 1, an unread pixel
    assert describe(loss_fn, params, (x, y))["['Conv_0']['kernel']"] == "conv: direct"
    vmap_result, fast_result = _both(loss_fn, params, (x, y), jnp.ones(4), 0.5)
    assert bool(jnp.all(jnp.isfinite(fast_result[1])))
    _assert_close(vmap_result, fast_result)


def test_params_used_outside_layers_are_summed_per_example():
    base, params, batch = _linen(MLP(hidden=(8,)), _images((5, 6)), 10)

    def loss_fn(p, batch):  # a penalty on the first kernel, outside the model
        return base(p, batch) + 0.1 * jnp.sum(p["Dense_0"]["kernel"] ** 2)

    branches = describe(loss_fn, params, batch)
    assert branches["['Dense_0']['kernel']"] == "per-example: add, dot_general"
    assert branches["['Dense_1']['kernel']"] == "dense: outer"
    _assert_close(*_both(loss_fn, params, batch, _mask(5), 0.2))

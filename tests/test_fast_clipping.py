"""The fast clipping path gives the vmap path's numbers, layer rule by layer rule."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import clipping
from dpjax.fast_clipping import conv_patches, describe, use_ghost
from dpjax.models.nets import CNN1D, DPCNN, MLP
from dpjax.train import cross_entropy_loss, init_state, make_dp_step

RTOL = 1e-5


class Block(nn.Module):
    """Embedding + pre-LN multi-head attention + MLP + tied-free readout."""

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
    """A parameterized layer no rule knows: y = x * w + c."""

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


def _classification(model, x, num_classes, seed=0):
    params = model.init(jax.random.PRNGKey(seed), x)["params"]
    y = jnp.arange(x.shape[0]) % num_classes
    return cross_entropy_loss(model.apply), params, (x, y)


def _images(shape, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _tokens(b, t, vocab, seed=2):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, vocab)


def _mask(b, seed=3):
    m = (jax.random.uniform(jax.random.PRNGKey(seed), (b,)) < 0.75).astype(jnp.float32)
    return m.at[0].set(1.0)


CASES = {
    "mlp": lambda b: _classification(MLP(hidden=(32, 16)), _images((b, 4, 5)), 10),
    "dpcnn": lambda b: _classification(DPCNN(), _images((b, 16, 16, 1)), 10),
    "cnn1d": lambda b: _classification(CNN1D(channels=(8, 8, 8)), _images((b, 24)), 10),
    "transformer": lambda b: _classification(Block(), _tokens(b, 5, 11), 3),
    "custom": lambda b: _classification(CustomNet(), _images((b, 6)), 3),
    "tied": lambda b: _classification(TiedLM(), _tokens(b, 5, 7), 7),
    "mixed": lambda b: _classification(Mixed(), _images((b, 8, 16)), 2),
}


# About the median per-example norm of each case at B=9 (seeds above): some rows clipped.
CLIP = {
    "mlp": 4.3,
    "dpcnn": 7.7,
    "cnn1d": 4.0,
    "transformer": 5.0,
    "custom": 2.0,
    "tied": 2.8,
    "mixed": 1.8,
}


def _both(loss_fn, params, batch, mask, l2_clip_norm, microbatch_size=None):
    out = {}
    for method in ("vmap", "fast"):
        f = clipping.clipped_grad(
            loss_fn, l2_clip_norm=l2_clip_norm, microbatch_size=microbatch_size, method=method
        )
        out[method] = f(params, batch, mask)
    return out["vmap"], out["fast"]


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


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping(name):
    loss_fn, params, (x, y) = CASES[name](9)
    if jnp.issubdtype(x.dtype, jnp.floating):  # row 2 NaN (counted), row 4 Inf (masked)
        x = x.at[2].set(jnp.nan).at[4].set(jnp.inf)
    mask = _mask(9).at[2].set(1.0).at[4].set(0.0)
    (s_vmap, n_vmap), (s_fast, n_fast) = _both(loss_fn, params, (x, y), mask, CLIP[name])
    finite = jnp.isfinite(n_vmap)
    assert jnp.min(n_vmap[finite]) < CLIP[name] < jnp.max(n_vmap[finite])  # some rows clipped
    assert bool(jnp.all(jnp.isfinite(n_fast) == finite))
    _assert_close((s_vmap, jnp.where(finite, n_vmap, 0)), (s_fast, jnp.where(finite, n_fast, 0)))
    if jnp.issubdtype(x.dtype, jnp.floating):
        assert int(clipping.count_nonfinite(n_fast, mask)) == 1
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(s_fast))


@pytest.mark.parametrize("name", ["dpcnn", "transformer"])
def test_fast_matches_vmap_with_per_layer_bounds(name):
    loss_fn, params, batch = CASES[name](5)
    bounds = clipping.per_layer_clip_norms(params, 0.5, depth=1)
    _assert_close(*_both(loss_fn, params, batch, _mask(5), bounds))


def test_masked_rows_contribute_exactly_zero():
    loss_fn, params, batch = CASES["mlp"](4)
    summed, norms = clipping.clipped_grad(loss_fn, l2_clip_norm=1.0, method="fast")(
        params, batch, jnp.zeros(4)
    )
    assert all(bool(jnp.all(s == 0)) for s in jax.tree_util.tree_leaves(summed))
    assert bool(jnp.all(norms > 0))


@pytest.mark.parametrize(("name", "b"), [("mlp", 1), ("mlp", 257), ("transformer", 257)])
def test_fast_matches_vmap_at_batch_sizes_1_and_257(name, b):
    loss_fn, params, batch = CASES[name](b)
    _assert_close(*_both(loss_fn, params, batch, jnp.ones(b), 0.3))


def test_microbatching_gives_the_same_result():
    loss_fn, params, batch = CASES["cnn1d"](8)
    mask = _mask(8)
    whole = clipping.clipped_grad(loss_fn, l2_clip_norm=0.5, method="fast")(params, batch, mask)
    chunked = clipping.clipped_grad(loss_fn, l2_clip_norm=0.5, microbatch_size=2, method="fast")(
        params, batch, mask
    )
    _assert_close(whole, chunked)


def test_mixed_rule_takes_both_branches():
    assert use_ghost(8, 16, 64) and not use_ghost(8, 64, 2)
    loss_fn, params, batch = CASES["mixed"](4)
    assert dict(describe(loss_fn, params, batch)) == {
        "Dense_0": "dense: ghost",
        "Dense_1": "dense: direct",
    }


def test_embedding_ghost_and_direct_branches_count_repeated_tokens():
    ids = jnp.array([[1, 1, 1, 2], [3, 3, 0, 3], [0, 1, 2, 3]])
    for vocab in (4, 40):  # 2 * 4^2 = 32 >= 4 * 4: direct; < 40 * 4: ghost
        model = nn.Sequential([nn.Embed(vocab, 4), lambda h: jnp.sum(h, axis=1)])
        loss_fn, params, batch = _classification(model, ids, 4)
        branch = dict(describe(loss_fn, params, batch))["layers_0"]
        assert branch == ("embed: direct" if vocab == 4 else "embed: ghost")
        _assert_close(*_both(loss_fn, params, batch, jnp.ones(3), 1e3))


def test_transformer_layers_get_fast_rules():
    loss_fn, params, batch = CASES["transformer"](2)
    kinds = {how.split(":")[0] for _, how in describe(loss_fn, params, batch)}
    assert kinds == {"embed", "dense", "norm"}


def test_unknown_and_shared_layers_fall_back_per_layer():
    loss_fn, params, batch = CASES["custom"](2)
    assert dict(describe(loss_fn, params, batch))["Scale_0"] == "per-layer vmap"
    loss_fn, params, batch = CASES["tied"](2)
    assert dict(describe(loss_fn, params, batch))["Embed_0"] == "per-layer vmap"


def test_params_used_outside_layers_fall_back_to_whole_model_vmap():
    model = MLP(hidden=(8,))
    base, params, batch = _classification(model, _images((5, 6)), 10)

    def loss_fn(p, batch):  # a per-example penalty on the first kernel, outside the model
        return base(p, batch) + 0.1 * jnp.sum(p["Dense_0"]["kernel"] ** 2)

    branches = dict(describe(loss_fn, params, batch))
    assert branches["['Dense_0']['kernel']"] == "whole-model vmap"
    assert branches["Dense_1"] == "dense: outer"
    _assert_close(*_both(loss_fn, params, batch, _mask(5), 0.2))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv(3, (3, 2), strides=(2, 1), padding="SAME"),
        nn.Conv(3, (3, 3), padding=((1, 0), (2, 1)), kernel_dilation=2),
        nn.Conv(3, (2, 2), padding="CIRCULAR"),
        nn.Conv(3, (2, 3), padding=1, input_dilation=(2, 1), strides=2),
        nn.Conv(3, 3, padding="CAUSAL"),
    ],
)
def test_conv_patches_reproduce_the_flax_convolution(conv):
    rank = 1 if isinstance(conv.kernel_size, int) else len(conv.kernel_size)
    x = _images((2,) + (7,) * rank + (2,))
    params = conv.init(jax.random.PRNGKey(0), x)["params"]
    kernel = params["kernel"]
    flat = jnp.moveaxis(kernel, rank, 0).reshape(-1, kernel.shape[-1])
    got = jax.jit(lambda x: conv_patches(conv, x) @ flat + params["bias"])(x)
    expected = conv.apply({"params": params}, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_auto_logs_its_fallbacks_once(caplog):
    loss_fn, params, batch = CASES["custom"](3)
    f = clipping.clipped_grad(loss_fn, l2_clip_norm=1.0, method="auto")
    with caplog.at_level(logging.INFO, logger="dpjax.fast_clipping"):
        f(params, batch, jnp.ones(3))
        f(params, (batch[0][:2], batch[1][:2]), jnp.ones(2))  # a retrace
    records = [r for r in caplog.records if r.name == "dpjax.fast_clipping"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "fast path" in records[0].message and "Scale_0 (per-layer vmap)" in records[0].message


def test_auto_uses_vmap_when_no_layer_has_a_fast_rule(caplog):
    model = nn.Sequential([Scale(), lambda h: h[:, :3]])
    loss_fn, params, batch = _classification(model, _images((3, 4)), 3)
    with caplog.at_level(logging.INFO, logger="dpjax.fast_clipping"):
        got = clipping.clipped_grad(loss_fn, l2_clip_norm=1.0, method="auto")(
            params, batch, jnp.ones(3)
        )
    assert "vmap path" in caplog.records[0].message
    _assert_close(_both(loss_fn, params, batch, jnp.ones(3), 1.0)[0], got)


def test_dp_step_with_fast_clipping_matches_vmap_step():
    loss_fn, params, batch = CASES["mlp"](6)
    states = {}
    for method in ("vmap", "fast"):
        step = make_dp_step(
            loss_fn,
            optax.sgd(0.1),
            noise_multiplier=1.0,
            l2_clip_norm=0.5,
            expected_batch_size=6.0,
            clipping_method=method,
        )
        states[method], _ = step.step(init_state(params, optax.sgd(0.1), seed=0), batch, _mask(6))
    for e, a in zip(*(jax.tree_util.tree_leaves(states[m].params) for m in states), strict=True):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=1e-6)


def test_unknown_method_is_refused():
    from dpjax import fast_clipping

    with pytest.raises(ValueError, match="Expected method='vmap'"):
        fast_clipping.make_chunk(lambda p, b: b, l2_clip_norm=1.0, method="vmap",
                                 fallback=lambda p, b, m: (p, m))

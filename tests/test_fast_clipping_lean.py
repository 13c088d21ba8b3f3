"""The memory-lean fast clipping mode through the public API: ``clipped_grad(method="fast_lean")``,
``make_dp_step(clipping_method="fast_lean")`` and ``perf.clipping=fast_lean``.

It must give the vmap path's numbers (masks, non-finite rows, per-layer bounds,
microbatching, B = 1 and odd B), keep each row's contribution within the bound, report
fallbacks like the other fast methods, and use less memory than the default fast step.
The model zoo and helpers are those of ``test_fast_clipping.py``.
"""

from __future__ import annotations

import functools
import logging

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf
from test_config import _compose
from test_fast_clipping import (
    CLIP,
    RTOL,
    B,
    _assert_close,
    _eqx,
    _flat,
    _images,
    _linen,
    _mask,
    assert_matches_reference,
    case,
)

from dpjax import clipping
from dpjax.config import ConfigError, perf, validate
from dpjax.memory import compiled_peak_bytes, step_peak_bytes
from dpjax.models.nets import MLP
from dpjax.train import init_state, make_dp_step, make_nonprivate_step


def _lean(loss_fn, l2_clip_norm, microbatch_size=None):
    return clipping.clipped_grad(loss_fn, l2_clip_norm=l2_clip_norm,
                                 microbatch_size=microbatch_size, method="fast_lean")


def _vmap(loss_fn, l2_clip_norm, microbatch_size=None):
    return clipping.clipped_grad(loss_fn, l2_clip_norm=l2_clip_norm,
                                 microbatch_size=microbatch_size)


# Linen (dense; embedding + attention), Equinox (convolution), a plain function of a dict.
@pytest.mark.parametrize("name", ["mlp", "dict_mlp", *(pytest.param(n, marks=pytest.mark.slow)
                                                      for n in ("transformer", "eqx_cnn"))])
def test_lean_matches_vmap_with_mask_and_nonfinite_rows_at_odd_batch_size(name):
    loss_fn, params, (x, y) = case(name, B)  # B = 9
    floats = jnp.issubdtype(x.dtype, jnp.floating)
    if floats:  # row 2 NaN (counted), row 4 Inf (masked)
        x = x.at[2].set(jnp.nan).at[4].set(jnp.inf)
    mask = _mask(B).at[2].set(1.0).at[4].set(0.0)
    s_vmap, n_vmap = _vmap(loss_fn, CLIP[name])(params, (x, y), mask)
    s_lean, n_lean = _lean(loss_fn, CLIP[name])(params, (x, y), mask)
    assert_matches_reference((s_vmap, n_vmap), (s_lean, n_lean), mask, CLIP[name],
                             nonfinite_rows=1 if floats else 0)


def test_lean_matches_vmap_with_per_layer_bounds():
    # One reweighted backward pass per clipping group (three layers: three groups).
    loss_fn, params, batch = case("mlp", B)
    bounds = clipping.per_layer_clip_norms(params, 0.5, depth=1)
    mask = _mask(B)
    _assert_close(_vmap(loss_fn, bounds)(params, batch, mask),
                  _lean(loss_fn, bounds)(params, batch, mask))


def test_lean_with_microbatches_matches_vmap_on_the_whole_batch():
    loss_fn, params, batch = case("dict_mlp", B)
    mask = _mask(B)
    _assert_close(_vmap(loss_fn, 0.5)(params, batch, mask),
                  _lean(loss_fn, 0.5, microbatch_size=3)(params, batch, mask))


@pytest.mark.parametrize(("name", "b"), [("mlp", 1), ("dict_mlp", 1), ("dict_mlp", 5)])
def test_lean_matches_vmap_at_batch_sizes_1_and_5(name, b):
    loss_fn, params, batch = case(name, b)
    mask = jnp.ones(b)
    _assert_close(_vmap(loss_fn, 0.3)(params, batch, mask),
                  _lean(loss_fn, 0.3)(params, batch, mask))


@pytest.mark.parametrize("name", ["mlp", "dict_mlp"])
def test_one_example_moves_the_lean_sum_by_at_most_the_bound(name):
    # Row 0 is an adversarial example (another row scaled by 1e3, norm above C). Adding it
    # (its mask 0 -> 1) moves the sum by exactly C, since it is clipped, never more;
    # replacing its data by <= 2 C; changing its data while it is masked by exactly 0.
    # Float32 sums: relative 1e-5 (bound), 1e-4 (equality).
    loss_fn, params, (x, y) = case(name, B)
    c = 0.5
    f = _lean(loss_fn, c)
    mask = jnp.ones(B)
    x_adv, x_other = x.at[0].set(x[1] * 1e3), x.at[0].set(-x[3] * 1e3)
    with_row, norms = f(params, (x_adv, y), mask)
    without_row = _flat(f(params, (x_adv, y), mask.at[0].set(0.0))[0])
    replaced = _flat(f(params, (x_other, y), mask)[0])
    masked_other = _flat(f(params, (x_other, y), mask.at[0].set(0.0))[0])
    assert float(norms[0]) > 1.5 * c
    added = np.linalg.norm(_flat(with_row) - without_row)
    assert added <= c * (1 + RTOL)
    np.testing.assert_allclose(added, c, rtol=1e-4)
    assert np.linalg.norm(_flat(with_row) - replaced) <= 2 * c * (1 + RTOL)
    np.testing.assert_array_equal(masked_other, without_row)


def test_lean_reports_the_leaves_that_fall_back_to_vmap_and_why(caplog):
    loss_fn, params, batch = case("scan", B)  # a Dense cell under nn.scan, a Dense head
    with caplog.at_level(logging.INFO, logger="dpjax.fast_clipping"):
        got = _lean(loss_fn, 1.0)(params, batch, jnp.ones(B))
    (record,) = [r for r in caplog.records if r.name == "dpjax.fast_clipping"]
    assert record.levelno == logging.WARNING
    assert "'fast_lean': fast path (two backward passes)" in record.message
    fallbacks = record.message.split("vmap for:")[1]
    assert "['ScanCell_0']['Dense_0']['kernel'] (used by scan" in fallbacks
    assert "['Dense_0']['kernel']" not in fallbacks.replace("['ScanCell_0']['Dense_0']", "")
    _assert_close(_vmap(loss_fn, 1.0)(params, batch, jnp.ones(B)), got)


def _steps(loss_fn, b, methods):
    return {m: make_dp_step(loss_fn, optax.sgd(0.1), noise_multiplier=1.0, l2_clip_norm=1.0,
                            expected_batch_size=float(b), clipping_method=m)
            for m in methods}


def test_lean_dp_step_gives_the_fast_step_and_needs_less_memory():
    # XLA's compiled estimates: a 64-64 MLP at B = 256, where activations outweigh the
    # parameters as in the benchmark's MLP. Then one step of each from the same state and
    # key: the same update (the fast step equals the vmap step: test_fast_clipping_modes).
    dense = functools.partial(nn.Dense, use_bias=False)  # fewer leaves: a faster compile
    loss_fn, params, batch = _linen(nn.Sequential([dense(64), nn.relu, dense(64), nn.relu,
                                                   dense(10)]), _images((256, 32)), 10)
    state, mask = init_state(params, optax.sgd(0.1), seed=0), _mask(256)
    steps = _steps(loss_fn, 256, ("fast", "fast_lean"))
    assert not steps["fast"].parts.split and steps["fast_lean"].parts.split
    fast, lean = (step_peak_bytes(steps[m], state, batch, mask) for m in ("fast", "fast_lean"))
    assert lean < 0.8 * fast, (lean, fast)
    after = {m: steps[m].step(init_state(params, optax.sgd(0.1), seed=0), batch, mask)
             for m in steps}
    assert int(after["fast_lean"][0].step) == 1
    assert int(after["fast_lean"][1].batch_size) == int(jnp.sum(mask))
    for e, a in zip(*(jax.tree_util.tree_leaves(after[m][0].params) for m in steps),
                    strict=True):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=1e-6)


def _eqx_mlp(key):
    return eqx.nn.MLP(784, 10, 512, 2, activation=jax.nn.relu, key=key)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["linen", "equinox"])
def test_lean_dp_step_memory_is_within_1_2x_of_the_non_private_step(framework):
    # The target: MLP 784-512-512-10 at B = 1024, XLA's compiled estimates only.
    # Equinox's dense layers give [F, B] output gradients (W @ x, vmapped): 1.24x while
    # the per-example norms read them through a copy with the batch axis first.
    build = _linen(MLP(), jnp.zeros((1024, 784)), 10) if framework == "linen" else (
        _eqx(_eqx_mlp, jnp.zeros((1024, 784)), 10))
    loss_fn, params, batch = build
    state, mask = init_state(params, optax.sgd(0.1), seed=0), jnp.ones(1024)
    plain = compiled_peak_bytes(make_nonprivate_step(loss_fn, optax.sgd(0.1)).step, state,
                                batch, mask)
    lean = step_peak_bytes(_steps(loss_fn, 1024, ("fast_lean",))["fast_lean"], state, batch,
                           mask)
    assert lean <= 1.2 * plain, (lean / plain)


def test_perf_clipping_accepts_fast_lean_and_refuses_an_unknown_value_naming_the_key():
    run = OmegaConf.to_object(_compose(["perf.clipping=fast_lean"]))
    validate(run)
    assert perf(run).clipping == "fast_lean"
    with pytest.raises(ConfigError, match=r"Expected perf\.clipping='lean' to be one of "
                                          r"\['vmap', 'fast', 'fast_lean', 'auto'\]"):
        validate(OmegaConf.to_object(_compose(["perf.clipping=lean"])))
    with pytest.raises(ConfigError, match=r"Expected dp\.clipping='fast-lean'"):
        validate(OmegaConf.to_object(_compose(["dp.clipping=fast-lean"])))


def test_clipped_grad_refuses_an_unknown_method_naming_the_accepted_ones():
    with pytest.raises(ValueError, match=r"Expected method='lean' to be one of "
                                         r"\['vmap', 'fast', 'fast_lean', 'auto'\]"):
        clipping.clipped_grad(lambda p, b: b, l2_clip_norm=1.0, method="lean")

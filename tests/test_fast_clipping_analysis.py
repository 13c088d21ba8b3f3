"""The jaxpr analysis of the fast path: batch layouts, convolution patches, ghost-norm rounding.

These tests trace small functions and compile little; they check the pieces
the fast path's guarantee rests on against independent references (brute
force over indices, ``lax.conv_general_dilated``, float64 numpy).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.fast_clipping import batch_axes, layouts, norms
from dpjax.fast_clipping import program as prog
from dpjax.fast_clipping.batch_axes import Const, Mixed, Rows

B, T, D = 4, 4, 3  # T == B on purpose: layouts are followed by parameters, never by sizes


def _verdict(fn, x, w=None):
    """The state of ``fn(w, x)``'s output, ``x`` batched on axis 0 and ``w`` a parameter."""
    w = jnp.ones((D, 2)) if w is None else w
    program = prog.trace(fn, w, x)
    states = batch_axes.analyze(program, [Const(frozenset({0})), Rows(0)], x.shape[0])
    (out,) = batch_axes.output_states(program, states)
    return out


@jax.custom_vjp
def _mixing_grad(x):
    return x


_mixing_grad.defvjp(lambda x: (x, None), lambda _, g: (g - jnp.mean(g, axis=0),))

X = jnp.ones((B, T, D))
PERM = jnp.array([1, 0, 3, 2])
ROWS = {
    "elementwise": (lambda w, x: jnp.tanh(x) * 2 + 1, Rows(0)),
    "dense": (lambda w, x: x @ w, Rows(0)),
    "time_major": (lambda w, x: jnp.sum(jnp.swapaxes(x, 0, 1) @ w, axis=2), Rows(1)),
    "merge_tokens": (lambda w, x: x.reshape(B * T, D), Rows(0, outer=1, inner=T)),
    "merge_time_major": (lambda w, x: jnp.swapaxes(x, 0, 1).reshape(T * B, D), Rows(0, outer=T)),
    "merge_and_split": (lambda w, x: (x.reshape(B * T, D) @ w).reshape(B, T, 2), Rows(0)),
    "within_example_attention": (lambda w, x: jnp.einsum("btd,bsd->bts", x, x), Rows(0)),
    "softmax_last_axis": (lambda w, x: jax.nn.softmax(x, axis=-1), Rows(0)),
    "relu_custom_jvp": (lambda w, x: jax.nn.relu(x), Rows(0)),
    "sort_within_example": (lambda w, x: jnp.sort(x, axis=-1), Rows(0)),
    "take_along_axis": (
        lambda w, x: jnp.take_along_axis(x[:, 0], jnp.argmax(x[:, 1], -1)[:, None], -1), Rows(0)),
    "two_views": (lambda w, x: jnp.concatenate([x, 2 * x]), Rows(0, outer=2)),
    "stack_after_the_batch": (lambda w, x: jnp.stack([x, 2 * x], axis=-1), Rows(0)),
    "stack_before_the_batch": (lambda w, x: jnp.stack([x, 2 * x]), Rows(1)),
    "scan_over_time": (
        lambda w, x: jax.lax.scan(lambda c, xt: (jnp.tanh(c + xt @ w), None),
                                  jnp.zeros((B, 2)), jnp.swapaxes(x, 0, 1))[0], Rows(0)),
    "cond_on_a_constant": (lambda w, x: jax.lax.cond(w[0, 0] > 0, jnp.sin, jnp.cos, x), Rows(0)),
    "conv": (lambda w, x: jax.lax.conv_general_dilated(
        x, jnp.ones((2, D, 2)), (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")), Rows(0)),
}
MIXING = {
    "batch_mean": lambda w, x: x - jnp.mean(x, axis=0),
    "time_major_sum_over_examples": lambda w, x: jnp.sum(jnp.swapaxes(x, 0, 1), axis=1),
    "contract_the_batch": lambda w, x: jnp.einsum("btd,bsd->ts", x, x),
    "pairs_of_examples": lambda w, x: x[:, None] * x[None, :],
    "sort_over_examples": lambda w, x: jnp.sort(x, axis=0),
    "cumsum_over_examples": lambda w, x: jnp.cumsum(x, axis=0),
    "permute_examples": lambda w, x: x[PERM],
    "stack_with_a_transpose": lambda w, x: jnp.stack([x[:, :, 0], x[:, :, 0].T]),  # T == B
    "custom_vjp_rule_that_mixes": lambda w, x: _mixing_grad(x),
}
UNKNOWN = {
    "reshape_splitting_the_batch": (lambda w, x: x.reshape(2, 3, T, D), jnp.ones((6, T, D))),
    "scan_over_examples": (lambda w, x: jax.lax.scan(lambda c, xi: (c + xi, c), X[0], x)[1], X),
    "while_with_per_example_trip_count": (
        lambda w, x: jax.vmap(lambda xi: jax.lax.while_loop(
            lambda s: s[0] < jnp.sum(xi), lambda s: (s[0] + 1, s[1] * 2), (0.0, xi))[1])(x), X),
    "host_callback": (
        lambda w, x: jax.pure_callback(np.tanh, jax.ShapeDtypeStruct(x.shape, x.dtype), x,
                                       vmap_method="sequential"), X),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_batch_layout_is_followed_through_known_primitives(name):
    fn, expected = ROWS[name]
    assert _verdict(fn, X) == expected


@pytest.mark.parametrize("name", sorted(MIXING))
def test_operations_that_combine_or_move_examples_are_found(name):
    got = _verdict(MIXING[name], X)
    assert isinstance(got, Mixed) and got.mixing, got


@pytest.mark.parametrize("name", sorted(UNKNOWN))
def test_what_no_rule_covers_is_not_proven(name):
    fn, x = UNKNOWN[name]
    got = _verdict(fn, x)
    assert isinstance(got, Mixed) and not got.mixing, got


def test_parameters_stay_constant_and_record_their_leaves():
    def fn(w, x):
        return jnp.tanh(w.T @ w)

    assert _verdict(fn, X) == Const(frozenset({0}))


def _example_of(shape, s: Rows, b: int) -> np.ndarray:
    """Brute force: the example index of every entry of a value with batch layout ``s``."""
    pos = np.arange(shape[s.axis]).reshape([-1 if d == s.axis else 1 for d in range(len(shape))])
    return np.broadcast_to((pos // s.inner) % b, shape)


def _layouts_that_fit(example: np.ndarray, b: int) -> set[Rows]:
    found = set()
    for j, size in enumerate(example.shape):
        for inner in range(1, size + 1):
            if size % (inner * b) == 0:
                r = Rows(j, size // (inner * b), inner)
                if np.array_equal(_example_of(example.shape, r, b), example):
                    found.add(r)
    return found


def _factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every ordered way of writing n as a product of at most ``parts`` factors > 1."""
    if n == 1:
        return [()]
    if parts == 0:
        return []
    return [(d, *rest) for d in range(2, n + 1) if n % d == 0
            for rest in _factorizations(n // d, parts - 1)]


def test_reshape_tracking_agrees_with_brute_force_on_all_small_shapes():
    checked = 0
    for b, n in ((2, 12), (3, 12), (2, 16), (2, 24)):
        for in_shape in _factorizations(n, 3):
            for axis, size in enumerate(in_shape):
                for inner in range(1, size + 1):
                    if size % (b * inner):
                        continue
                    s = Rows(axis, size // (b * inner), inner)
                    example = _example_of(in_shape, s, b)
                    for out_shape in _factorizations(n, 3):
                        got = batch_axes.reshape_rows(in_shape, s, out_shape, b)
                        fits = _layouts_that_fit(example.reshape(out_shape), b)
                        assert (got in fits) if got is not None else not fits, (in_shape, s,
                                                                                 out_shape)
                        checked += 1
    assert checked > 400


CONV_CASES = [
    dict(lhs=(2, 7, 7, 4), rhs=(3, 3, 4, 6), strides=(2, 1), padding=((1, 1), (0, 2)),
         dn=("NHWC", "HWIO", "NHWC")),
    dict(lhs=(2, 4, 9, 8), rhs=(6, 2, 3, 2), strides=(1, 2), padding=((2, -1), (1, 1)),
         rhs_dilation=(2, 1), groups=2, dn=("NCHW", "OIHW", "NCHW")),
    dict(lhs=(3, 5, 2), rhs=(3, 2, 4), strides=(2,), padding=((1, 2),), lhs_dilation=(2,),
         dn=("NWC", "WIO", "NWC")),
    dict(lhs=(2, 6, 6, 6), rhs=(2, 2, 2, 6), strides=(1, 1), padding=((0, 0), (1, 0)),
         groups=3, rhs_dilation=(1, 2), dn=("NHWC", "HWIO", "NCHW")),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_patches_times_the_kernel_reproduce_the_convolution(case):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    lhs, rhs = jax.random.normal(k1, case["lhs"]), jax.random.normal(k2, case["rhs"])
    kwargs = dict(window_strides=case["strides"], padding=case["padding"],
                  lhs_dilation=case.get("lhs_dilation"), rhs_dilation=case.get("rhs_dilation"),
                  dimension_numbers=case["dn"], feature_group_count=case.get("groups", 1))
    expected = jax.lax.conv_general_dilated(lhs, rhs, **kwargs, precision="highest")
    (eqn,) = jax.make_jaxpr(lambda a, b: jax.lax.conv_general_dilated(a, b, **kwargs))(
        lhs, rhs).eqns
    out_spec = eqn.params["dimension_numbers"].out_spec
    layout = layouts.conv_layout(eqn.params, [lhs.shape, rhs.shape], expected.shape, Rows(0),
                                 Rows(out_spec[0]))

    @jax.jit
    def both(lhs, rhs, out):
        a, want = layout.operands(lhs, out, lhs.shape[0])  # patches [B, N, T, K], out [B, N, T, F]
        return jnp.einsum("bntk,nkf->bntf", a, layout.normalize(rhs), precision="highest"), want

    got, want = both(lhs, rhs, expected)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


READ_CASES = [*CONV_CASES, dict(lhs=(1, 6, 2), rhs=(1, 2, 3), strides=(2,), padding=((0, 0),),
                                dn=("NWC", "WIO", "NWC"))]  # reads pixels 0, 2, 4 only


@pytest.mark.parametrize("case", READ_CASES)
def test_conv_read_mask_is_where_the_input_gradient_of_a_positive_kernel_is_nonzero(case):
    lhs, rhs = jnp.ones(case["lhs"]), jnp.ones(case["rhs"])
    kwargs = dict(window_strides=case["strides"], padding=case["padding"],
                  lhs_dilation=case.get("lhs_dilation"), rhs_dilation=case.get("rhs_dilation"),
                  dimension_numbers=case["dn"], feature_group_count=case.get("groups", 1))
    conv = jax.jit(lambda a: jax.lax.conv_general_dilated(a, rhs, **kwargs))
    _, vjp_fn = jax.vjp(conv, lhs)
    (reached,) = vjp_fn(jnp.ones(conv(lhs).shape))
    (eqn,) = jax.make_jaxpr(lambda a, b: jax.lax.conv_general_dilated(a, b, **kwargs))(
        lhs, rhs).eqns
    spec = eqn.params["dimension_numbers"].lhs_spec
    expected = np.asarray(jnp.transpose(reached, spec)[0, 0]) > 0  # [*spatial] of one channel
    got = layouts.conv_read_mask({**eqn.params, "rhs_shape": rhs.shape}, lhs.shape)
    np.testing.assert_array_equal(got, expected)
    if case is READ_CASES[-1]:
        np.testing.assert_array_equal(got, [True, False] * 3)


def _exact_sq(a, g):
    """float64 ||A_i^T G_i||_F^2 summed over groups, A [B, N, T, K], G [B, N, T, F]."""
    per = np.einsum("bntk,bntf->bnkf", np.asarray(a, np.float64), np.asarray(g, np.float64))
    return np.sum(per**2, axis=(1, 2, 3))


def test_ghost_norm_is_never_below_the_exact_norm_by_more_than_rho():
    # 2000 random rows of four kinds, plus the cancellation of the issue: an input seen
    # twice with output gradients (4096, -4096 + 1/16) (times random unit vectors).
    rng = np.random.default_rng(0)
    n, t, k, f = 500, 6, 8, 12
    a = rng.standard_normal((4 * n, 1, t, k)).astype(np.float32)
    g = rng.standard_normal((4 * n, 1, t, f)).astype(np.float32)
    a[n : 2 * n] += 5 * rng.standard_normal((n, 1, 1, k)).astype(np.float32)  # correlated
    a[2 * n : 3 * n] *= 10.0 ** rng.uniform(-6, 6, (n, 1, 1, 1)).astype(np.float32)
    u = rng.standard_normal((n, 1, 1, k)).astype(np.float32)
    v = rng.standard_normal((n, 1, 1, f)).astype(np.float32)
    weights = np.array([4096.0, -4096.0 + 1 / 16] * (t // 2), np.float32)[None, None, :, None]
    a[3 * n :] = 512 * u / np.linalg.norm(u, axis=-1, keepdims=True)
    g[3 * n :] = weights * v / np.linalg.norm(v, axis=-1, keepdims=True)
    terms = jax.jit(lambda a, g: norms.linear_terms(a, g).sq)(a, g)
    assert norms.use_ghost(t, k, f)
    exact = _exact_sq(a, g)
    got = np.asarray(terms, np.float64)
    assert np.all(got >= (1 - norms.RHO) ** 2 * exact)
    # Without cancellation the bound is below RHO and the ghost value is used as is
    # (within float32 rounding of the exact value).
    np.testing.assert_allclose(got[: 3 * n], exact[: 3 * n], rtol=1e-5)
    # The cancelling rows really cancel: float32 ghost alone is off by more than half.
    raw = jnp.einsum("bnts,bnts->b", jnp.einsum("bntk,bnsk->bnts", a[3 * n :], a[3 * n :]),
                     jnp.einsum("bntf,bnsf->bnts", g[3 * n :], g[3 * n :]))
    off = np.abs(np.asarray(raw, np.float64) - exact[3 * n :]) > 0.5 * exact[3 * n :]
    assert np.mean(off) > 0.5


def test_embedding_ghost_norm_counts_repeats_and_bounds_cancellation():
    rng = np.random.default_rng(1)
    b, t, vocab, d = 300, 6, 50, 4
    ids = rng.integers(0, 3, (b, t))  # many repeated tokens
    g = rng.standard_normal((b, t, d)).astype(np.float32)
    g[b // 2 :, 1::2] = -g[b // 2 :, 0::2] * (1 - 2.0**-20)  # a repeated token's gradients cancel
    ids[b // 2 :, 1::2] = ids[b // 2 :, 0::2]
    valid = np.ones((b, t), bool)
    valid[:, -1] = False  # an id dropped by the gather (out of range)
    sq = jax.jit(lambda i, v, g: norms.embed_terms(i, v, g, vocab).sq)(ids, valid, g)
    table = np.zeros((b, vocab, d))
    for i, j in itertools.product(range(b), range(t)):
        if valid[i, j]:
            table[i, ids[i, j]] += g[i, j]
    exact = np.sum(table**2, axis=(1, 2))
    assert norms.use_ghost(t, vocab, d)
    got = np.asarray(sq, np.float64)
    assert np.all(got >= (1 - norms.RHO) ** 2 * exact)
    np.testing.assert_allclose(got[: b // 2], exact[: b // 2], rtol=1e-5)


def test_the_rounding_constant_follows_its_formula():
    u = 2.0**-24
    depth = math.ceil(math.log2(36)) + 1  # a balanced tree over 36 products, plus the product
    assert norms.tree_depth(36) == depth and norms.tree_depth(64) == 7 and norms.tree_depth(1) == 1
    c = (1 + 8 * u / (1 - 8 * u)) * (1 + 12 * u / (1 - 12 * u))
    c = c * (1 + depth * u / (1 - depth * u)) - 1
    assert norms.ghost_slack(8, 12, 36, 6, u) == pytest.approx(
        c * (1 + 2 * 30 * u / (1 - 30 * u)), rel=1e-12)
    assert norms.unit_roundoff(jnp.float32) == u
    x = np.random.default_rng(0).standard_normal((3, 37)).astype(np.float32)
    np.testing.assert_allclose(norms.pairwise_sum(jnp.asarray(x)), x.astype(np.float64).sum(1),
                               rtol=1e-6)


UNIFORM = {
    # name: (P as a function of the parameter leaf w [T, D], the axis P is uniform along)
    "positional_table_at_arange": (
        lambda w: w[jnp.broadcast_to(jnp.arange(T), (B, T))], 0),
    "broadcast_bias": (lambda w: jnp.broadcast_to(w[0], (B, T, D)), 0),
    "time_major_table": (
        lambda w: jnp.swapaxes(jnp.tanh(w[jnp.broadcast_to(jnp.arange(T), (B, T))]), 0, 1), 1),
    "scaled_lookup": (
        lambda w: w[jnp.broadcast_to(jnp.arange(T), (B, T))] * jnp.broadcast_to(w[1], (B, T, D))
        + jax.lax.broadcasted_iota(jnp.float32, (B, T, D), 1), 0),
    "window_of_a_broadcast_table": (
        lambda w: jnp.take(jnp.broadcast_to(w, (B, T, D)), jnp.array([2, 0]), axis=1), 0),
    "varies_along_the_axis": (lambda w: w[:, :, None] * jnp.arange(5.0), 0),
}


@pytest.mark.parametrize("name", sorted(UNIFORM))
def test_first_slice_is_the_first_slice_and_pulls_back_alike(name):
    from dpjax.fast_clipping.plan import first_slice  # noqa: PLC0415

    fn, axis = UNIFORM[name]
    w = jnp.asarray(np.random.default_rng(2).standard_normal((T, D)), jnp.float32)
    program = prog.trace(fn, w)

    def sliced(w):
        return first_slice(program, program.outputs[0], axis, {program.inputs[0]: w})

    def reference(w):
        return jax.lax.slice_in_dim(fn(w), 0, 1, axis=axis)

    want = reference(w)
    np.testing.assert_array_equal(sliced(w), want)
    cot = jnp.asarray(np.random.default_rng(3).standard_normal(want.shape), jnp.float32)
    (got_grad,) = jax.vjp(sliced, w)[1](cot)
    (want_grad,) = jax.vjp(reference, w)[1](cot)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)

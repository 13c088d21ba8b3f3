"""Per-layer rules: per-example squared gradient norms and the clipped sum of a layer.

Every rule starts from what :func:`~dpjax.fast_clipping.capture.capture` saw:
the layer's inputs ``A`` and its output gradient ``G`` (rows = examples) and
returns :class:`Terms`: ``sq_norms[name]`` [B], the squared norm of each
example's gradient of the leaf ``name``, and ``weighted_sum(factors, row_ok)``,
``sum_i factors[name]_i * g_i[name]`` computed by book-keeping (from ``A``, ``G``
or the layer's per-example gradients, with no further backward pass). Rows with
``row_ok = False`` are zeroed before they are weighted, so a non-finite row
cannot turn the sum into ``0 * NaN``.

Linear layers (Dense, DenseGeneral, Conv through patches) with ``T`` positions
per example (tokens, pixels; several calls of one layer are stacked along T):

* ``T == 1``: ``||g_i||^2 = ||a_i||^2 ||g_i^out||^2`` ("outer");
* ``2 T^2 < d_in d_out``: the ghost norm ``<A_i A_i^T, G_i G_i^T>`` ("ghost");
* otherwise this layer's per-example gradients ``A_i^T G_i`` ("direct").
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from dpjax.clip_math import sq_norms as _sq
from dpjax.clip_math import weigh_rows, zero_bad_rows
from dpjax.fast_clipping.capture import Call, Captured, Layer

Weigher = Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]]

PER_LAYER_VMAP = "per-layer vmap"
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


@dataclasses.dataclass(frozen=True)
class Terms:
    """A layer's squared per-example norms (per leaf) and its clipped-sum function."""

    sq_norms: dict[str, jax.Array]
    weighted_sum: Weigher
    branch: str


def use_ghost(positions: int, d_in: int, d_out: int) -> bool:
    """The mixed rule: ghost norm when its [T, T] Gram matrices are smaller than a gradient."""
    return 2 * positions * positions < d_in * d_out


def _only_call(layer: Layer) -> bool:
    """Every call is ``__call__`` with one positional array and nothing else."""
    return all(
        c.method == "__call__" and len(c.arg_shapes) == 1 and len(c.arg_static) == 1
        for c in layer.calls
    )


def _names(layer: Layer, required: set[str], optional: set[str]) -> bool:
    names = set(layer.leaves)
    return required <= names <= required | optional


def kind(layer: Layer) -> str:
    """The rule a layer gets: "dense", "conv", "embed", "norm" or per-layer vmap."""
    m = layer.module
    if not _only_call(layer):
        return PER_LAYER_VMAP
    x = layer.calls[0].arg_shapes[0]
    default_dot = getattr(m, "dot_general", None) is None
    default_dot = default_dot and getattr(m, "dot_general_cls", None) is None
    if type(m) is nn.Dense and default_dot and _names(layer, {"kernel"}, {"bias"}):
        return "dense"
    if type(m) is nn.DenseGeneral and default_dot and _names(layer, {"kernel"}, {"bias"}):
        axes = (m.axis,) if isinstance(m.axis, int) else tuple(m.axis)
        ndim = x.ndim
        trailing = tuple(a % ndim for a in axes) == tuple(range(ndim - len(axes), ndim))
        if not m.batch_dims and trailing and ndim > len(axes):
            return "dense"
    if (
        type(m) is nn.Conv
        and m.feature_group_count == 1
        and m.mask is None
        and m.conv_general_dilated is None
        and m.conv_general_dilated_cls is None
        and x.ndim == _kernel_rank(m) + 2
        and _names(layer, {"kernel"}, {"bias"})
    ):
        return "conv"
    if type(m) is nn.Embed and _names(layer, {"embedding"}, set()):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return "embed"
    if isinstance(m, NORM_TYPES) and _names(layer, set(), {"scale", "bias"}) and x.ndim >= 2:
        return "norm"
    return PER_LAYER_VMAP


def _kernel_rank(conv: nn.Conv) -> int:
    return 1 if isinstance(conv.kernel_size, int) else len(conv.kernel_size)


def terms(layer: Layer, captured: dict[int, Captured], leaves: list[jax.Array]) -> Terms:
    """The :class:`Terms` of one layer from its captured calls."""
    rule = {
        "dense": _dense_terms,
        "conv": _conv_terms,
        "embed": _embed_terms,
        "norm": _norm_terms,
        PER_LAYER_VMAP: _module_terms,
    }[kind(layer)]
    return rule(layer, [captured[c.index] for c in layer.calls], leaves)


def _linear_terms(
    a: jax.Array,
    g: jax.Array,
    has_bias: bool,
    to_kernel: Callable[[jax.Array], jax.Array],
    bias_shape: tuple[int, ...],
) -> Terms:
    """Terms of ``y = A W + b`` with ``A`` [B, T, d_in] and ``G`` [B, T, d_out]."""
    b, t, d_in = a.shape
    d_out = g.shape[-1]
    per_example = None
    if t == 1:
        branch = "outer"
        kernel_sq = _sq(a) * _sq(g)
    elif use_ghost(t, d_in, d_out):
        branch = "ghost"
        gram_a = jnp.einsum("btd,bsd->bts", a, a)
        gram_g = jnp.einsum("bte,bse->bts", g, g)
        kernel_sq = jnp.einsum("bts,bts->b", gram_a, gram_g)
    else:
        branch = "direct"
        per_example = jnp.einsum("btd,bte->bde", a, g)
        kernel_sq = _sq(per_example)
    sq_norms = {"kernel": kernel_sq}
    if has_bias:
        bias_per_example = jnp.sum(g, axis=1)
        sq_norms["bias"] = _sq(bias_per_example)

    def weighted_sum(factors, row_ok):
        f = factors["kernel"]
        if per_example is not None:
            kernel = weigh_rows(per_example, f, row_ok)
        else:
            af = zero_bad_rows(a, row_ok) * f.astype(a.dtype)[:, None, None]
            gz = zero_bad_rows(g, row_ok)
            kernel = jnp.matmul(af.reshape(b * t, d_in).T, gz.reshape(b * t, d_out))
        out = {"kernel": to_kernel(kernel)}
        if has_bias:
            out["bias"] = weigh_rows(bias_per_example, factors["bias"], row_ok).reshape(bias_shape)
        return out

    return Terms(sq_norms, weighted_sum, branch)


def _stack_positions(parts: list[jax.Array], width: int) -> jax.Array:
    return jnp.concatenate([p.reshape(p.shape[0], -1, width) for p in parts], axis=1)


def _dense_terms(layer: Layer, captured: list[Captured], leaves) -> Terms:
    kernel = leaves[layer.leaves["kernel"]]
    out_shape = kernel.shape[kernel.ndim - _out_rank(layer) :]
    d_out = math.prod(out_shape)
    a = _stack_positions([c.arrays[0].astype(kernel.dtype) for c in captured], kernel.size // d_out)
    g = _stack_positions([c.out_grad.astype(kernel.dtype) for c in captured], d_out)
    return _linear_terms(a, g, "bias" in layer.leaves, lambda m: m.reshape(kernel.shape), out_shape)


def _out_rank(layer: Layer) -> int:
    m = layer.module
    if type(m) is nn.DenseGeneral:
        return 1 if isinstance(m.features, int) else len(m.features)
    return 1


def conv_patches(conv: nn.Conv, x: jax.Array) -> jax.Array:
    """The patches [B, *out_spatial, C * prod(kernel_size)] that ``conv`` multiplies.

    Padding, strides and dilations follow ``flax.linen.Conv``; the patch
    features are ordered ``(C, *kernel_size)``.
    """
    rank = _kernel_rank(conv)
    kernel_size = (
        (conv.kernel_size,) * rank if isinstance(conv.kernel_size, int) else tuple(conv.kernel_size)
    )

    def broadcast(v):
        v = 1 if v is None else v
        return (v,) * rank if isinstance(v, int) else tuple(v)

    strides, in_dil, k_dil = map(
        broadcast, (conv.strides, conv.input_dilation, conv.kernel_dilation)
    )
    padding = canonicalize_padding(conv.padding, rank)
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, k_dil, strict=True)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        x = jnp.pad(x, [(0, 0), (k_dil[0] * (kernel_size[0] - 1), 0), (0, 0)])
        padding = "VALID"
    if all(d == 1 for d in in_dil):
        return _sliced_patches(x, kernel_size, strides, padding, k_dil)
    spatial = tuple(range(1, rank + 1))
    numbers = jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, rank + 1) + spatial,
        rhs_spec=(rank + 1, rank) + tuple(range(rank)),
        out_spec=(0, rank + 1) + spatial,
    )
    return jax.lax.conv_general_dilated_patches(
        x,
        kernel_size,
        strides,
        padding,
        lhs_dilation=in_dil,
        rhs_dilation=k_dil,
        dimension_numbers=numbers,
        precision=jax.lax.Precision.HIGHEST,
    )


def _sliced_patches(x, kernel_size, strides, padding, k_dil) -> jax.Array:
    """Patches by strided slicing (a copy), cheaper on CPU than the one-hot convolution."""
    rank = len(kernel_size)
    spatial = x.shape[1:-1]
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, k_dil, strict=True)]
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(spatial, dilated, strides, padding)
    x = jnp.pad(x, [(0, 0), *padding, (0, 0)])
    out = [
        (n + lo + hi - k) // s + 1
        for n, (lo, hi), k, s in zip(spatial, padding, dilated, strides, strict=True)
    ]
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        start = [0] + [o * d for o, d in zip(offset, k_dil, strict=True)] + [0]
        limit = [x.shape[0]]
        limit += [st + (m - 1) * s + 1 for st, m, s in zip(start[1:-1], out, strides, strict=True)]
        slices.append(jax.lax.slice(x, start, limit + [x.shape[-1]], [1, *strides, 1]))
    stacked = jnp.stack(slices, axis=-1)  # [B, *out, C, prod(kernel_size)]
    return stacked.reshape(stacked.shape[: rank + 1] + (-1,))


def _conv_terms(layer: Layer, captured: list[Captured], leaves) -> Terms:
    kernel = leaves[layer.leaves["kernel"]]
    *k, c_in, c_out = kernel.shape
    d_in = c_in * math.prod(k)
    patches = [conv_patches(layer.module, cap.arrays[0].astype(kernel.dtype)) for cap in captured]
    a = _stack_positions(patches, d_in)
    g = _stack_positions([cap.out_grad.astype(kernel.dtype) for cap in captured], c_out)

    def to_kernel(m):
        return jnp.moveaxis(m.reshape((c_in, *k, c_out)), 0, len(k))

    return _linear_terms(a, g, "bias" in layer.leaves, to_kernel, (c_out,))


def _embed_terms(layer: Layer, captured: list[Captured], leaves) -> Terms:
    table = leaves[layer.leaves["embedding"]]
    vocab, d = table.shape
    ids = jnp.concatenate([c.arrays[0].reshape(c.arrays[0].shape[0], -1) for c in captured], 1)
    g = _stack_positions([c.out_grad.astype(table.dtype) for c in captured], d)
    b, t = ids.shape
    per_example = None
    if t == 1:
        branch, sq = "outer", _sq(g)
    elif use_ghost(t, vocab, d):
        branch = "ghost"
        same = (ids[:, :, None] == ids[:, None, :]).astype(g.dtype)
        sq = jnp.einsum("bts,bts->b", same, jnp.einsum("btd,bsd->bts", g, g))
    else:
        branch = "direct"
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
        per_example = jnp.zeros((b, vocab, d), g.dtype).at[rows, ids].add(g)
        sq = _sq(per_example)

    def weighted_sum(factors, row_ok):
        f = factors["embedding"]
        if per_example is not None:
            return {"embedding": weigh_rows(per_example, f, row_ok)}
        weighted = zero_bad_rows(g, row_ok) * f.astype(g.dtype)[:, None, None]
        summed = jnp.zeros((vocab, d), g.dtype).at[ids.reshape(-1)].add(weighted.reshape(-1, d))
        return {"embedding": summed}

    return Terms({"embedding": sq}, weighted_sum, branch)


def _norm_terms(layer: Layer, captured: list[Captured], leaves) -> Terms:
    """LayerNorm/GroupNorm/RMSNorm: ``y = x_hat * scale + bias`` per feature."""
    unit = {
        name: (jnp.ones_like if name == "scale" else jnp.zeros_like)(leaves[i])
        for name, i in layer.leaves.items()
    }
    per_example = {name: 0.0 for name in layer.leaves}
    for cap in captured:
        x = cap.arrays[0]
        g = cap.out_grad
        axes = tuple(range(1, g.ndim - 1))
        if "scale" in unit:
            x_hat = layer.module.apply({"params": unit}, x)
            per_example["scale"] = per_example["scale"] + jnp.sum(g * x_hat, axis=axes)
        if "bias" in unit:
            per_example["bias"] = per_example["bias"] + jnp.sum(g, axis=axes)
    per_example = {
        n: v.astype(leaves[layer.leaves[n]].dtype).reshape((-1,) + leaves[layer.leaves[n]].shape)
        for n, v in per_example.items()
    }
    return _materialized(per_example, "direct")


def _materialized(per_example: dict[str, jax.Array], branch: str) -> Terms:
    def weighted_sum(factors, row_ok):
        return {n: weigh_rows(v, factors[n], row_ok) for n, v in per_example.items()}

    return Terms({n: _sq(v) for n, v in per_example.items()}, weighted_sum, branch)


def _call_grads(call: Call, cap: Captured, own: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example gradients of a module's own leaves through one call (vmap of its VJP)."""

    def one(own, arrays, out_grad):
        def apply(own):
            variables = dict(cap.variables)
            variables["params"] = {**variables["params"], **own}
            args, kwargs = cap.args(call, arrays)
            return call.module.apply(variables, *args, method=call.method, **kwargs)

        _, vjp_fn = jax.vjp(apply, own)
        return vjp_fn(out_grad)[0]

    rows = tuple(a[:, None] for a in cap.arrays)
    grads = jax.tree_util.tree_map(lambda o: o[:, None], cap.out_grad)
    return jax.vmap(one, in_axes=(None, 0, 0))(own, rows, grads)


def _module_terms(layer: Layer, captured: list[Captured], leaves) -> Terms:
    """Any other module: per-example gradients of its own leaves only."""
    own = {name: leaves[i] for name, i in layer.leaves.items()}
    per_example = None
    for call, cap in zip(layer.calls, captured, strict=True):
        grads = _call_grads(call, cap, own)
        per_example = (
            grads if per_example is None else jax.tree_util.tree_map(jnp.add, per_example, grads)
        )
    return _materialized(per_example, PER_LAYER_VMAP)

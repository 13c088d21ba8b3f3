"""Per-example gradients (``jax.vmap``) and their clipping.

The contract every clipping path keeps: for a loss ``loss_fn(params, batch) ->
per-example losses [B]`` and a ``mask [B]``, the clipped sum is

    sum_i mask_i * f_i * g_i,   f_i = min(1, C / ||g_i||)

where ``g_i`` is example ``i``'s gradient. A row whose gradient is not finite
gets ``f_i = 0``: it contributes exactly zero and shows up as a non-finite
entry of ``per_example_norms`` (see :func:`count_nonfinite`).

Per-layer clipping: ``l2_clip_norm`` may be a pytree *prefix* of the params
with a float per group (e.g. ``{"params": {"Dense_0": 0.5, "Dense_1": 0.5}}``).
Each group of each row is clipped to its own bound; the L2 sensitivity of the
sum is then ``sqrt(sum_g C_g^2)`` (:func:`sensitivity`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

import dpjax._validate as _validate
from dpjax.choices import ClippingMethod, values
from dpjax.clip_math import (
    LossFn,
    PyTree,
    clip_factors,
    count_nonfinite,
    group_factors,
    group_leaves,
    per_example_grads,
    sensitivity,
    sq_norms,
    weigh_rows,
    zero_bad_rows,
)

ClippedGradFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array]]

METHODS = values(ClippingMethod)


def per_layer_clip_norms(params: PyTree, l2_clip_norm: float, depth: int = 2) -> PyTree:
    """Splits a total bound equally over the parameter groups found at ``depth``.

    With G groups each gets ``l2_clip_norm / sqrt(G)``, so :func:`sensitivity`
    of the result is ``l2_clip_norm``. ``depth=2`` groups Flax params
    ``{"params": {"Dense_0": ..., ...}}`` by layer.
    """
    _validate.positive("l2_clip_norm", l2_clip_norm)
    _validate.positive_int("depth", depth)

    def prefix(tree, level):
        if level == 0 or not isinstance(tree, dict):
            return 1.0
        return {k: prefix(v, level - 1) for k, v in tree.items()}

    groups = prefix(params, depth)
    g = len(jax.tree_util.tree_leaves(groups))
    return jax.tree_util.tree_map(lambda _: l2_clip_norm / math.sqrt(g), groups)


def clip_and_sum(
    grads: PyTree, mask: jax.Array, l2_clip_norm: float | PyTree
) -> tuple[PyTree, jax.Array]:
    """Clips stacked per-example gradients [B, ...] and sums them over rows.

    Each row's contribution (of each group, for per-layer bounds) has L2 norm at
    most its bound; rows with ``mask=0`` or a non-finite gradient contribute 0.
    Returns ``(clipped_sum, per_example_norms)`` with the global norms before
    clipping.
    """
    bounds, groups = group_leaves(l2_clip_norm, grads)
    norms, row_ok, factors = group_factors([sq_norms(g) for g in groups], mask, bounds)
    summed_groups = [
        jax.tree_util.tree_map(lambda leaf, f=factor: weigh_rows(leaf, f, row_ok), sub)
        for sub, factor in zip(groups, factors, strict=True)
    ]
    clip_def = jax.tree_util.tree_structure(l2_clip_norm)
    return jax.tree_util.tree_unflatten(clip_def, summed_groups), norms


def _check_mask(batch: PyTree, mask: jax.Array) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("Expected batch to contain at least one array.")
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"Expected every batch array to share one leading batch axis; got sizes {sizes}."
        )
    (b,) = sizes
    if mask.shape != (b,):
        raise ValueError(f"Expected mask.shape=({b},) to match the batch size; got {mask.shape}.")
    return b


def clipped_grad(
    loss_fn: LossFn,
    *,
    l2_clip_norm: float | PyTree,
    microbatch_size: int | None = None,
    method: str = "vmap",
) -> ClippedGradFn:
    """Builds ``f(params, batch, mask) -> (clipped_sum, per_example_norms)``.

    ``loss_fn(params, batch)`` returns per-example losses [B]. ``clipped_sum`` is
    the sum over rows with ``mask=1`` of each row's gradient clipped to L2 norm
    ``l2_clip_norm`` (or, per layer, each group to its own bound);
    ``per_example_norms`` [B] are the global norms before clipping.

    Guarantee: each row's contribution has L2 norm at most
    ``sensitivity(l2_clip_norm)``; masked and non-finite rows contribute 0.

    ``microbatch_size`` evaluates the batch in chunks of that many rows (with
    ``lax.scan``) to bound memory; the result is the same. ``method`` chooses
    the clipping path, never the result: ``"vmap"`` materializes per-example
    gradients; ``"fast"`` uses ghost norms and book-keeping (one backward pass);
    ``"fast_lean"`` the same fast path with the clipped sum from a second,
    reweighted backward pass (about the memory of a plain gradient, for one more
    backward pass); ``"auto"`` is ``"fast"`` that falls back to vmap when planning
    fails. Leaves the fast path has no rule for take the vmap path in every fast
    method, named in a logged warning (:func:`dpjax.fast_clipping.make_chunk`).
    """
    sensitivity(l2_clip_norm)  # validates every bound
    _validate.one_of("method", method, METHODS)
    if microbatch_size is not None:
        _validate.positive_int("microbatch_size", microbatch_size)

    def vmap_chunk(params, batch, mask):
        return clip_and_sum(per_example_grads(loss_fn, params, batch), mask, l2_clip_norm)

    chunk = vmap_chunk
    if method != ClippingMethod.VMAP:
        from dpjax.fast_clipping import make_chunk  # noqa: PLC0415  (flax: keep `import dpjax` light)

        chunk = make_chunk(loss_fn, l2_clip_norm=l2_clip_norm, method=method, fallback=vmap_chunk)

    @jax.jit
    def f(params, batch, mask):
        b = _check_mask(batch, mask)
        if microbatch_size is None or microbatch_size >= b:
            return chunk(params, batch, mask)
        return _microbatched(chunk, params, batch, mask, microbatch_size)

    return f


def _microbatched(chunk_fn, params, batch, mask, microbatch_size: int):
    """Runs ``chunk_fn`` over consecutive chunks with ``lax.scan`` and adds them up."""
    b = mask.shape[0]
    if b % microbatch_size:
        raise ValueError(
            f"Expected microbatch_size={microbatch_size} to divide the batch size {b}."
        )
    n = b // microbatch_size

    def split(a):
        return a.reshape((n, microbatch_size) + a.shape[1:])

    chunks = jax.tree_util.tree_map(split, (batch, mask))
    first_sum, _ = jax.eval_shape(chunk_fn, params, *jax.tree_util.tree_map(lambda a: a[0], chunks))
    zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first_sum)

    def body(acc, xs):
        s, norms = chunk_fn(params, *xs)
        return jax.tree_util.tree_map(jnp.add, acc, s), norms

    total, norms = jax.lax.scan(body, zero, chunks)
    return total, norms.reshape(b)


__all__ = [
    "METHODS",
    "clip_and_sum",
    "clip_factors",
    "clipped_grad",
    "count_nonfinite",
    "group_factors",
    "per_example_grads",
    "per_layer_clip_norms",
    "sensitivity",
    "sq_norms",
    "weigh_rows",
    "zero_bad_rows",
]

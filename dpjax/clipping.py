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
from typing import Any

import jax
import jax.numpy as jnp

from dpjax import _validate

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
ClippedGradFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array]]

METHODS = ("vmap", "fast", "auto")


def sensitivity(l2_clip_norm: float | PyTree) -> float:
    """The L2 sensitivity of a clipped sum: ``C``, or ``sqrt(sum_g C_g^2)`` per layer."""
    norms = jax.tree_util.tree_leaves(l2_clip_norm)
    if not norms:
        raise ValueError(f"Expected l2_clip_norm={l2_clip_norm!r} to hold at least one bound.")
    for c in norms:
        _validate.positive("l2_clip_norm", c)
    return math.sqrt(sum(float(c) ** 2 for c in norms))


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


def per_example_grads(loss_fn: LossFn, params: PyTree, batch: PyTree) -> PyTree:
    """Gradients of each example's loss, stacked on a leading axis [B, ...]."""

    def single_loss(p, example):
        one = jax.tree_util.tree_map(lambda a: a[None], example)
        return loss_fn(p, one)[0]

    return jax.vmap(jax.grad(single_loss), in_axes=(None, 0))(params, batch)


def _group_leaves(l2_clip_norm: PyTree, tree: PyTree) -> tuple[list[float], list[PyTree]]:
    """Pairs each clip bound with the subtree of ``tree`` it governs."""
    bounds, clip_def = jax.tree_util.tree_flatten(l2_clip_norm)
    try:
        groups = clip_def.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"Expected l2_clip_norm to be a float or a pytree prefix of the params; "
            f"got structure {clip_def}: {err}"
        ) from None
    return bounds, groups


def sq_norms(tree: PyTree) -> jax.Array:
    """Per-example squared L2 norm of a stacked pytree [B, ...] -> [B]."""
    return sum(
        jnp.sum(jnp.square(leaf.astype(jnp.float32)).reshape(leaf.shape[0], -1), axis=1)
        for leaf in jax.tree_util.tree_leaves(tree)
    )


def clip_factors(norms: jax.Array, mask: jax.Array, l2_clip_norm: float) -> jax.Array:
    """``mask_i * min(1, C / norm_i)``, and 0 where ``norm_i`` is not finite."""
    safe = jnp.where(jnp.isfinite(norms), norms, 0.0)
    factor = jnp.minimum(1.0, l2_clip_norm / jnp.maximum(safe, 1e-30))
    return jnp.where(jnp.isfinite(norms), factor, 0.0) * mask.astype(factor.dtype)


def group_factors(
    group_sq: list[jax.Array], mask: jax.Array, bounds: list[float]
) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """``(norms, row_ok, factors)`` from each clipping group's squared norms [B].

    ``norms`` are the global norms, ``row_ok`` says where they are finite, and
    each group's factor is ``mask_i * min(1, bound / group_norm_i)``, 0 where
    ``row_ok`` is False. Both clipping paths weigh rows with these factors.
    """
    norms = jnp.sqrt(sum(group_sq))
    row_ok = jnp.isfinite(norms)
    factors = [
        clip_factors(jnp.sqrt(sq), mask, bound) * row_ok
        for bound, sq in zip(bounds, group_sq, strict=True)
    ]
    return norms, row_ok, factors


def zero_bad_rows(x: jax.Array, row_ok: jax.Array) -> jax.Array:
    """``x`` [B, ...] with the rows where ``row_ok`` is False set to 0 (no ``0 * NaN``)."""
    return jnp.where(row_ok.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def weigh_rows(per_example: jax.Array, factor: jax.Array, row_ok: jax.Array) -> jax.Array:
    """``sum_i factor_i * per_example_i`` over the rows that are finite."""
    return jnp.tensordot(
        factor.astype(per_example.dtype), zero_bad_rows(per_example, row_ok), axes=1
    )


def clip_and_sum(
    grads: PyTree, mask: jax.Array, l2_clip_norm: float | PyTree
) -> tuple[PyTree, jax.Array]:
    """Clips stacked per-example gradients [B, ...] and sums them over rows.

    Each row's contribution (of each group, for per-layer bounds) has L2 norm at
    most its bound; rows with ``mask=0`` or a non-finite gradient contribute 0.
    Returns ``(clipped_sum, per_example_norms)`` with the global norms before
    clipping.
    """
    bounds, groups = _group_leaves(l2_clip_norm, grads)
    norms, row_ok, factors = group_factors([sq_norms(g) for g in groups], mask, bounds)
    summed_groups = [
        jax.tree_util.tree_map(lambda leaf, f=factor: weigh_rows(leaf, f, row_ok), sub)
        for sub, factor in zip(groups, factors, strict=True)
    ]
    clip_def = jax.tree_util.tree_structure(l2_clip_norm)
    return jax.tree_util.tree_unflatten(clip_def, summed_groups), norms


def count_nonfinite(per_example_norms: jax.Array, mask: jax.Array) -> jax.Array:
    """How many unmasked rows had a non-finite gradient (and were dropped)."""
    return jnp.sum((~jnp.isfinite(per_example_norms)) & (mask > 0))


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
    the clipping path: ``"vmap"`` materializes per-example gradients.
    """
    sensitivity(l2_clip_norm)  # validates every bound
    _validate.one_of("method", method, METHODS)
    if microbatch_size is not None:
        _validate.positive_int("microbatch_size", microbatch_size)

    def vmap_chunk(params, batch, mask):
        return clip_and_sum(per_example_grads(loss_fn, params, batch), mask, l2_clip_norm)

    chunk = vmap_chunk
    if method in ("fast", "auto"):
        from dpjax.fast_clipping import make_chunk  # noqa: PLC0415  (imports this module)

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

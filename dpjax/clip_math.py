"""The per-row clipping arithmetic that every clipping path shares.

Both the vmap path (:mod:`dpjax.clipping`) and the fast path
(:mod:`dpjax.fast_clipping`) reduce a chunk to per-row squared norms per
clipping group, turn them into factors ``f_i = mask_i * min(1, C / ||g_i||)``
(0 where the norm is not finite), and weigh rows by those factors. This module
sits below both, so neither imports the other's internals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import dpjax._validate as _validate

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

def sensitivity(l2_clip_norm: float | PyTree) -> float:
    """The L2 sensitivity of a clipped sum: ``C``, or ``sqrt(sum_g C_g^2)`` per layer."""
    norms = jax.tree_util.tree_leaves(l2_clip_norm)
    if not norms:
        raise ValueError(f"Expected l2_clip_norm={l2_clip_norm!r} to hold at least one bound.")
    for c in norms:
        _validate.positive("l2_clip_norm", c)
    return math.sqrt(sum(float(c) ** 2 for c in norms))
def per_example_grads(loss_fn: LossFn, params: PyTree, batch: PyTree) -> PyTree:
    """Gradients of each example's loss, stacked on a leading axis [B, ...]."""

    def single_loss(p, example):
        one = jax.tree_util.tree_map(lambda a: a[None], example)
        return loss_fn(p, one)[0]

    return jax.vmap(jax.grad(single_loss), in_axes=(None, 0))(params, batch)
def group_leaves(l2_clip_norm: PyTree, tree: PyTree) -> tuple[list[float], list[PyTree]]:
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
def count_nonfinite(per_example_norms: jax.Array, mask: jax.Array) -> jax.Array:
    """How many unmasked rows had a non-finite gradient (and were dropped)."""
    return jnp.sum((~jnp.isfinite(per_example_norms)) & (mask > 0))

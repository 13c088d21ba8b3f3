"""The fast clipped sum: ghost norms for the factors, book-keeping for the sum.

One forward and one backward pass of the loss (differentiated with respect to
the layers' outputs, not their weights) give every planned layer's inputs ``A``
and output gradients ``G``. From them:

1. per-example squared norms of each leaf (:mod:`~dpjax.fast_clipping.rules`);
2. the factors ``f_i = mask_i * min(1, C / ||g_i||)`` per clipping group, 0 on
   rows whose norm is not finite;
3. each leaf's clipped sum ``sum_i f_i g_i`` by book-keeping, e.g.
   ``A^T diag(f) G`` for a Dense kernel, which costs what its ordinary weight
   gradient costs.

Leaves that no layer rule reaches get their per-example gradients from
``jax.vmap`` over the whole loss, restricted to those leaves. No second
backward pass is ever needed: book-keeping covers every planned layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import dpjax._validate as _validate
import dpjax.fast_clipping.rules as rules
from dpjax.clip_math import (
    LossFn,
    group_factors,
    group_leaves,
    per_example_grads,
    sq_norms,
    weigh_rows,
)
from dpjax.fast_clipping.capture import Plan, capture, discover

PyTree = Any
METHODS = ("fast", "auto")
WHOLE_MODEL_VMAP = "whole-model vmap"
logger = logging.getLogger("dpjax.fast_clipping")


def _leaf_names(params: PyTree) -> list[str]:
    paths, _ = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(p) for p, _ in paths]


def _leftover_grads(loss_fn, params, batch, indices: tuple[int, ...]) -> list[jax.Array]:
    """Per-example gradients [B, ...] of the given leaves only, by vmap over the whole loss."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def partial_loss(sub, batch):
        full = list(leaves)
        for i, v in zip(indices, sub, strict=True):
            full[i] = v
        return loss_fn(jax.tree_util.tree_unflatten(treedef, full), batch)

    return per_example_grads(partial_loss, [leaves[i] for i in indices], batch)


def fast_clip_and_sum(
    loss_fn: LossFn,
    plan: Plan,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    l2_clip_norm: float | PyTree,
) -> tuple[PyTree, jax.Array, list[tuple[str, str]]]:
    """``(clipped_sum, per_example_norms, branches)`` of one chunk along ``plan``.

    The same numbers as :func:`dpjax.clipping.clip_and_sum` of the per-example
    gradients: each row's contribution (per group) has L2 norm at most its
    bound; masked and non-finite rows contribute exactly 0.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    _, captured = capture(loss_fn, plan, params, batch)
    leaf_sq: dict[int, jax.Array] = {}
    weighers = []
    branches = []
    for layer in plan.layers:
        t = rules.terms(layer, captured, leaves)
        leaf_sq.update({layer.leaves[n]: sq for n, sq in t.sq_norms.items()})
        weighers.append((layer, t.weighted_sum))
        how = rules.kind(layer)
        branches.append((layer.name, how if how == t.branch else f"{how}: {t.branch}"))
    leftover = {}
    if plan.leftover:
        grads = _leftover_grads(loss_fn, params, batch, plan.leftover)
        leftover = dict(zip(plan.leftover, grads, strict=True))
        leaf_sq.update({i: sq_norms(g) for i, g in leftover.items()})
        names = _leaf_names(params)
        branches += [(names[i], WHOLE_MODEL_VMAP) for i in plan.leftover]

    index_tree = jax.tree_util.tree_unflatten(treedef, list(range(len(leaves))))
    bounds, groups = group_leaves(l2_clip_norm, index_tree)
    group_members = [jax.tree_util.tree_leaves(g) for g in groups]
    norms, row_ok, factors = group_factors(
        [sum(leaf_sq[i] for i in members) for members in group_members], mask, bounds
    )
    leaf_factor = {i: f for members, f in zip(group_members, factors, strict=True)
                   for i in members}
    summed: list[jax.Array | None] = [None] * len(leaves)
    for layer, weighted_sum in weighers:
        factors_by_name = {n: leaf_factor[i] for n, i in layer.leaves.items()}
        for n, value in weighted_sum(factors_by_name, row_ok).items():
            summed[layer.leaves[n]] = value
    for i, g in leftover.items():
        summed[i] = weigh_rows(g, leaf_factor[i], row_ok)
    summed = [s.astype(leaf.dtype) for s, leaf in zip(summed, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, summed), norms, branches


def describe(loss_fn: LossFn, params: PyTree, batch: PyTree) -> list[tuple[str, str]]:
    """How the fast path treats each layer: ``[(layer or leaf, "kind: branch")]``.

    Branches: ``outer`` (one position), ``ghost``, ``direct`` (this layer's
    per-example gradients), ``per-layer vmap`` and ``whole-model vmap`` (the
    fallbacks). Traces the loss; runs nothing.
    """
    found = []

    def trace(params, batch):
        mask = jnp.ones(jax.tree_util.tree_leaves(batch)[0].shape[0])
        plan = discover(loss_fn, params, batch)
        _, _, branches = fast_clip_and_sum(loss_fn, plan, params, batch, mask, 1.0)
        found.extend(branches)

    jax.eval_shape(trace, params, batch)
    return found


def _fallbacks(branches: list[tuple[str, str]]) -> list[str]:
    slow = (rules.PER_LAYER_VMAP, WHOLE_MODEL_VMAP)
    return [f"{name} ({how})" for name, how in branches if how.endswith(slow)]


def _make_logger() -> Callable[[int, str, str], None]:
    said: set[str] = set()

    def log_once(level: int, message: str, *args) -> None:
        text = message % args
        if text not in said:
            said.add(text)
            logger.log(level, text)

    return log_once


def make_chunk(
    loss_fn: LossFn,
    *,
    l2_clip_norm: float | PyTree,
    method: str,
    fallback: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array]],
) -> Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array]]:
    """``chunk(params, batch, mask) -> (clipped_sum, per_example_norms)`` by the fast path.

    Reached through ``dpjax.clipped_grad(..., method="fast" | "auto")``, which
    validates the arguments and jits (and microbatches) the chunk. The same
    contract, and the same numbers up to float rounding, as the vmap path
    (``fallback``): each row's contribution has L2 norm at most
    ``sensitivity(l2_clip_norm)``; masked and non-finite rows contribute 0.

    ``method="fast"`` always takes this path, with per-layer fallbacks (logged);
    ``method="auto"`` takes it when at least one layer has a fast rule and the
    loss can be traced layer by layer, and ``fallback`` otherwise (logged).
    """
    _validate.one_of("method", method, METHODS)
    log_once = _make_logger()

    def chunk(params, batch, mask):
        try:
            plan = discover(loss_fn, params, batch)
            if method == "auto" and all(
                rules.kind(x) == rules.PER_LAYER_VMAP for x in plan.layers
            ):
                log_once(logging.WARNING,
                         "clipping method 'auto': vmap path (no layer has a fast rule)")
                return fallback(params, batch, mask)
            summed, norms, branches = fast_clip_and_sum(
                loss_fn, plan, params, batch, mask, l2_clip_norm
            )
        except Exception as err:  # noqa: BLE001 (auto falls back on any tracing failure)
            if method == "fast":
                raise
            log_once(logging.WARNING, "clipping method 'auto': vmap path (%s)", err)
            return fallback(params, batch, mask)
        fallbacks = _fallbacks(branches)
        log_once(
            logging.WARNING if fallbacks else logging.INFO,
            "clipping method %r: fast path (ghost norms + book-keeping, no second backward pass); "
            "fallbacks: %s",
            method,
            ", ".join(fallbacks) or "none",
        )
        return summed, norms

    return chunk

"""Gaussian privatization of a clipped sum."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dpjax import _validate
from dpjax.clipping import sensitivity

PyTree = Any


def privatize(
    clipped_sum: PyTree,
    key: jax.Array,
    *,
    noise_multiplier: float,
    l2_clip_norm: float | PyTree,
    expected_batch_size: float,
) -> PyTree:
    """Returns ``(clipped_sum + N(0, (noise_multiplier * S)^2 I)) / expected_batch_size``.

    ``S = sensitivity(l2_clip_norm)`` (``l2_clip_norm`` itself for flat
    clipping). Every leaf gets noise from its own key split from ``key``, so
    each coordinate is independent. Guarantee: with a fresh ``key`` per step
    (e.g. ``jax.random.fold_in(key, step)``), this is the Gaussian mechanism
    with noise multiplier ``noise_multiplier`` on a sum of L2 sensitivity ``S``.
    Division is by the public expected batch size ``q * N``, never by the
    realized batch size (which would leak it).
    """
    _validate.non_negative("noise_multiplier", noise_multiplier)
    _validate.positive("expected_batch_size", expected_batch_size)
    std = noise_multiplier * sensitivity(l2_clip_norm)
    leaves, treedef = jax.tree_util.tree_flatten(clipped_sum)
    keys = jax.random.split(key, len(leaves))

    def noisy(leaf, k):
        z = jax.random.normal(k, leaf.shape, jnp.float32)
        return ((leaf.astype(jnp.float32) + std * z) / expected_batch_size).astype(leaf.dtype)

    return jax.tree_util.tree_unflatten(
        treedef, [noisy(leaf, k) for leaf, k in zip(leaves, keys, strict=True)]
    )

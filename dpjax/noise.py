"""Privatizers: turn a step's clipped sum into the noisy mean the optimizer sees.

:func:`privatize` is the Gaussian mechanism on a clipped sum; a
:class:`Privatizer` wraps such a function as an optax-style ``init``/``update``
pair whose state lives in the ``TrainState``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import dpjax._validate as _validate
from dpjax.clip_math import sensitivity
from dpjax.randomness import StreamKey, normal_like

PyTree = Any


def privatize(
    clipped_sum: PyTree,
    key: jax.Array | StreamKey,
    *,
    noise_multiplier: float,
    l2_clip_norm: float | PyTree,
    expected_batch_size: float,
) -> PyTree:
    """Returns ``(clipped_sum + N(0, (noise_multiplier * S)^2 I)) / expected_batch_size``.

    ``S = sensitivity(l2_clip_norm)`` (``l2_clip_norm`` itself for flat
    clipping). Guarantee: with a key never used before (per step), this is the
    Gaussian mechanism with noise multiplier ``noise_multiplier`` on a sum of L2
    sensitivity ``S`` -- *provided nobody else can compute the key*. Division is
    by the public expected batch size ``q * N``, never by the realized batch size
    (which would leak it).

    ``key`` is either

    - a :class:`dpjax.randomness.StreamKey` (what ``dpjax-train`` uses: a
      ChaCha20 stream of the run's 256-bit secret for this step, e.g.
      ``stream_key(secret, Stream.NOISE, step)``); each leaf reads its own range
      of the stream; or
    - an ordinary ``jax.random`` key, which the caller owns (e.g.
      ``jax.random.fold_in(key, step)``); each leaf gets a key split from it.
      A guessable key (``PRNGKey(0)``, a published seed) lets anyone replay the
      noise and subtract it: the guarantee is then void. JAX keys hold at most
      64 bits, so a key derived from a 256-bit secret is the safer choice.
    """
    _validate.non_negative("noise_multiplier", noise_multiplier)
    _validate.positive("expected_batch_size", expected_batch_size)
    std = noise_multiplier * sensitivity(l2_clip_norm)
    leaves, treedef = jax.tree_util.tree_flatten(clipped_sum)
    if isinstance(key, StreamKey):
        normals = jax.tree_util.tree_leaves(normal_like(leaves, key))
    else:
        keys = jax.random.split(key, len(leaves))
        normals = [jax.random.normal(k, leaf.shape, jnp.float32)
                   for leaf, k in zip(leaves, keys, strict=True)]

    def noisy(leaf, z):
        return ((leaf.astype(jnp.float32) + std * z) / expected_batch_size).astype(leaf.dtype)

    return jax.tree_util.tree_unflatten(
        treedef, [noisy(leaf, z) for leaf, z in zip(leaves, normals, strict=True)]
    )


class Privatizer(NamedTuple):
    """An optax-style privatizer: ``init(params) -> state`` and
    ``update(clipped_sum, state, key) -> (noisy_mean, state)``.

    The state lives in the ``TrainState`` (and so in checkpoints): a stateful
    privatizer (correlated noise) needs no change to the step, the checkpoint or
    resume. ``key`` is the step's key (``dpjax.train.noise_key``), never reused.
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, Any], tuple[PyTree, PyTree]]


def gaussian_privatizer(
    *, noise_multiplier: float, sensitivity: float, expected_batch_size: float
) -> Privatizer:
    """Independent Gaussian noise each step: :func:`privatize` with no state.

    Guarantee: each step is the Gaussian mechanism with noise standard deviation
    ``noise_multiplier * sensitivity`` on a sum whose sensitivity (to one row,
    add/remove) is ``sensitivity``, divided by the public ``expected_batch_size``.
    """
    _validate.non_negative("noise_multiplier", noise_multiplier)
    _validate.positive("sensitivity", sensitivity)
    _validate.positive("expected_batch_size", expected_batch_size)

    def init(params: PyTree) -> PyTree:
        del params
        return ()

    def update(clipped_sum: PyTree, state: PyTree, key) -> tuple[PyTree, PyTree]:
        noisy = privatize(clipped_sum, key, noise_multiplier=noise_multiplier,
                          l2_clip_norm=sensitivity, expected_batch_size=expected_batch_size)
        return noisy, state

    return Privatizer(init, update)


def mean_privatizer() -> Privatizer:
    """No privacy: the non-private baseline's ``(sum, count) -> sum / max(count, 1)``.

    The count is the realized number of rows (it leaks the batch size): only for
    ``dp.enabled=false``.
    """

    def init(params: PyTree) -> PyTree:
        del params
        return ()

    def update(summed: PyTree, state: PyTree, key) -> tuple[PyTree, PyTree]:
        del key
        grads, n = summed
        return jax.tree_util.tree_map(lambda g: g / jnp.maximum(n, 1), grads), state

    return Privatizer(init, update)


def scale_privatizer(*, expected_batch_size: float) -> Privatizer:
    """The privatizer of distributed noise: the aggregate arrives noised (each SecAgg
    party added its share), so only the division by the public ``q N`` is left."""
    _validate.positive("expected_batch_size", expected_batch_size)

    def init(params: PyTree) -> PyTree:
        del params
        return ()

    def update(total: PyTree, state: PyTree, key) -> tuple[PyTree, PyTree]:
        del key
        return jax.tree_util.tree_map(lambda g: g / expected_batch_size, total), state

    return Privatizer(init, update)

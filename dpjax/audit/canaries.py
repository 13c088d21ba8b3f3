"""Canaries: examples (or gradients) planted to test whether a release reveals them.

Two kinds, both inserted through the step's ordinary data path as rows of a batch:

- ``input`` canaries: real inputs that are mislabeled (the class the model finds
  least likely) or out of distribution (the training input scaled up), chosen by
  their gradient norm at the audited parameters: the largest wins, so that
  clipping bounds the canary's contribution to exactly the clip norm. They work
  with any model and clipping path.
- ``dirac`` (white-box gradient) canaries: the canary row's loss is replaced by
  ``M * s * theta_j`` for one parameter coordinate ``theta_j`` and a sign ``s``,
  so its gradient is ``M s e_j`` and its clipped gradient ``C s e_j`` (Nasr et al.
  2023's Dirac canary). A row with ``s = -1`` is the "anti-canary" a replace-one
  audit swaps in.

Every choice is made from a seed the audit records (``audit.seed``), never from
the private data's statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from dpjax.clip_math import per_example_grads, sq_norms

PyTree = Any
DIRAC_MAGNITUDE = 1e4  # the Dirac canary's raw gradient norm: far above any clip norm


@dataclasses.dataclass(frozen=True)
class InputCanary:
    """An input canary: the row ``(x, y)`` and how it was chosen."""

    x: np.ndarray
    y: np.ndarray
    kind: str  # "mislabeled" or "out_of_distribution"
    source_index: int  # the training example it was made from
    grad_norm: float  # its gradient norm at the audited parameters, before clipping


def input_canary(loss_fn, params: PyTree, x: np.ndarray, y: np.ndarray, num_classes: int,
                 seed: int, candidates: int = 64, logits_fn: Callable | None = None
                 ) -> InputCanary:
    """The candidate with the largest gradient norm among ``candidates`` training inputs
    (drawn with ``seed``), each mislabeled (the next class, or the least likely one when
    ``logits_fn`` is given) or scaled out of distribution (x 10)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0xCA1A,)))
    idx = rng.choice(len(x), size=min(candidates, len(x)), replace=False)
    xs, ys = x[idx], y[idx]
    if logits_fn is not None:
        wrong = np.asarray(jnp.argmin(logits_fn(params, jnp.asarray(xs)), axis=-1), np.int32)
        wrong = np.where(wrong == ys, (ys + 1) % num_classes, wrong).astype(ys.dtype)
    else:
        wrong = ((ys + 1) % num_classes).astype(ys.dtype)
    pool_x = np.concatenate([xs, 10.0 * xs]).astype(x.dtype)
    pool_y = np.concatenate([wrong, ys])
    kinds = ["mislabeled"] * len(idx) + ["out_of_distribution"] * len(idx)
    norms = np.sqrt(np.asarray(sq_norms(per_example_grads(
        loss_fn, params, (jnp.asarray(pool_x), jnp.asarray(pool_y))))))
    norms = np.where(np.isfinite(norms), norms, -1.0)
    best = int(np.argmax(norms))
    return InputCanary(pool_x[best], pool_y[best], kinds[best],
                       int(idx[best % len(idx)]), float(norms[best]))


def dirac_loss(loss_fn, params: PyTree, leaf: int = 0, coordinate: int = 0,
               magnitude: float = DIRAC_MAGNITUDE):
    """``loss_fn`` extended to batches ``(x, y, sign)``: a row with ``sign = 0`` keeps its
    loss, a row with ``sign = s != 0`` has loss ``magnitude * s * theta_j`` instead (its
    gradient is the Dirac ``magnitude * s * e_j`` on coordinate ``coordinate`` of leaf
    ``leaf``). Returns ``(loss, unit direction e_j as a pytree like params)``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not 0 <= leaf < len(leaves) or not 0 <= coordinate < leaves[leaf].size:
        raise ValueError(f"Expected leaf={leaf} and coordinate={coordinate} inside the "
                         f"parameters ({len(leaves)} leaves).")

    def loss(params, batch):
        x, y, sign = batch
        theta = jax.tree_util.tree_leaves(params)[leaf].reshape(-1)[coordinate]
        base = loss_fn(params, (x, y))
        return jnp.where(sign != 0, magnitude * sign * theta, base)

    direction = [jnp.zeros_like(a) for a in leaves]
    direction[leaf] = direction[leaf].reshape(-1).at[coordinate].set(1.0).reshape(
        leaves[leaf].shape)
    return loss, jax.tree_util.tree_unflatten(treedef, direction)


@dataclasses.dataclass(frozen=True)
class CanarySet:
    """``m`` canary rows for a one-run audit and the training rows they leave behind.

    ``x[i], y[i]`` is canary i's row; ``rest`` indexes the training rows that stay
    (all of them for Dirac canaries, the others for input canaries made from
    training rows); ``coordinates`` are the Dirac canaries' flat parameter indices.
    """

    x: np.ndarray
    y: np.ndarray
    kind: str  # "mislabeled" or "dirac"
    rest: np.ndarray
    source_indices: np.ndarray  # the training rows each canary was made from
    coordinates: np.ndarray | None = None


def _choice_rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(salt,)))


def mislabeled_canaries(x: np.ndarray, y: np.ndarray, num_classes: int, num_canaries: int,
                        seed: int) -> CanarySet:
    """``num_canaries`` training rows drawn with ``seed``, set aside and each relabeled with a
    uniformly random wrong class (Steinke, Nasr, Jagielski 2023, Section 7: canaries are
    training examples, so ``num_canaries`` is at most half the training set).

    A wrong label makes the loss high, so the gradient is large (clipped to exactly the
    clip norm for most rows) and the model learns it only from the canary itself; a
    random wrong class (not the least likely one) spreads the canaries' gradients over
    the classes, so one included canary moves the others' scores less.
    """
    if not 1 <= num_canaries <= len(x) // 2:
        raise ValueError(f"Expected num_canaries={num_canaries!r} in [1, {len(x) // 2}] (at "
                         f"most half of the {len(x)} training rows).")
    if num_classes < 2:
        raise ValueError(f"Expected num_classes={num_classes!r} >= 2 to mislabel a row.")
    rng = _choice_rng(seed, 0x0E1A)
    order = rng.permutation(len(x))
    source, rest = order[:num_canaries], np.sort(order[num_canaries:])
    shift = rng.integers(1, num_classes, size=num_canaries)
    wrong = ((y[source].astype(np.int64) + shift) % num_classes).astype(y.dtype)
    return CanarySet(x[source], wrong, "mislabeled", rest, source)


def dirac_canaries(x: np.ndarray, y: np.ndarray, num_classes: int, params: PyTree,
                   num_canaries: int, seed: int) -> CanarySet:
    """``num_canaries`` Dirac canaries on distinct parameter coordinates drawn with ``seed``.

    Canary i is a row whose label is ``num_classes + i`` (a marker no real row has); under
    :func:`dirac_rows_loss` its loss is ``M * theta[coordinates[i]]``, so its clipped
    gradient is the clip norm times a unit vector of its own coordinate: every canary
    adds exactly the clip norm, on a direction no other canary touches. Its input is a
    copy of a training input (unused by the loss); no training row is set aside.
    """
    num_params = sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(params))
    if not 1 <= num_canaries <= num_params:
        raise ValueError(f"Expected num_canaries={num_canaries!r} in [1, {num_params}] (one "
                         "parameter coordinate per Dirac canary).")
    rng = _choice_rng(seed, 0xD1AC)
    coordinates = np.sort(rng.choice(num_params, size=num_canaries, replace=False))
    source = rng.integers(0, len(x), size=num_canaries)
    markers = (num_classes + np.arange(num_canaries)).astype(y.dtype)
    return CanarySet(x[source], markers, "dirac", np.arange(len(x)), source,
                     coordinates.astype(np.int64))


def dirac_rows_loss(loss_fn, num_classes: int, coordinates: np.ndarray,
                    magnitude: float = DIRAC_MAGNITUDE):
    """``loss_fn`` on ``(x, y)`` batches where a row labeled ``num_classes + i`` is Dirac
    canary i: its loss is ``magnitude * theta_flat[coordinates[i]]`` (gradient
    ``magnitude * e_{coordinates[i]}``); every other row keeps its loss."""
    coords = jnp.asarray(coordinates)

    def loss(params, batch):
        x, y = batch
        canary = y >= num_classes
        base = loss_fn(params, (x, jnp.where(canary, 0, y)))
        flat = jax.flatten_util.ravel_pytree(params)[0]
        index = coords[jnp.clip(y - num_classes, 0, coords.size - 1)]
        return jnp.where(canary, magnitude * flat[index].astype(base.dtype), base)

    return loss

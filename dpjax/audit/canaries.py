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

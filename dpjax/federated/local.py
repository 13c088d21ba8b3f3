"""Local training of the sampled users and their clipped model deltas.

Each slot's user starts from the server model and runs ``epochs`` passes over its
padded rows in local batches of ``batch_size`` (a fixed number of local steps,
``epochs * rows_per_slot / batch_size``, so every slot runs one compiled loop); a
local batch's loss is the mean over its real examples, and a batch with no real
example (padding) leaves the parameters *and* the optimizer state unchanged, so
a user with ``n`` examples takes ``epochs * ceil(n / batch_size)`` real steps, as
in FedAvg (McMahan et al. 2017, Algorithm 1, ClientUpdate). The local optimizer
is any optax transformation (SGD, SGD with momentum), started fresh each round.

A user's contribution is its *pseudo-gradient* ``server - local`` (minus the
model delta, so that the server's optax optimizer descends along it: SGD with
learning rate 1 on the average is FedAvg's ``server + mean delta``), clipped to
``l2_clip_norm`` with :func:`dpjax.clipping.clip_and_sum` (per-layer bounds too).
Guarantee: each user's clipped contribution has L2 norm at most
``sensitivity(l2_clip_norm)``, whatever its data or local training did; empty
slots and users whose delta is not finite contribute exactly zero. The local
training itself needs no bound: it runs on one user's data only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import dpjax._validate as _validate
from dpjax.clip_math import sensitivity
from dpjax.clipping import clip_and_sum

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
LOCAL_OPTIMIZERS = ("sgd", "momentum")


def local_optimizer(name: str, learning_rate: float, momentum: float = 0.9
                    ) -> optax.GradientTransformation:
    """A user's optimizer: ``"sgd"`` or ``"momentum"`` (heavy ball, ``momentum`` in [0, 1))."""
    _validate.one_of("local_optimizer", name, LOCAL_OPTIMIZERS)
    _validate.positive("local_learning_rate", learning_rate)
    if name == "sgd":
        return optax.sgd(learning_rate)
    if not 0 <= momentum < 1:
        raise ValueError(f"Expected local_momentum={momentum!r} in [0, 1).")
    return optax.sgd(learning_rate, momentum=momentum)


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """What each sampled user runs: ``epochs`` passes over at most ``max_examples`` of its
    examples in batches of ``batch_size``, with ``optimizer`` (fresh each round)."""

    optimizer: optax.GradientTransformation
    epochs: int = 1
    batch_size: int = 10
    max_examples: int = 100

    def __post_init__(self):
        _validate.positive_int("local_epochs", self.epochs)
        _validate.positive_int("local_batch_size", self.batch_size)
        _validate.positive_int("max_examples_per_user", self.max_examples)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.max_examples / self.batch_size)

    @property
    def rows_per_slot(self) -> int:
        """The padded rows of a slot: ``max_examples`` rounded up to whole local batches."""
        return self.steps_per_epoch * self.batch_size


def local_update(loss_fn: LossFn, local: LocalTraining
                 ) -> Callable[[PyTree, PyTree, jax.Array], PyTree]:
    """``(params, batch [P, ...], example_mask [P]) -> params`` after local training.

    ``loss_fn(params, batch) -> [B]`` per-example losses (dpjax's convention).
    """
    steps, b = local.steps_per_epoch, local.batch_size

    def train(params, batch, example_mask):
        def split(a):
            return a.reshape((steps, b) + a.shape[1:])

        batches = jax.tree_util.tree_map(split, batch)
        masks = split(example_mask)

        def one_step(carry, xs):
            p, opt_state = carry
            bt, m = xs
            n = jnp.sum(m)

            def mean_loss(q):
                losses = jnp.where(m > 0, loss_fn(q, bt), 0.0)
                return jnp.sum(losses) / jnp.maximum(n, 1.0)

            updates, new_state = local.optimizer.update(jax.grad(mean_loss)(p), opt_state, p)
            new_p = optax.apply_updates(p, updates)
            keep = n > 0  # a batch of padding only: no step at all (no momentum either)
            p, opt_state = jax.tree_util.tree_map(
                lambda new, old: jnp.where(keep, new, old), (new_p, new_state), (p, opt_state))
            return (p, opt_state), None

        def epoch(carry, _):
            return jax.lax.scan(one_step, carry, (batches, masks))[0], None

        start = (params, local.optimizer.init(params))
        (trained, _), _ = jax.lax.scan(epoch, start, None, length=local.epochs)
        return trained

    return train


def pseudo_gradients(loss_fn: LossFn, local: LocalTraining
                     ) -> Callable[[PyTree, PyTree], PyTree]:
    """``(params, slots) -> [S, ...]`` each slot's ``params - locally trained params``;
    ``slots = (batch [S, P, ...], example_mask [S, P])``, vmapped over the slots."""
    train = local_update(loss_fn, local)

    def one(params, slot):
        batch, example_mask = slot
        trained = train(params, batch, example_mask)
        return jax.tree_util.tree_map(lambda a, t: a - t, params, trained)

    return jax.vmap(one, in_axes=(None, 0))


def clipped_user_sum(loss_fn: LossFn, local: LocalTraining, l2_clip_norm: float | PyTree
                     ) -> Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array]]:
    """``(params, slots, slot_mask) -> (clipped_sum, user_norms [S])``: the sum over slots
    with ``slot_mask = 1`` of each user's pseudo-gradient clipped to ``l2_clip_norm`` (or
    per group, for a pytree of bounds), and each slot's norm before clipping.

    Guarantee: one user's contribution has L2 norm at most ``sensitivity(l2_clip_norm)``;
    empty slots and non-finite deltas contribute exactly zero. The signature is a
    clipped-gradient function's, so any aggregation's ``local`` takes it (a row is a slot).
    """
    sensitivity(l2_clip_norm)  # validates every bound
    deltas = pseudo_gradients(loss_fn, local)

    @jax.jit
    def clipped(params, slots, slot_mask):
        return clip_and_sum(deltas(params, slots), slot_mask, l2_clip_norm)

    return clipped

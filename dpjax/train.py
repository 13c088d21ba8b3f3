"""The training state and the jitted DP-SGD step.

One step, as data flows:

    clipped sum   = sum_i mask_i * clip(grad_i, C)        (one or more chunks)
    noisy mean    = (clipped sum + N(0, (sigma*S)^2)) / expected_batch_size
    optax update  -> new TrainState

The noise of step ``t`` comes from ``noise_key(state)``: the stream
``(NOISE, t)`` of the run's 256-bit secret (:mod:`dpjax.randomness`) when the
state holds a :class:`~dpjax.randomness.Secret` (the training loop), or
``fold_in(key, t)`` when it holds a JAX key (library use: the caller owns the
key). The state's key never changes and ``t`` only grows, so no step, also
across a resume from a checkpoint of the state, draws noise from a key used
before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpjax import _validate
from dpjax.clipping import clipped_grad, count_nonfinite, sensitivity
from dpjax.noise import privatize
from dpjax.randomness import Secret, Stream, StreamKey, stream_key

PyTree = Any
NOISE_STREAM = 0


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes: one pytree, checkpointable as is."""

    params: PyTree
    opt_state: PyTree
    step: jax.Array  # int32 scalar: the number of steps taken
    # The run's Secret (training loop), or a uint32[2] JAX key (library use, the
    # caller owns it); never advanced: each step's key is derived with the step.
    key: Secret | jax.Array


def init_state(
    params: PyTree,
    optimizer: optax.GradientTransformation,
    seed: int | None = None,
    *,
    secret: Secret | None = None,
) -> TrainState:
    """A fresh state. ``params`` are copied: the jitted steps donate (and delete) the state's.

    Give exactly one of ``secret`` (a :class:`~dpjax.randomness.Secret`, e.g.
    ``dpjax.randomness.fresh_secret()``: the noise cannot be replayed without
    it) and ``seed`` (the state holds ``PRNGKey(seed)``: whoever knows the seed
    can replay the noise, so the guarantee holds only if the seed is secret).
    """
    if (seed is None) == (secret is None):
        raise ValueError(f"Expected exactly one of seed={seed!r} and secret to be given.")
    params = jax.tree_util.tree_map(jnp.array, params)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=secret if secret is not None else jax.random.PRNGKey(seed),
    )


def noise_key(state: TrainState) -> jax.Array | StreamKey:
    """The key of this step's noise: unique per (secret or base key, step)."""
    if isinstance(state.key, Secret):
        return stream_key(state.key, Stream.NOISE, state.step)
    return jax.random.fold_in(jax.random.fold_in(state.key, NOISE_STREAM), state.step)


@flax.struct.dataclass
class StepStats:
    """Per-step diagnostics (computed from norms; no extra forward pass)."""

    mean_grad_norm: jax.Array
    clipped_fraction: jax.Array
    num_nonfinite: jax.Array
    batch_size: jax.Array


def _stats(norms: jax.Array, mask: jax.Array, l2_clip_norm: float) -> StepStats:
    real = mask > 0
    finite = jnp.isfinite(norms) & real
    n = jnp.maximum(jnp.sum(finite), 1)
    return StepStats(
        mean_grad_norm=jnp.sum(jnp.where(finite, norms, 0.0)) / n,
        clipped_fraction=jnp.sum(finite & (norms > l2_clip_norm)) / n,
        num_nonfinite=count_nonfinite(norms, mask),
        batch_size=jnp.sum(real),
    )


def combine_stats(stacked: StepStats) -> StepStats:
    """One step's stats from the stats of its parts stacked on a leading axis (chunks,
    devices): counts add, means are weighted by each part's finite rows."""
    n = stacked.batch_size - stacked.num_nonfinite
    total = jnp.maximum(jnp.sum(n), 1)
    return StepStats(
        mean_grad_norm=jnp.sum(stacked.mean_grad_norm * n) / total,
        clipped_fraction=jnp.sum(stacked.clipped_fraction * n) / total,
        num_nonfinite=jnp.sum(stacked.num_nonfinite),
        batch_size=jnp.sum(stacked.batch_size),
    )


def _add_stats(a: StepStats, b: StepStats) -> StepStats:
    return combine_stats(jax.tree_util.tree_map(lambda x, y: jnp.stack([x, y]), a, b))


@dataclasses.dataclass(frozen=True)
class DPStep:
    """The jitted pieces of a DP-SGD step.

    ``step(state, batch, mask)`` does a whole step on one physical chunk.
    ``clipped_sum(params, batch, mask)``, ``accumulate(params, summed, stats,
    batch, mask)`` (adds one more chunk to a running sum) and ``apply(state,
    summed)`` split it, so a Poisson batch larger than the physical size is
    summed over several chunks before the noise is drawn once (:meth:`run`).
    """

    step: Callable[[TrainState, PyTree, jax.Array], tuple[TrainState, StepStats]]
    clipped_sum: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, StepStats]]
    accumulate: Callable[[PyTree, PyTree, StepStats, PyTree, jax.Array],
                         tuple[PyTree, StepStats]]
    apply: Callable[[TrainState, PyTree], TrainState]

    def run(self, state: TrainState, chunks: Sequence[tuple[PyTree, jax.Array]]):
        """One step over a list of ``(batch, mask)`` chunks of one physical shape."""
        if len(chunks) == 1:
            return self.step(state, *chunks[0])
        (batch, mask), *rest = chunks
        total, stats = self.clipped_sum(state.params, batch, mask)
        # Each chunk's call takes the running sum (donated) and adds to it in
        # place: one chain of calls, no separate add per leaf and per chunk.
        for batch, mask in rest:
            total, stats = self.accumulate(state.params, total, stats, batch, mask)
        return self.apply(state, total), stats


def make_dp_step(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    noise_multiplier: float,
    l2_clip_norm: float | PyTree,
    expected_batch_size: float,
    microbatch_size: int | None = None,
    clipping_method: str = "vmap",
) -> DPStep:
    """Builds the jitted DP-SGD step for any optax optimizer (SGD -> DP-SGD, Adam -> DP-Adam).

    Guarantee: each step releases ``(sum of clipped rows + N(0, (sigma S)^2 I)) / B_exp``
    with ``S = sensitivity(l2_clip_norm)`` and a noise key never used before;
    everything after that (the optimizer) is post-processing.
    """
    _validate.non_negative("noise_multiplier", noise_multiplier)
    _validate.positive("expected_batch_size", expected_batch_size)
    flat_bound = sensitivity(l2_clip_norm)
    grad_fn = clipped_grad(
        loss_fn, l2_clip_norm=l2_clip_norm, microbatch_size=microbatch_size, method=clipping_method
    )

    def clipped_sum(params, batch, mask):
        s, norms = grad_fn(params, batch, mask)
        return s, _stats(norms, mask, flat_bound)

    def gradient(state: TrainState, summed: PyTree) -> PyTree:
        return privatize(
            summed,
            noise_key(state),
            noise_multiplier=noise_multiplier,
            l2_clip_norm=l2_clip_norm,
            expected_batch_size=expected_batch_size,
        )

    return _assemble(clipped_sum, gradient, optimizer)


def make_nonprivate_step(
    loss_fn: Callable[[PyTree, PyTree], jax.Array], optimizer: optax.GradientTransformation
) -> DPStep:
    """The same step without clipping or noise: the gradient of the mean masked loss.

    Over several chunks the per-chunk sums are added and divided by the total
    number of real rows, so the result equals one big batch.
    """

    def clipped_sum(params, batch, mask):
        def total_loss(p):
            return jnp.sum(loss_fn(p, batch) * mask)

        grads = jax.grad(total_loss)(params)
        n = jnp.sum(mask > 0)
        stats = StepStats(
            jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32), n.astype(jnp.int32)
        )
        return (grads, n), stats

    def gradient(state: TrainState, summed) -> PyTree:
        grads, n = summed
        return jax.tree_util.tree_map(lambda g: g / jnp.maximum(n, 1), grads)

    return _assemble(clipped_sum, gradient, optimizer)


def make_apply(gradient, optimizer: optax.GradientTransformation):
    """``apply(state, summed) -> state``: ``gradient(state, summed)``, then the optax update."""

    def apply(state: TrainState, summed) -> TrainState:
        updates, opt_state = optimizer.update(gradient(state, summed), state.opt_state,
                                              state.params)
        return state.replace(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            step=state.step + 1,
        )

    return apply


def add_sums(summed: PyTree, stats: StepStats, more: PyTree, more_stats: StepStats):
    """Adds one more chunk's sum and stats to the running ones."""
    return jax.tree_util.tree_map(jnp.add, summed, more), _add_stats(stats, more_stats)


def _assemble(clipped_sum, gradient, optimizer: optax.GradientTransformation) -> DPStep:
    """Jits ``clipped_sum``, ``apply`` (``gradient`` then the optax update) and both fused."""
    apply = make_apply(gradient, optimizer)

    def step(state, batch, mask):
        summed, stats = clipped_sum(state.params, batch, mask)
        return apply(state, summed), stats

    def accumulate(params, summed, stats, batch, mask):
        return add_sums(summed, stats, *clipped_sum(params, batch, mask))

    return DPStep(
        step=jax.jit(step, donate_argnums=0),
        clipped_sum=jax.jit(clipped_sum),
        accumulate=jax.jit(accumulate, donate_argnums=(1, 2)),
        apply=jax.jit(apply, donate_argnums=0),
    )


def cross_entropy_loss(apply_fn: Callable[..., jax.Array]) -> Callable[[PyTree, PyTree], jax.Array]:
    """``loss_fn(params, (x, y)) -> [B]`` softmax cross-entropy of a classifier."""

    def loss_fn(params, batch):
        x, y = batch
        logits = apply_fn({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return loss_fn

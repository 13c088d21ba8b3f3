"""The training state and the jitted DP-SGD step: one step type for every mechanism.

One step, as data flows (:meth:`DPStep.run`; the mechanism's parts are named in
:mod:`dpjax.mechanism`):

    round      = aggregation.prepare(t)                         host: SecAgg seeds, or nothing
    for each chunk of the step's batch (padded rows have mask 0):
        partial += aggregation.local(clipped_grad)(params, chunk, mask)   per party
    total      = aggregation.finish(partial, round)             plain sum, or one SecAgg round
    noisy, s   = privatizer.update(total, noise_state, noise_key(state))   + noise, / q N
    state      = optax update(noisy), step t + 1

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

import dpjax._validate as _validate
from dpjax.aggregation import Aborted, Aggregator, PlainSum, SecAggSettings, SecAggSum
from dpjax.choices import ClippingMethod
from dpjax.clip_math import count_nonfinite, sensitivity
from dpjax.clipping import clipped_grad
from dpjax.mechanism import ClippedSum
from dpjax.noise import Privatizer, gaussian_privatizer, mean_privatizer
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
    noise_state: PyTree = ()  # the privatizer's state (none for independent noise)


def init_state(
    params: PyTree,
    optimizer: optax.GradientTransformation,
    seed: int | None = None,
    *,
    secret: Secret | None = None,
    privatizer: Privatizer | None = None,
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
        noise_state=privatizer.init(params) if privatizer is not None else (),
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
    """The jitted pieces of one step, for every mechanism (plain or SecAgg aggregation,
    vmap or fast clipping, one or several chunks, one or several devices).

    ``clipped_sum(params, batch, mask)`` is a chunk's partial (each party's clipped sum)
    and stats; ``accumulate(params, partial, stats, batch, mask)`` adds one more chunk
    (not for an aggregation with ``stacks_chunks``, which rounds every chunk's units on
    their own and takes the chunks' partials stacked: :meth:`run` does that);
    ``aggregate(state, partial, round_input, num_chunks)`` turns the step's partials
    into the total (the identity for a plain sum, one SecAgg round otherwise);
    ``apply(state, total)`` privatizes it and takes the optax update. A Poisson batch
    larger than the physical size is thus summed over several chunks before the one
    aggregation round and the one noise draw (:meth:`run`). ``step(state, batch, mask,
    round_input=None)`` is a whole step on one chunk, in one compiled program when the
    aggregation is a plain sum (a SecAgg round is the aggregator's stage, compiled on
    its own; with ``parts.split``, the memory-lean mode, ``clipped_sum`` then ``apply``).
    ``prepare(step)`` is the host-side set-up of a step's aggregation;
    ``aggregation`` and ``parts`` (the unjitted functions) let
    :func:`dpjax.distributed.shard_step` rebuild the step for several devices.
    """

    step: Callable[..., tuple[TrainState, StepStats]]
    clipped_sum: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, StepStats]]
    accumulate: Callable[[PyTree, PyTree, StepStats, PyTree, jax.Array],
                         tuple[PyTree, StepStats]]
    aggregate: Callable[..., PyTree]
    apply: Callable[[TrainState, PyTree], TrainState]
    prepare: Callable[[Any], Any]
    aggregation: Aggregator
    parts: StepParts

    def run(self, state: TrainState, chunks: Sequence[tuple[PyTree, jax.Array]]):
        """One step over a list of ``(batch, mask)`` chunks of one physical shape.

        A round the aggregation aborts (too few surviving parties) releases nothing: the
        state only counts the step (the caller's ledger still records it).
        """
        round_input = self.prepare(state.step)
        if isinstance(round_input, Aborted):
            zero = jnp.zeros((), jnp.int32)
            return state.replace(step=state.step + 1), StepStats(
                jnp.zeros(()), jnp.zeros(()), zero, zero)
        if len(chunks) == 1:
            return self.step(state, *chunks[0], round_input)
        if self.aggregation.stacks_chunks:
            # Each chunk's partial kept apart (stacked): the aggregation treats the units
            # of different chunks separately (distributed DP at user level).
            parts = [self.clipped_sum(state.params, batch, mask) for batch, mask in chunks]
            partial = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[p for p, _ in parts])
            stats = combine_stats(jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                                         *[s for _, s in parts]))
            total = self.aggregate(state, partial, round_input, len(chunks))
            return self.apply(state, total), stats
        (batch, mask), *rest = chunks
        partial, stats = self.clipped_sum(state.params, batch, mask)
        # Each chunk's call takes the running partial (donated) and adds to it in
        # place: one chain of calls, no separate add per leaf and per chunk.
        for batch, mask in rest:
            partial, stats = self.accumulate(state.params, partial, stats, batch, mask)
        total = self.aggregate(state, partial, round_input, len(chunks))
        return self.apply(state, total), stats


@dataclasses.dataclass(frozen=True)
class StepParts:
    """The unjitted functions a :class:`DPStep` is made of.

    ``split``: a plain-sum step runs as two compiled programs, the chunk's clipped
    sum and then the update, instead of one. The noise and the optimizer's buffers
    then never share memory with the backward pass's activations (XLA may
    otherwise draw the noise in the middle of the backward pass): the
    memory-lean clipping method's step (``clipping_method="fast_lean"``).
    """

    local: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, StepStats]]
    aggregate: Callable[..., PyTree]  # (state, partial, round_input, num_chunks) -> total
    apply: Callable[[TrainState, PyTree], TrainState]
    split: bool = False


def build_step(
    local: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, StepStats]],
    aggregation: Aggregator,
    privatizer: Privatizer,
    optimizer: optax.GradientTransformation,
    *,
    split: bool = False,
) -> DPStep:
    """The step of ``local`` (a chunk's partial and stats), ``aggregation``, ``privatizer``
    and ``optimizer``; everything after the privatizer is post-processing. ``split``
    compiles the clipped sum and the update as two programs (:class:`StepParts`)."""

    def aggregate(state: TrainState, partial, round_input=None, num_chunks: int = 1):
        return aggregation.finish(partial, round_input, num_chunks, state.key, state.step)

    def apply(state: TrainState, total) -> TrainState:
        noisy, noise_state = privatizer.update(total, state.noise_state, noise_key(state))
        updates, opt_state = optimizer.update(noisy, state.opt_state, state.params)
        return state.replace(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            step=state.step + 1,
            noise_state=noise_state,
        )

    return jit_step(StepParts(local, aggregate, apply, split), aggregation)


def jit_step(parts: StepParts, aggregation: Aggregator, local=None, wrap=None,
             shardings=None) -> DPStep:
    """Jits ``parts`` into a :class:`DPStep` (``local`` may replace ``parts.local``, e.g.
    by a per-device version; ``shardings`` are ``(replicated, rows)`` for a mesh and
    ``wrap`` is applied to every jitted function)."""
    local = local or parts.local
    wrap = wrap or (lambda fn: fn)
    rep, rows = shardings or (None, None)
    partial_spec = rows if aggregation.partial_sharded else rep

    def jit(fn, in_shardings=None, out_shardings=None, **kw):
        if shardings is None:
            return wrap(jax.jit(fn, **kw))
        return wrap(jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, **kw))

    def accumulate(params, partial, stats, batch, mask):
        return add_sums(partial, stats, *local(params, batch, mask))

    apply = jit(parts.apply, (rep, rep), rep, donate_argnums=0)
    clipped_sum = jit(local, (rep, rows, rows), (partial_spec, rep))
    if aggregation.rounds:  # the aggregator's round, then the update: two programs
        aggregate = jit(parts.aggregate, (rep, partial_spec, rep), rep, static_argnums=3)

        def front(state, batch, mask, round_input):
            partial, stats = local(state.params, batch, mask)
            return parts.aggregate(state, partial, round_input, 1), stats

        front = jit(front, (rep, rows, rows, rep), (rep, rep))

        def step(state, batch, mask, round_input=None):
            total, stats = front(state, batch, mask, round_input)
            return apply(state, total), stats
    else:
        def aggregate(state, partial, round_input=None, num_chunks=1):
            return partial  # a plain sum: the partial is the total

        if parts.split:
            def step(state, batch, mask, round_input=None):
                partial, stats = clipped_sum(state.params, batch, mask)
                return apply(state, partial), stats
        else:
            def fused(state, batch, mask, round_input=None):
                partial, stats = local(state.params, batch, mask)
                return parts.apply(state, partial), stats

            step = jit(fused, (rep, rows, rows, rep), (rep, rep), donate_argnums=0)

    return DPStep(
        step=step,
        clipped_sum=clipped_sum,
        accumulate=jit(accumulate, (rep, partial_spec, rep, rows, rows), (partial_spec, rep),
                       donate_argnums=(1, 2)),
        aggregate=aggregate,
        apply=apply,
        prepare=aggregation.prepare,
        aggregation=aggregation,
        parts=parts,
    )


def clipped_local(grad_fn, aggregation: Aggregator, row_bound: float):
    """A chunk's partial (``aggregation.local`` of the clipped-gradient function) and the
    stats of its rows' norms."""
    local = aggregation.local(grad_fn)

    def clipped_sum(params, batch, mask):
        partial, norms = local(params, batch, mask)
        return partial, _stats(norms, mask, row_bound)

    return clipped_sum


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
    with ``S = sensitivity(l2_clip_norm)`` and a noise key never used before (see
    :func:`noise_key`: a state built with a guessable JAX key voids this);
    everything after that (the optimizer) is post-processing.
    """
    _validate.non_negative("noise_multiplier", noise_multiplier)
    _validate.positive("expected_batch_size", expected_batch_size)
    clipped = ClippedSum(l2_clip_norm)
    privatizer = gaussian_privatizer(noise_multiplier=noise_multiplier,
                                     sensitivity=clipped.sensitivity(),
                                     expected_batch_size=expected_batch_size)
    return make_step(loss_fn, optimizer, clipped, privatizer, microbatch_size=microbatch_size,
                     clipping_method=clipping_method)


def make_secagg_dp_step(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    noise_multiplier: float,
    l2_clip_norm: float | PyTree,
    expected_batch_size: float,
    physical_batch_size: int,
    settings: SecAggSettings,
    microbatch_size: int | None = None,
    clipping_method: str = "vmap",
) -> DPStep:
    """The DP-SGD step whose clipped sums are securely aggregated (one round per step) and
    noised once, with noise covering the rounding: ``sigma * (S + sqrt(d) / scale)``
    (see :mod:`dpjax.aggregation`; ``d`` is the number of parameters)."""
    n = settings.num_parties
    if physical_batch_size % n:
        raise ValueError(
            f"Expected physical_batch_size={physical_batch_size} to be a multiple of "
            f"num_parties={n}: each party holds an equal block of rows."
        )
    _validate.non_negative("noise_multiplier", noise_multiplier)
    _validate.positive("expected_batch_size", expected_batch_size)
    clipped = ClippedSum(l2_clip_norm, SecAggSum(settings, physical_batch_size // n,
                                                  sensitivity(l2_clip_norm)))

    def update(total, state, key):  # d is known once the sum's shapes are
        d = sum(leaf.size for leaf in jax.tree_util.tree_leaves(total))
        return gaussian_privatizer(
            noise_multiplier=noise_multiplier, sensitivity=clipped.sensitivity(num_params=d),
            expected_batch_size=expected_batch_size).update(total, state, key)

    return make_step(loss_fn, optimizer, clipped, Privatizer(lambda params: (), update),
                     microbatch_size=microbatch_size, clipping_method=clipping_method)


def make_step(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    optimizer: optax.GradientTransformation,
    clipped: ClippedSum,
    privatizer: Privatizer,
    *,
    microbatch_size: int | None = None,
    clipping_method: str = "vmap",
) -> DPStep:
    """The step of a mechanism's parts: ``clipped`` (clip bound and aggregation) and
    ``privatizer``; ``microbatch_size`` and ``clipping_method`` only change how the
    clipped sum is computed, never its value's guarantee."""
    grad_fn = clipped_grad(loss_fn, l2_clip_norm=clipped.l2_clip_norm,
                           microbatch_size=microbatch_size, method=clipping_method)
    local = clipped_local(grad_fn, clipped.aggregation, clipped.row_bound)
    return build_step(local, clipped.aggregation, privatizer, optimizer,
                      split=clipping_method == ClippingMethod.FAST_LEAN)


def make_nonprivate_step(
    loss_fn: Callable[[PyTree, PyTree], jax.Array], optimizer: optax.GradientTransformation
) -> DPStep:
    """The same step without clipping or noise: the gradient of the mean masked loss.

    Over several chunks the per-chunk sums are added and divided by the total
    number of real rows, so the result equals one big batch.
    """

    def local(params, batch, mask):
        def total_loss(p):
            return jnp.sum(loss_fn(p, batch) * mask)

        grads = jax.grad(total_loss)(params)
        n = jnp.sum(mask > 0)
        stats = StepStats(
            jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32), n.astype(jnp.int32)
        )
        return (grads, n), stats

    return build_step(local, PlainSum(), mean_privatizer(), optimizer)


def add_sums(summed: PyTree, stats: StepStats, more: PyTree, more_stats: StepStats):
    """Adds one more chunk's partial and stats to the running ones."""
    return jax.tree_util.tree_map(jnp.add, summed, more), _add_stats(stats, more_stats)


def cross_entropy_loss(apply_fn: Callable[..., jax.Array]) -> Callable[[PyTree, PyTree], jax.Array]:
    """``loss_fn(params, (x, y)) -> [B]`` softmax cross-entropy of a classifier."""

    def loss_fn(params, batch):
        x, y = batch
        logits = apply_fn({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return loss_fn

"""DP-SGD whose clipped sum is computed by secure aggregation (distributed DP).

The physical batch is split into ``num_parties`` equal, contiguous blocks of
rows, one per simulated party (a client, or a data shard). Each party clips
its own rows and sums them; the parties' sums go through one SecAgg round
(:func:`dpjax.secagg.secure_sum`), so the aggregator sees only masked inputs
and their total; the Gaussian noise is then added once to that total by the
ordinary DP step (:func:`dpjax.train.make_dp_step`'s ``apply``).

Guarantee: the released update is a Gaussian mechanism with the plain step's
noise multiplier (same key), applied to a sum that differs from the plain
float sum by at most ``quantization_error_bound(n, scale)`` per coordinate.
Stochastic rounding can move one party's encoded sum by up to ``1 / scale``
per coordinate beyond the change of its float sum, so one example changes
the aggregated sum by at most ``S + sqrt(d) / scale`` in L2 (``d`` = number of
parameters, for any fixed rounding draws): the noise standard deviation is
``noise_multiplier * (S + sqrt(d) / scale)`` (:func:`secagg_sensitivity`), so
the accountant's noise multiplier stays exact. Every party's sum of ``m``
rows clipped to ``S`` has coordinates of magnitude at most ``m * S``: that
public bound sizes the fixed-point scale, so encoding can never wrap and
never clamps.

Each step (and each overflow chunk) runs a fresh round: new pairwise and
self-mask seeds from ``prepare_round``; in ``mode="simulation"`` they derive
from ``(seed, step, chunk)`` so runs are reproducible, in ``mode="secure"``
from the operating system.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from dpjax import _validate
from dpjax.clipping import clipped_grad, sensitivity
from dpjax.noise import privatize
from dpjax.secagg.aggregate import prepare_round, secure_sum
from dpjax.secagg.encoding import INT32_LIMIT, check_no_wrap, quantization_error_bound
from dpjax.train import TrainState, _stats, add_sums, make_apply, noise_key

PyTree = Any
ROUNDING_STREAM = 1  # key stream of the stochastic rounding; the noise uses stream 0
MAX_CHUNKS_PER_STEP = 1 << 16


@dataclasses.dataclass(frozen=True)
class SecAggSettings:
    """How the simulated parties aggregate.

    ``threshold`` defaults to a majority of each party's neighbourhood;
    ``num_neighbours=None`` is the complete graph (SecAgg), an integer ``k``
    a random k-regular graph (SecAgg+).
    """

    num_parties: int
    threshold: int | None = None
    num_neighbours: int | None = None
    mode: str = "secure"
    key_agreement: str = "x25519"
    seed: int = 0

    def __post_init__(self):
        _validate.positive_int("num_parties", self.num_parties)
        if self.num_parties < 2:
            raise ValueError(
                f"Expected num_parties={self.num_parties} >= 2 for secure aggregation."
            )
        _validate.one_of("mode", self.mode, ("secure", "simulation"))
        _validate.one_of("key_agreement", self.key_agreement, ("x25519", "trusted_dealer"))

    @property
    def resolved_threshold(self) -> int:
        if self.threshold is not None:
            return self.threshold
        group = self.num_parties if self.num_neighbours is None else self.num_neighbours + 1
        return group // 2 + 1


def fixed_point_scale(num_parties: int, rows_per_party: int, l2_clip_norm: float) -> float:
    """The largest power-of-two scale at which ``num_parties`` sums cannot wrap."""
    max_abs = rows_per_party * l2_clip_norm
    scale = 2.0 ** (math.floor(math.log2((INT32_LIMIT / num_parties - 1) / max_abs)) - 1)
    check_no_wrap(max_abs, scale, num_parties)
    return scale


def secagg_sensitivity(l2_clip_norm: float | PyTree, num_params: int, scale: float) -> float:
    """L2 sensitivity of the securely aggregated sum: ``S + sqrt(d) / scale``.

    ``S = sensitivity(l2_clip_norm)`` bounds one example's change of its
    party's float sum; stochastic rounding to multiples of ``1 / scale``
    adds at most ``1 / scale`` per coordinate of the ``d = num_params``.
    """
    return sensitivity(l2_clip_norm) + math.sqrt(num_params) / scale


@dataclasses.dataclass(frozen=True)
class SecAggDPStep:
    """A DP step whose clipped sum is securely aggregated; ``run`` as in ``DPStep``."""

    settings: SecAggSettings
    scale: float
    error_bound: float
    party_sums: Callable
    add: Callable
    apply: Callable[[TrainState, PyTree], TrainState]

    def run(self, state: TrainState, chunks: Sequence[tuple[PyTree, jax.Array]]):
        s = self.settings
        if len(chunks) > MAX_CHUNKS_PER_STEP:
            raise ValueError(
                f"Expected at most {MAX_CHUNKS_PER_STEP} chunks per step (each gets its own "
                f"round index); got {len(chunks)}: raise dp.physical_batch_size."
            )
        step = int(state.step)
        total, stats = None, None
        for i, (batch, mask) in enumerate(chunks):
            masks = prepare_round(
                s.num_parties,
                threshold=s.resolved_threshold,
                num_neighbours=s.num_neighbours,
                round_index=step * MAX_CHUNKS_PER_STEP + i,  # < 2^64: see nonce()
                key_agreement=s.key_agreement,
                mode=s.mode,
                seed=s.seed if s.mode == "simulation" else None,
            )
            summed, st = self.party_sums(state.params, state.key, state.step, i, batch, mask, masks)
            total, stats = (summed, st) if total is None else self.add(total, stats, summed, st)
        return self.apply(state, total), stats


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
) -> SecAggDPStep:
    """Builds the securely aggregated DP-SGD step (noise added once, after aggregation)."""
    n = settings.num_parties
    if physical_batch_size % n:
        raise ValueError(
            f"Expected physical_batch_size={physical_batch_size} to be a multiple of "
            f"num_parties={n}: each party holds an equal block of rows."
        )
    rows = physical_batch_size // n
    bound = sensitivity(l2_clip_norm)
    scale = fixed_point_scale(n, rows, bound)
    grad_fn = clipped_grad(
        loss_fn, l2_clip_norm=l2_clip_norm, microbatch_size=microbatch_size, method=clipping_method
    )
    _validate.non_negative("noise_multiplier", noise_multiplier)
    _validate.positive("expected_batch_size", expected_batch_size)

    def gradient(state: TrainState, summed: PyTree) -> PyTree:
        num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(summed))
        return privatize(
            summed,
            noise_key(state),
            noise_multiplier=noise_multiplier,
            l2_clip_norm=secagg_sensitivity(l2_clip_norm, num_params, scale),
            expected_batch_size=expected_batch_size,
        )

    @jax.jit
    def party_sums(params, key, step, chunk_index, batch, mask, round_masks):
        def per_party(a):
            return a.reshape((n, rows) + a.shape[1:])

        sums, norms = jax.vmap(grad_fn, in_axes=(None, 0, 0))(
            params, jax.tree_util.tree_map(per_party, batch), per_party(mask)
        )
        rounding_key = jax.random.fold_in(
            jax.random.fold_in(jax.random.fold_in(key, ROUNDING_STREAM), step), chunk_index
        )
        total = secure_sum(
            sums,
            scale=scale,
            round_masks=round_masks,
            max_abs=rows * bound,
            rounding_key=rounding_key,
        )
        return total, _stats(norms.reshape(-1), mask, bound)

    return SecAggDPStep(
        settings,
        scale,
        quantization_error_bound(n, scale),
        party_sums,
        jax.jit(add_sums, donate_argnums=(0, 1)),
        jax.jit(make_apply(gradient, optimizer), donate_argnums=0),
    )

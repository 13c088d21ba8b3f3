"""How a step's clipped sums are added up: in the clear, or by secure aggregation.

An aggregation splits each chunk's rows among its parties, computes every
party's clipped sum (its *partial*), lets the chunks of one step accumulate their
partials, and only then, once per step, turns the partials into the total the
privatizer sees (:meth:`finish`):

- :class:`PlainSum`: one party, whoever runs the step; the partial is the sum.
- :class:`SecAggSum`: ``num_parties`` parties; party ``p`` is rows
  ``[p r, (p + 1) r)`` of every chunk, which the Poisson sampler fills from the
  fixed shard of examples ``i = p mod num_parties`` (so one example is always in
  the same party's sum). After the last chunk of a step, one SecAgg round
  (:func:`dpjax.secagg.secure_sum`) over all parties -- of all devices -- yields
  the total; the aggregator sees the masked party inputs and the total, never a
  party's sum and never a per-chunk or per-device sum.

Guarantee of :class:`SecAggSum`: the total equals the float sum of the parties'
clipped sums up to ``quantization_error_bound(n, scale)`` per coordinate.
Stochastic rounding can move one party's encoded sum by up to ``1 / scale`` per
coordinate beyond the change of its float sum, so one example changes the
total by at most ``S + sqrt(d) / scale`` in L2 (``d`` = number of parameters,
for any fixed rounding draws): :meth:`rounding_slack` is the ``sqrt(d) / scale``
the mechanism adds to the row sensitivity. Every party's sum of ``m`` rows
clipped to ``S`` has coordinates of magnitude at most ``m * S``; that public
bound, for the step's number of chunks, is checked against the fixed-point
range before anything is encoded, so encoding never wraps and never clamps.

This module glues the SecAgg primitives of :mod:`dpjax.secagg` (which import
nothing from training code) to the step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import dpjax._validate as _validate
import dpjax.secagg.ddp as ddp
import dpjax.secagg.modular as modular
from dpjax.randomness import Secret, Stream, derived_key, jax_key, stream_key
from dpjax.secagg.aggregate import (
    RoundMasks,
    flatten_parties,
    prepare_round,
    secure_sum,
    unflatten_party,
)
from dpjax.secagg.ddp_params import DDPParams, Unit
from dpjax.secagg.encoding import check_no_wrap, encode, quantization_error_bound

PyTree = Any
ROUNDING_STREAM = 1  # a JAX key's fold-in stream for the rounding (the noise uses 0)
ClippedGradFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array]]


@dataclasses.dataclass(frozen=True)
class PlainSum:
    """The clipped sum in the clear: one party, no rounding."""

    num_parties: int = 1
    stacks_chunks = False  # the chunks' partials are summed (see DistributedNoiseSum)

    def rounding_slack(self, num_params: int) -> float:
        del num_params
        return 0.0

    def local(self, grad_fn: ClippedGradFn) -> ClippedGradFn:
        """``(params, batch, mask) -> (partial, per_example_norms)`` of one chunk."""
        return grad_fn

    def across_devices(self, partial: PyTree, axis_name: str) -> PyTree:
        """Inside ``shard_map``: the partial of all devices' rows (an all-reduce)."""
        return jax.lax.psum(partial, axis_name)

    partial_sharded = False  # the combined partial is replicated over devices
    rounds = False  # no aggregation round: the partial is the total

    def prepare(self, step: int) -> None:
        """Host-side set-up of step ``step``'s aggregation: nothing to do."""
        del step

    def finish(self, partial: PyTree, round_input: None, num_chunks: int, key, step) -> PyTree:
        del round_input, num_chunks, key, step
        return partial

    def fingerprint(self) -> dict[str, Any]:
        return {}


@dataclasses.dataclass(frozen=True)
class SecAggSettings:
    """How the simulated parties aggregate.

    ``threshold`` defaults to a majority of each party's neighbourhood;
    ``num_neighbours=None`` is the complete graph (SecAgg), an integer ``k``
    a random k-regular graph (SecAgg+). ``mode="secure"`` draws every mask seed
    from the operating system; ``"simulation"`` derives them from ``seed`` (public:
    the aggregator could unmask every party), for reproducible experiments.
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
            raise ValueError(f"Expected num_parties={self.num_parties} >= 2 for secure "
                             "aggregation.")
        _validate.one_of("mode", self.mode, ("secure", "simulation"))
        _validate.one_of("key_agreement", self.key_agreement, ("x25519", "trusted_dealer"))

    @property
    def resolved_threshold(self) -> int:
        if self.threshold is not None:
            return self.threshold
        group = self.num_parties if self.num_neighbours is None else self.num_neighbours + 1
        return group // 2 + 1


def fixed_point_scale(num_parties: int, rows_per_party: int, l2_clip_norm: float,
                      bits: int = 32) -> float:
    """The largest power-of-two scale at which ``num_parties`` sums cannot wrap in
    ``Z_{2^bits}`` (with a factor-2 margin, so a step whose batch spills into a second chunk
    fits too)."""
    max_abs = rows_per_party * l2_clip_norm
    limit = 2.0 ** (bits - 1)
    scale = 2.0 ** (math.floor(math.log2((limit / num_parties - 1) / max_abs)) - 1)
    check_no_wrap(max_abs, scale, num_parties, limit=limit)
    return scale


def rounding_key(key, step, sub_index=0) -> jax.Array:
    """The JAX key of a step's stochastic rounding: from the run's secret (the stream
    ``(ROUNDING, step, 0)``) or, for a library state holding a JAX key, folded from it."""
    if isinstance(key, Secret):
        return jax_key(stream_key(key, Stream.ROUNDING, step, sub_index))
    return jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(key, ROUNDING_STREAM), step), sub_index
    )


def _check_stacked(partial: PyTree, num_chunks: int, num_parties: int) -> None:
    """Refuses a partial that is not ``[num_chunks, num_parties, ...]`` per leaf: an
    aggregation that rounds units alone must get the chunks' partials stacked
    (:meth:`dpjax.train.DPStep.run`), never summed (e.g. by ``DPStep.accumulate``)."""
    shapes = {tuple(leaf.shape[:2]) for leaf in jax.tree_util.tree_leaves(partial)}
    if shapes != {(num_chunks, num_parties)}:
        raise ValueError(
            f"Expected the {num_chunks} chunks' partials stacked as [{num_chunks}, "
            f"{num_parties}, ...] (this aggregation rounds every unit on its own); got leading "
            f"shapes {sorted(shapes)}. Stack the chunks' partials instead of summing them.")


@dataclasses.dataclass(frozen=True)
class SecAggSum:
    """``num_parties`` parties, blocks of ``rows_per_party`` rows of every chunk (party ``p``:
    the sampler's fixed shard ``i = p mod num_parties``); one SecAgg round per step over all
    of them."""

    settings: SecAggSettings
    rows_per_party: int
    row_bound: float  # sensitivity(l2_clip_norm): the norm bound of one row's contribution
    bits: int = 32  # the modulus 2^bits (32: the float secure_sum over Z_2^32)
    # User level: a party (slot) of a step of several chunks holds several users, each
    # encoded (stochastically rounded) on its own, never their sum (see finish).
    round_units_alone: bool = False

    @property
    def num_parties(self) -> int:
        return self.settings.num_parties

    @property
    def stacks_chunks(self) -> bool:
        """Whether a step of several chunks hands :meth:`finish` the chunks' partials
        stacked (``[K, n, ...]``) rather than summed: with ``round_units_alone``."""
        return self.round_units_alone

    @property
    def scale(self) -> float:
        return fixed_point_scale(self.num_parties, self.rows_per_party, self.row_bound,
                                 self.bits)

    @property
    def error_bound(self) -> float:
        """Per-coordinate bound on |aggregated - float sum| of one round."""
        return quantization_error_bound(self.num_parties, self.scale)

    def rounding_slack(self, num_params: int) -> float:
        return math.sqrt(num_params) / self.scale

    def local(self, grad_fn: ClippedGradFn) -> ClippedGradFn:
        """``(params, batch, mask) -> (party sums [n, ...], per_example_norms [P])``."""
        rows = self.rows_per_party

        def party_sums(params, batch, mask):
            def per_party(a):
                return a.reshape((-1, rows) + a.shape[1:])

            sums, norms = jax.vmap(grad_fn, in_axes=(None, 0, 0))(
                params, jax.tree_util.tree_map(per_party, batch), per_party(mask))
            return sums, norms.reshape(-1)

        return party_sums

    def across_devices(self, partial: PyTree, axis_name: str) -> PyTree:
        """Inside ``shard_map``: each device keeps its own parties' sums (no reduction:
        the parties of all devices meet only in the SecAgg round)."""
        del axis_name
        return partial

    partial_sharded = True  # party axis sharded over devices
    rounds = True  # one SecAgg round per step (with stochastic rounding)

    def prepare(self, step: int) -> RoundMasks:
        """The round's masks (host side): fresh seeds per step, from the operating system
        (``mode="secure"``) or from ``(seed, step)`` (``"simulation"``)."""
        s = self.settings
        return prepare_round(
            s.num_parties, threshold=s.resolved_threshold, num_neighbours=s.num_neighbours,
            round_index=int(step), key_agreement=s.key_agreement, mode=s.mode,
            seed=s.seed if s.mode == "simulation" else None,
        )

    def finish(self, partial: PyTree, round_input: RoundMasks, num_chunks: int, key,
               step) -> PyTree:
        """One SecAgg round over the step's party sums (accumulated over ``num_chunks``
        chunks, so each holds at most ``num_chunks * rows_per_party`` rows), with stochastic
        rounding keyed from the state's ``key`` and ``step``."""
        key = rounding_key(key, step)
        max_abs = num_chunks * self.rows_per_party * self.row_bound
        try:
            check_no_wrap(max_abs, self.scale, self.num_parties, limit=2.0 ** (self.bits - 1))
        except ValueError as err:
            raise ValueError(
                f"Expected this step's {num_chunks} chunks to fit SecAgg's fixed-point range "
                f"at scale {self.scale:g}; a batch this much larger than the physical size "
                "(dp.physical_batch_size) cannot be aggregated in one round without "
                "wrapping. Raise dp.physical_batch_size."
            ) from err
        if self.stacks_chunks and num_chunks > 1:
            _check_stacked(partial, num_chunks, self.num_parties)
            return self._finish_units(partial, round_input, num_chunks, key)
        if self.bits == 32:
            return secure_sum(partial, scale=self.scale, round_masks=round_input,
                              max_abs=max_abs, rounding_key=key)
        flat, spec = flatten_parties(partial)
        encoded = encode(flat, self.scale, key=key, max_abs=max_abs,
                         num_parties=self.num_parties)
        total = modular.secure_sum_mod(modular.to_modular(encoded, self.bits), bits=self.bits,
                                       round_masks=round_input)
        lifted = modular.centered_lift(total, self.bits).astype(jnp.float32)
        return unflatten_party(lifted / jnp.float32(self.scale), spec)

    def _finish_units(self, partial: PyTree, round_input: RoundMasks, num_chunks: int,
                      key) -> PyTree:
        """The round of ``num_chunks`` stacked partials: every unit (chunk ``k``, party
        ``s``) is stochastically rounded on its own, with its own uniforms, and each
        party masks the sum of its units' encodings. Stochastic rounding of a sum is not
        the sum of roundings: a party that rounded the sum of the users packed into it
        would make a user's rounding depend on which user shares its slot, and adding one
        user re-pairs the others (the slack ``sqrt(d) / scale`` covers one unit's)."""
        flat, spec = flatten_parties(partial, leading_axes=2)  # [K, n, d]
        units = encode(flat, self.scale, key=key, max_abs=self.rows_per_party * self.row_bound,
                       num_parties=self.num_parties * num_chunks)
        summed = jnp.sum(units, axis=0, dtype=jnp.uint32)  # mod 2^32, as every encoding
        total = modular.secure_sum_mod(modular.to_modular(summed, self.bits), bits=self.bits,
                                       round_masks=round_input)
        lifted = modular.centered_lift(total, self.bits).astype(jnp.float32)
        return unflatten_party(lifted / jnp.float32(self.scale), spec)

    def fingerprint(self) -> dict[str, Any]:
        return {"secagg_scale": self.scale, "secagg_rows_per_party": self.rows_per_party,
                "secagg_bits": self.bits}




@dataclasses.dataclass(frozen=True)
class Aborted:
    """A round that cannot be aggregated: fewer parties survive than the claim needs.

    Nothing is released; the step counter advances and the ledger still records the
    sampled round (privacy rule 4: every sampled round is accounted).
    """

    reason: str


def simulated_dropped_parties(num_parties: int, dropouts: int, step) -> list[int]:
    """The parties that drop out of round ``step`` under ``dp.simulated_dropouts``:
    ``dropouts`` consecutive parties from ``step mod num_parties``. A function of the round
    only, never of the data, so whether a round aborts is data-independent.

    Privacy needs more: the units a dropped party holds must not depend on the other
    units either. At example level a party is a fixed shard of the dataset (one example's
    presence never moves another example between parties); at user level the slots are
    packed, so the user sampler keeps the dropped slots empty
    (:class:`dpjax.federated.slots.UserSampler`): there, a simulated dropout loses a
    noise-only party's noise, never a user's update."""
    start = int(step) % num_parties
    return sorted({(start + i) % num_parties for i in range(dropouts)})


def _survivors(num_parties: int, dropouts: int, step) -> list[int]:
    """The parties that arrive: all but :func:`simulated_dropped_parties`."""
    dropped = set(simulated_dropped_parties(num_parties, dropouts, step))
    return [u for u in range(num_parties) if u not in dropped]


def _party_keys(source, stream: Stream, step, num_parties: int, derive) -> jax.Array:
    """One key per party from the run's secret (``derive``: 256-bit or JAX key), or, for a
    library state holding a JAX key, folded from it (64 bits: tests and simulations)."""
    parties = jnp.arange(num_parties, dtype=jnp.uint32)
    if isinstance(source, Secret):
        return jax.vmap(lambda u: derive(stream_key(source, stream, step, u)))(parties)
    base = jax.random.fold_in(jax.random.fold_in(source, int(stream)), step)
    return jax.vmap(lambda u: jax.random.fold_in(base, u))(parties)


@dataclasses.dataclass(frozen=True)
class DistributedNoiseSum:
    """Distributed DP: ``num_parties`` parties (blocks of rows), each of which scales,
    rotates, rounds and adds its own discrete noise (Skellam or discrete Gaussian) to its
    clipped sum before masking (:mod:`dpjax.secagg.ddp`); one SecAgg round over
    ``Z_{2^bits}`` per step decodes only the noisy sum.

    Guarantee: the aggregator sees masked inputs and the noisy total; nobody holds the
    un-noised sum. With at least ``params.min_honest_survivors`` honest survivors
    (``dp.min_survivors - dp.max_colluders``), the release is the distributed discrete
    mechanism whose sensitivities (integer units) ``params`` states; a round with fewer
    survivors than ``min_survivors`` is aborted (:class:`Aborted`), never released.
    """

    settings: SecAggSettings
    rows_per_party: int
    row_bound: float
    params: DDPParams
    min_survivors: int
    simulated_dropouts: int = 0
    max_chunks: int = 2  # the party bound of ``params`` holds this many chunks' rows

    partial_sharded = True
    rounds = True

    @property
    def num_parties(self) -> int:
        return self.settings.num_parties

    @property
    def stacks_chunks(self) -> bool:
        """User level: a step of several chunks hands :meth:`finish` the chunks' partials
        stacked (``[K, n, ...]``), not summed, so that every user (slot ``s`` of chunk
        ``k``) is rounded on its own (:func:`dpjax.secagg.ddp.party_round_units`).
        Example level sums a party's chunks first: its rounding argument is about the
        party's whole sum (one example moves it by at most ``C``)."""
        return self.params.unit is Unit.USER

    def local(self, grad_fn: ClippedGradFn) -> ClippedGradFn:
        return SecAggSum(self.settings, self.rows_per_party, self.row_bound).local(grad_fn)

    def across_devices(self, partial: PyTree, axis_name: str) -> PyTree:
        del axis_name
        return partial

    def prepare(self, step) -> RoundMasks | Aborted:
        """The round's masks with the surviving parties, or :class:`Aborted`."""
        s = self.settings
        alive = _survivors(s.num_parties, self.simulated_dropouts, step)
        if len(alive) < max(self.min_survivors, s.resolved_threshold):
            return Aborted(f"{len(alive)} of {s.num_parties} parties survived; the claim "
                           f"needs {self.min_survivors}")
        return prepare_round(
            s.num_parties, threshold=s.resolved_threshold, num_neighbours=s.num_neighbours,
            survivors=alive, round_index=int(step), key_agreement=s.key_agreement,
            mode=s.mode, seed=s.seed if s.mode == "simulation" else None,
        )

    def finish(self, partial: PyTree, round_input: RoundMasks, num_chunks: int, key,
               step) -> PyTree:
        """Each party encodes its (accumulated) sum with its own keys; one round decodes the
        noisy total. ``key`` is the state's key (the run's secret) and ``step`` the step.

        With :attr:`stacks_chunks` (user level) and ``num_chunks > 1``, ``partial`` is
        ``[num_chunks, n, ...]`` and the unit in slot ``s`` of chunk ``k`` is rounded on its
        own with the key of position ``k n + s``: every position has its own key
        (independent of the data and of the packing), chunk 0's being the party's key of a
        one-chunk round, which takes the ordinary path."""
        if num_chunks > self.max_chunks:
            raise ValueError(
                f"Expected at most {self.max_chunks} chunks per step with distributed noise "
                f"(the wrap bound holds for parties of that many chunks' rows); got "
                f"{num_chunks}. Raise dp.physical_batch_size."
            )
        n = self.num_parties
        noise_keys = _party_keys(key, Stream.PARTY_NOISE, step, n, derived_key)
        stacked = self.stacks_chunks and num_chunks > 1
        if stacked:
            _check_stacked(partial, num_chunks, n)
        units = num_chunks if stacked else 1
        rounding_keys = _party_keys(key, Stream.PARTY_ROUNDING, step, units * n, jax_key)
        if stacked:  # [K n] positions -> [n, K]: party u's units in order
            rounding_keys = jnp.swapaxes(
                rounding_keys.reshape((units, n) + rounding_keys.shape[1:]), 0, 1)
        rotation = (jax_key(stream_key(key, Stream.ROTATION, step)) if isinstance(key, Secret)
                    else jax.random.fold_in(jax.random.fold_in(key, int(Stream.ROTATION)),
                                            step))
        total, _ = ddp.ddp_secure_sum(partial, params=self.params, round_masks=round_input,
                                      rotation_key=rotation, rounding_keys=rounding_keys,
                                      noise_keys=noise_keys, units_axis=stacked)
        return total

    def fingerprint(self) -> dict[str, Any]:
        return {"ddp": self.params.summary(), "min_survivors": self.min_survivors}


Aggregator = PlainSum | SecAggSum | DistributedNoiseSum

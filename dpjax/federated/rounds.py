"""One DP-FedAvg round (McMahan et al. 2018, Algorithm 1) as a dpjax step.

A round is a :class:`dpjax.train.DPStep` whose rows are user slots:

    slots     = sampler.sample(t)                      Poisson over users, fixed slots (host)
    partial   = aggregation.local(clipped_user_sum)    each slot's user trains locally from
                                                       the server model; its pseudo-gradient
                                                       (server - local) clipped to C
    total     = aggregation.finish(partial, round)     plain sum | SecAgg round (a slot is a
                                                       party) | distributed DP (parties add noise)
    noisy     = privatizer.update(total, key_t)        + N(0, (sigma C)^2) / (q U)
    params    = server_optimizer(noisy)                post-processing (SGD with momentum, Adam)
    ledger   += mechanism.segment(1)                   PoissonSampled(q, Gaussian(sigma)) per round

The mechanism is an ordinary :class:`~dpjax.mechanism.Mechanism` whose examples
are users (:func:`user_level_mechanism`): ``num_examples`` is the number of
users ``U``, ``sample_rate`` the user sampling rate ``q``, the physical batch the
``num_slots`` slots and the row bound the clip bound of one user's update; its
unit is :attr:`dpjax.choices.Unit.USER`. The average is the fixed-denominator
estimator of McMahan et al. 2018 with unit weights, ``sum / (q U)``: one user
changes the noised sum by at most ``C`` (add/remove-one user), so the round is
the subsampled Gaussian mechanism of noise multiplier ``sigma`` and rate ``q``
for user-level neighbours, and the accountant records exactly that.

The aggregation plugs in as in DP-SGD: anything with the
:mod:`dpjax.aggregation` interface (``local``, ``prepare``, ``finish``) whose
parties are blocks of one slot each. A distributed-discrete-noise aggregation
whose ``finish`` adds each party's noise comes in the same way, with a
privatizer that only divides by ``q U``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import dpjax._validate as _validate
import dpjax.accounting as accounting
from dpjax.aggregation import Aggregator, PlainSum, SecAggSettings, SecAggSum
from dpjax.choices import Sampling, Unit
from dpjax.clip_math import sensitivity
from dpjax.federated.local import LocalTraining, clipped_user_sum
from dpjax.federated.slots import SlotChunk, UserSampler, default_num_slots, place_slots
from dpjax.federated.users import UserPartition
from dpjax.mechanism import ClippedSum, Mechanism
from dpjax.noise import Privatizer
from dpjax.randomness import Secret
from dpjax.train import DPStep, StepStats, TrainState, build_step, clipped_local

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


def user_secagg(settings: SecAggSettings, l2_clip_norm: float | PyTree) -> SecAggSum:
    """Secure aggregation with one party per slot (``settings.num_parties`` = the number of
    slots): every party's input is one user's clipped update (plus, on overflow, those of
    the users in its slot of the further chunks, each stochastically rounded on its own)."""
    return SecAggSum(settings, rows_per_party=1, row_bound=sensitivity(l2_clip_norm),
                     round_units_alone=True)


def user_level_mechanism(
    *,
    num_users: int,
    sample_rate: float,
    l2_clip_norm: float | PyTree,
    params: PyTree,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float | None = None,
    rounds: int | None = None,
    accountant: str = "rdp",
    num_slots: int | None = None,
    aggregation: Aggregator | None = None,
) -> Mechanism:
    """The DP-FedAvg mechanism: users Poisson-sampled with rate ``sample_rate``, each user's
    update clipped to ``l2_clip_norm``, Gaussian noise of std ``sigma * S`` on the sum,
    divided by ``q U``.

    ``S`` is the user-level sensitivity of the aggregated sum: the clip bound (per-layer
    bounds: ``sqrt(sum C_g^2)``) plus SecAgg's rounding slack. Give ``noise_multiplier``,
    or ``target_epsilon`` with ``delta`` and ``rounds`` to calibrate it.
    ``num_slots`` defaults to :func:`default_num_slots`; a SecAgg ``aggregation`` must
    have one party per slot (:func:`user_secagg`).

    Guarantee: each round is ``PoissonSampled(q, Gaussian(sigma))`` under add/remove-one
    *user*, the event :meth:`~dpjax.mechanism.Mechanism.segment` records.
    """
    _validate.positive_int("num_users", num_users)
    _validate.sample_rate("sample_rate", sample_rate)
    num_slots = default_num_slots(num_users, sample_rate) if num_slots is None else num_slots
    _validate.positive_int("num_slots", num_slots)
    aggregation = PlainSum() if aggregation is None else aggregation
    if aggregation.num_parties != 1 and (aggregation.num_parties != num_slots
                                         or getattr(aggregation, "rows_per_party", 1) != 1):
        raise ValueError(
            f"Expected an aggregation with one party per slot (num_parties={num_slots}, one "
            f"row each); got num_parties={aggregation.num_parties}. Build it with "
            "user_secagg.")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(f"Expected exactly one of noise_multiplier={noise_multiplier!r} and "
                         f"target_epsilon={target_epsilon!r}.")
    if target_epsilon is not None:
        if delta is None or rounds is None:
            raise ValueError(f"Expected delta={delta!r} and rounds={rounds!r} to calibrate "
                             f"for target_epsilon={target_epsilon}.")
        noise_multiplier = accounting.calibrate_noise_multiplier(
            target_epsilon, delta, sample_rate, rounds, accountant, str(Sampling.POISSON))
    num_params = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
    return Mechanism(sampling=Sampling.POISSON, num_examples=num_users, sample_rate=sample_rate,
                     expected_batch_size=sample_rate * num_users, physical_batch_size=num_slots,
                     clipped=ClippedSum(l2_clip_norm, aggregation),
                     noise_multiplier=float(noise_multiplier), num_params=num_params,
                     unit=Unit.USER)


def make_round_step(loss_fn: LossFn, server_optimizer: optax.GradientTransformation,
                    local: LocalTraining, clipped: ClippedSum, privatizer: Privatizer
                    ) -> DPStep:
    """The jitted round of ``clipped`` (user clip bound and aggregation), ``privatizer`` and
    ``server_optimizer``: a :class:`~dpjax.train.DPStep` over ``(slots, slot_mask)`` chunks
    (:func:`~dpjax.federated.slots.place_slots`), one compiled program on one chunk with a
    plain sum. The server optimizer sees ``-(noisy mean of the users' deltas)``."""
    users = clipped_user_sum(loss_fn, local, clipped.l2_clip_norm)
    return build_step(clipped_local(users, clipped.aggregation, clipped.row_bound),
                      clipped.aggregation, privatizer, server_optimizer)


@dataclasses.dataclass(frozen=True, eq=False)
class FedAvgStep:
    """DP-FedAvg's round on the training arrays ``x``, ``y``: :meth:`run` takes a round's
    slot chunks (:meth:`UserSampler.sample`) and returns ``(state, stats)``; ``stats``
    (user update norms, clipped fraction, number of sampled users) are non-private."""

    step: DPStep
    x: np.ndarray
    y: np.ndarray

    def run(self, state: TrainState, round_users: list[SlotChunk]
            ) -> tuple[TrainState, StepStats]:
        return self.step.run(state, place_slots(round_users, self.x, self.y))


def make_fedavg_step(loss_fn: LossFn, server_optimizer: optax.GradientTransformation,
                     local: LocalTraining, mechanism: Mechanism, x_train: np.ndarray,
                     y_train: np.ndarray) -> FedAvgStep:
    """The round of a :func:`user_level_mechanism` (its clip bound, aggregation and
    Gaussian privatizer) on the training arrays."""
    if mechanism.unit is not Unit.USER:
        raise ValueError(f"Expected a user-level mechanism (unit='user'); got "
                         f"unit={str(mechanism.unit)!r}.")
    step = make_round_step(loss_fn, server_optimizer, local, mechanism.clipped,
                           mechanism.privatizer())
    return FedAvgStep(step, x_train, y_train)


def user_sampler(mechanism: Mechanism, partition: UserPartition, local: LocalTraining, *,
                 secret: Secret | None = None, seed: int | None = None) -> UserSampler:
    """The user sampler of ``mechanism`` (its rate and slots: the accountant's ``q`` is the
    sampler's) over ``partition``, with ``local``'s cap and padded rows per slot."""
    if partition.num_users != mechanism.num_examples:
        raise ValueError(f"Expected the partition's {partition.num_users} users to be the "
                         f"mechanism's num_examples={mechanism.num_examples}.")
    dropouts = getattr(mechanism.clipped.aggregation, "simulated_dropouts", 0)
    return UserSampler(partition, mechanism.sample_rate, mechanism.physical_batch_size,
                       local.max_examples, local.rows_per_slot, seed=seed, secret=secret,
                       simulated_dropouts=dropouts)

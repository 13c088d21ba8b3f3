"""Distributed discrete noise on secure aggregation: the per-party integer pipeline.

Kairouz, Liu, Steinke 2021 (distributed discrete Gaussian) and Agarwal,
Kairouz, Liu 2021 (Skellam): every party turns its clipped update into a
noisy integer vector before masking, so only the noisy sum is ever decoded.
One round, with ``p`` = :class:`~dpjax.secagg.ddp_params.DDPParams`::

    party u (jittable, own keys):   y_u = rotate(gamma x_u, rotation_key)        # shared, public
                                    v_u = round(y_u)       # conditional at user level
                                    z_u = noise(noise_key_u)   # Skellam or discrete Gaussian
                                    e_u = (v_u + z_u) mod 2^bits
                                    masked_u = e_u + masks_u mod 2^bits
    aggregator (masked inputs, unmasking seeds only):
                                    T = sum_u masked_u - leftover masks mod 2^bits
    anyone (public key):            decode(T) = unrotate(lift(T)) / gamma

Guarantee: the aggregator sees masked inputs and ``T``, and ``lift(T)`` is
``sum_u (v_u + z_u)`` whenever that sum does not wrap (probability at least
``1 - p.wrap_probability_bound``); only the noisy sum is decoded. With
``h = p.min_honest_survivors`` honest parties' noise, the release is the
Skellam / distributed discrete Gaussian mechanism with the sensitivities in
``p`` (see :mod:`dpjax.secagg.ddp_params`); account it with
``p.accountant_args()``. A party whose conditional rounding fails sends
noise only; if any party's noise sampler leaves a coordinate unsampled
(probability below 2^-100), :func:`ddp_secure_sum` releases zeros for the
round (a data-independent event). Both are reported per party (non-private
diagnostics) for the caller to count.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import dpjax.secagg.discrete as discrete
import dpjax.secagg.modular as modular
import dpjax.secagg.rotation as rotation
import dpjax.secagg.rounding as rounding
from dpjax.secagg.aggregate import RoundMasks, flatten_parties, unflatten_party
from dpjax.secagg.ddp_params import DDPParams, Noise, Unit

PyTree = Any


class PartyReport(NamedTuple):
    """Non-private diagnostics of one party's encoding (count them, never feed them back)."""

    rounding_failed: jax.Array  # bool: conditional rounding hit its cap; sent noise only
    noise_failures: jax.Array  # int32: coordinates the noise sampler left unsampled


def party_noise(noise_key: jax.Array, params: DDPParams) -> tuple[jax.Array, jax.Array]:
    """One party's int32 noise vector of length ``params.padded_dim`` and its failure count."""
    shape = (params.padded_dim,)
    if params.noise is Noise.SKELLAM:
        return discrete.skellam(noise_key, shape, params.party_noise_variance)
    return discrete.discrete_gaussian(noise_key, shape, params.ddg_sigma)


def party_round(
    x: jax.Array, params: DDPParams, *, rotation_key: jax.Array, rounding_key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scale, rotate and round one party's flat float vector: ``(int32[D], rounding_failed)``."""
    y = rotation.rotate(jnp.asarray(x, jnp.float32) * np.float32(params.gamma), rotation_key,
                        params.rotation)  # fmt: skip
    if params.unit is Unit.USER:
        return rounding.conditional_round(y, rounding_key, l2_bound=params.rounding_l2_bound,
                                          max_tries=params.max_rounding_tries)  # fmt: skip
    return rounding.randomized_round(y, rounding_key), jnp.bool_(False)


def party_round_units(
    xs: jax.Array, params: DDPParams, *, rotation_key: jax.Array, rounding_keys: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The sum of ``K`` units' rounded vectors, each unit (row of ``xs [K, dim]``) scaled,
    rotated and rounded *on its own* with its own key (``rounding_keys [K]``):
    ``(int32[D], any unit's rounding failed)``.

    Why separately: conditional rounding is not linear. A party that holds several units
    (user level, a round with more sampled users than slots) and rounded their sum would
    make each unit's contribution depend on which other unit shares its party, and adding
    one unit re-pairs the others (docs/secagg.md, "Known privacy issues", 1). Rounded
    alone with keys that are independent across positions, the round's rounded units are
    independent draws, one per unit, whatever positions the packing gives them, so adding
    one unit adds one independent vector of norm at most the sensitivity.
    """
    values, failed = jax.vmap(
        lambda x, k: party_round(x, params, rotation_key=rotation_key, rounding_key=k)
    )(xs, rounding_keys)
    # int32 sums wrap mod 2^32, which is all that the residue mod 2^bits keeps.
    return jnp.sum(values, axis=0, dtype=jnp.int32), jnp.any(failed)


def party_encode(
    x: jax.Array,
    params: DDPParams,
    *,
    rotation_key: jax.Array,
    rounding_key: jax.Array,
    noise_key: jax.Array,
) -> tuple[jax.Array, PartyReport]:
    """One party's noisy residues ``(round(rotate(gamma x)) + noise) mod 2^bits`` as ``uint32[D]``.

    ``x`` is the party's flat float update (its clipped sum), of length
    ``params.dim``, with ``||x|| <= params.party_l2_bound``; or ``[K, dim]``: ``K``
    units held by the party, each rounded on its own (:func:`party_round_units`, with
    ``rounding_key`` a ``[K]`` array of keys) and noised once. The rounding and
    noise keys are the party's own secrets; ``rotation_key`` is the round's
    public key, the same for every party. Jittable and vmappable.
    """
    if x.ndim == 2 and x.shape[1] == params.dim:
        if rounding_key.shape[:1] != x.shape[:1]:
            raise ValueError(f"Expected one rounding key per unit: {x.shape[0]} units, "
                             f"rounding_key.shape={rounding_key.shape}.")
        values, rounding_failed = party_round_units(x, params, rotation_key=rotation_key,
                                                    rounding_keys=rounding_key)  # fmt: skip
    elif x.shape == (params.dim,):
        values, rounding_failed = party_round(x, params, rotation_key=rotation_key,
                                              rounding_key=rounding_key)  # fmt: skip
    else:
        raise ValueError(f"Expected x.shape={x.shape} == ({params.dim},) or (units, "
                         f"{params.dim}).")
    noise, noise_failures = party_noise(noise_key, params)
    values = jnp.where(noise_failures > 0, 0, values)
    # int32 overflow wraps mod 2^32, which is all that the residue mod 2^bits keeps.
    summed = modular.to_modular(values, 32) + modular.to_modular(noise, 32)
    encoded = summed & modular.modulus_mask(params.bits)
    return encoded, PartyReport(rounding_failed, noise_failures)


def decode_sum(total: jax.Array, params: DDPParams, *, rotation_key: jax.Array) -> jax.Array:
    """The decoded noisy sum ``unrotate(lift(total)) / gamma`` as float32 of length ``params.dim``.

    ``total`` is the aggregator's unmasked sum mod ``2^bits``; the lift to
    ``[-2^(bits-1), 2^(bits-1))`` is the integer sum unless it wrapped.
    """
    lifted = modular.centered_lift(total, params.bits).astype(jnp.float32)
    return rotation.unrotate(lifted, rotation_key, params.dim, params.rotation) / np.float32(
        params.gamma
    )


class RoundReport(NamedTuple):
    """Non-private diagnostics of one distributed-DP round (per party)."""

    rounding_failed: jax.Array  # bool[n]
    noise_failures: jax.Array  # int32[n]


def ddp_secure_sum(
    per_party_updates: PyTree,
    *,
    params: DDPParams,
    round_masks: RoundMasks,
    rotation_key: jax.Array,
    rounding_keys: jax.Array,
    noise_keys: jax.Array,
    units_axis: bool = False,
) -> tuple[PyTree, RoundReport]:
    """The decoded noisy sum of the survivors through one simulated SecAgg round mod ``2^bits``.

    Args:
      per_party_updates: pytree of float arrays ``[n, ...]`` (each party's
        clipped sum); flattened per party to ``params.dim`` coordinates. With
        ``units_axis=True``: ``[K, n, ...]``, ``K`` units per party (unit ``k`` of party
        ``u`` is ``leaf[k, u]``), each rounded on its own (:func:`party_round_units`).
      params: from :func:`~dpjax.secagg.ddp_params.choose_parameters`.
      round_masks: from :func:`~dpjax.secagg.prepare_round` for the same ``n``.
      rotation_key: the round's public key (fresh per round).
      rounding_keys, noise_keys: ``n`` keys each, one per party (its secrets); with
        ``units_axis=True`` the rounding keys are ``[n, K]``, one per unit.
        They enter only the party side; the aggregator function receives the
        masked inputs and the unmasking seeds, nothing else.

    Returns:
      ``(noisy sum shaped like one party's update, RoundReport)``; all zeros if any
      party's noise sampler failed (see the code: a data-independent event). Parties
      are encoded one after another (``lax.map``) to keep memory at one
      party's noise batch.
    """
    if units_axis:
        units, spec = flatten_parties(per_party_updates, leading_axes=2)
        flat = jnp.swapaxes(units, 0, 1)  # [K, n, dim] -> [n, K, dim]: a party's units
        if rounding_keys.shape[:2] != flat.shape[:2]:
            raise ValueError(f"Expected rounding_keys of shape {flat.shape[:2]} (parties, "
                             f"units); got {rounding_keys.shape}.")
    else:
        flat, spec = flatten_parties(per_party_updates)
    n = flat.shape[0]
    if flat.shape[-1] != params.dim:
        raise ValueError(f"Expected {params.dim} coordinates per party, got {flat.shape[-1]}.")
    if round_masks.party_keys.shape[0] != n or rounding_keys.shape[0] != n:
        raise ValueError(f"Expected round_masks and keys for {n} parties.")
    if n > params.num_parties:
        raise ValueError(f"Expected at most params.num_parties={params.num_parties} parties.")

    def party(args):
        x, rounding_key, noise_key, keys, nonces, weights = args
        encoded, report = party_encode(x, params, rotation_key=rotation_key,
                                       rounding_key=rounding_key, noise_key=noise_key)  # fmt: skip
        masked = modular.masked_input_mod(encoded, keys, nonces, weights, bits=params.bits)
        return masked, report

    masked, reports = jax.lax.map(
        party,
        (flat, rounding_keys, noise_keys, round_masks.party_keys, round_masks.party_nonces,
         round_masks.party_weights),
    )  # fmt: skip
    arrived = masked * round_masks.survivor_weights[:, None]
    total = modular.aggregate_masked_mod(arrived, round_masks.unmask_keys,
                                         round_masks.unmask_nonces, round_masks.unmask_weights,
                                         bits=params.bits)  # fmt: skip
    decoded = decode_sum(total, params, rotation_key=rotation_key)
    # A party whose sampler left coordinates unsampled sent less noise there than the
    # accountant counts for the other parties' data: the round then releases zeros. The
    # event depends only on the parties' noise keys, never on data, so the zero release is
    # data-independent (probability < 2^-100 per party; discrete._loop_rounds).
    short = jnp.any(reports.noise_failures > 0)
    decoded = jnp.where(short, jnp.zeros_like(decoded), decoded)
    return unflatten_party(decoded, spec), RoundReport(*reports)

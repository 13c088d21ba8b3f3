"""``secure_sum``: a drop-in for ``jnp.sum(updates, axis=0)`` through SecAgg.

Two steps, so the array part can run inside ``jit``:

1. :func:`prepare_round` (host, not jittable) runs the key agreement, the
   Shamir sharing and the dropout recovery of :mod:`dpjax.secagg.protocol`
   for every simulated party and returns a :class:`RoundMasks` pytree of
   ``uint32`` arrays: each party's mask seeds and the aggregator's unmasking
   seeds.
2. :func:`secure_sum` (jittable) encodes every party's update, masks it,
   sums the survivors' masked inputs, removes the leftover masks and decodes.

Guarantee: the output equals the survivors' sum of their stochastically
rounded updates, i.e. the plain float sum over survivors to within
``quantization_error_bound(num_parties, scale)`` per coordinate; what the
aggregator sees is that sum and the masked inputs (see ``protocol``). No DP
noise is added here: add it once to the result (``dpjax.privatize``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import dpjax._validate as _validate
import dpjax.secagg.protocol as protocol
from dpjax.secagg.encoding import decode, encode
from dpjax.secagg.graph import complete_graph, random_regular_graph
from dpjax.secagg.keys import KeyAgreement, dealer_pair_seeds
from dpjax.secagg.randomness import Mode, host_rng

PyTree = Any


class RoundMasks(NamedTuple):
    """All seeds of one simulated round, as arrays (a pytree; pass it into ``jit``)."""

    party_keys: jax.Array  # uint32[n, k+1, 8]
    party_nonces: jax.Array  # uint32[n, k+1, 3]
    party_weights: jax.Array  # uint32[n, k+1]
    survivor_weights: jax.Array  # uint32[n]: 1 if the party's masked input arrives
    unmask_keys: jax.Array  # uint32[m, 8]
    unmask_nonces: jax.Array  # uint32[m, 3]
    unmask_weights: jax.Array  # uint32[m]


def _party_set(name: str, parties: Iterable[int] | None, default: set[int], n: int) -> set[int]:
    chosen = set(default if parties is None else (int(p) for p in parties))
    if not chosen <= set(range(n)):
        raise ValueError(f"Expected {name}={sorted(chosen)} to be parties in [0, {n}).")
    return chosen


def prepare_round(
    num_parties: int,
    *,
    threshold: int,
    num_neighbours: int | None = None,
    survivors: Iterable[int] | None = None,
    responders: Iterable[int] | None = None,
    round_index: int = 0,
    key_agreement: KeyAgreement | str = KeyAgreement.X25519,
    mode: Mode | str = Mode.SECURE,
    seed: int | None = None,
) -> RoundMasks:
    """Simulates rounds 0, 1 and 3 of SecAgg for ``num_parties`` parties (host side).

    Args:
      num_parties: ``n``.
      threshold: ``t``; shares of each party's secrets are ``t``-of-``(k+1)``.
      num_neighbours: ``None`` for the complete graph (SecAgg), else ``k`` for a
        random k-regular graph (SecAgg+).
      survivors: parties whose masked input reaches the aggregator (default all).
      responders: survivors that answer the unmasking request (default all
        survivors).
      round_index: distinct per round; it enters every nonce and KDF input.
      key_agreement: ``"x25519"`` or ``"trusted_dealer"`` (see ``keys``).
      mode: ``"secure"`` (OS randomness, ``seed`` must be None) or
        ``"simulation"`` (everything derived from ``seed``).

    Raises:
      ValueError: fewer than ``threshold`` survivors/responders, or any party
        with fewer than ``threshold`` responding holders.
    """
    _validate.positive_int("num_parties", num_parties)
    mode = Mode(mode)
    n = num_parties
    rng = host_rng(mode, seed, round_index, n)  # public randomness (graph) and dealer
    graph = (
        complete_graph(n) if num_neighbours is None
        else random_regular_graph(n, num_neighbours, rng)
    )  # fmt: skip
    config = protocol.RoundConfig(graph, threshold, round_index, KeyAgreement(key_agreement))
    party_rng = [host_rng(mode, seed, round_index, u) for u in range(n)]

    private, public, dealt = {}, {}, {}
    if config.key_agreement is KeyAgreement.X25519:
        for u in range(n):
            private[u], public[u] = protocol.party_keypair(party_rng[u])
    else:
        for (u, v), s in dealer_pair_seeds(graph, rng).items():
            dealt.setdefault(u, {})[v] = s
            dealt.setdefault(v, {})[u] = s

    states, inbox = [], {u: [] for u in range(n)}
    for u in range(n):
        pair_seeds = protocol.party_pair_seeds(
            u, config, private_key=private.get(u), public_keys=public, dealt=dealt.get(u)
        )
        state, bundles = protocol.party_share_keys(
            u, config, pair_seeds, party_rng[u], private_key=private.get(u)
        )
        states.append(state)
        for bundle in bundles:
            inbox[bundle.holder].append(bundle)
    plans = [protocol.party_mask_plan(s, config) for s in states]

    alive = _party_set("survivors", survivors, set(range(n)), n)
    answering = _party_set("responders", responders, alive, n)
    dropped = set(range(n)) - alive
    reveals = [
        r for h in sorted(answering)
        for r in protocol.party_unmask_response(h, inbox[h], alive, dropped)
    ]  # fmt: skip
    unmask = protocol.aggregator_unmask_plan(config, reveals, alive, public)
    return RoundMasks(
        *(jnp.asarray(np.stack([p[i] for p in plans])) for i in range(3)),
        jnp.asarray(np.isin(np.arange(n), sorted(alive)).astype(np.uint32)),
        *(jnp.asarray(a) for a in unmask),
    )


def flatten_parties(per_party_updates: PyTree, leading_axes: int = 1) -> tuple[jax.Array, Any]:
    """``(float32[n, D], spec)``: each party's leaves concatenated; ``spec`` undoes it for
    one party. ``leading_axes=2``: leaves ``[K, n, ...]`` (``K`` units per party) give
    ``float32[K, n, D]``."""
    leaves, treedef = jax.tree_util.tree_flatten(per_party_updates)
    lead = leaves[0].shape[:leading_axes]
    if any(leaf.ndim < leading_axes or leaf.shape[:leading_axes] != lead for leaf in leaves):
        raise ValueError(f"Expected every leaf to have the same leading axes {lead}.")
    flat = jnp.concatenate(
        [jnp.reshape(leaf, lead + (-1,)).astype(jnp.float32) for leaf in leaves], -1)
    return flat, (treedef, [leaf.shape[leading_axes:] for leaf in leaves],
                  [leaf.dtype for leaf in leaves])


def unflatten_party(flat: jax.Array, spec: Any) -> PyTree:
    """One party's pytree from its flat ``D`` coordinates (inverse of :func:`flatten_parties`)."""
    treedef, shapes, dtypes = spec
    sizes = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]
    parts = jnp.split(flat, sizes)
    leaves = [p.reshape(s).astype(d) for p, s, d in zip(parts, shapes, dtypes, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def secure_sum(
    per_party_updates: PyTree,
    *,
    scale: float,
    round_masks: RoundMasks,
    max_abs: float | None = None,
    rounding_key: jax.Array | None = None,
) -> PyTree:
    """The survivors' sum over the leading party axis, computed through SecAgg.

    Args:
      per_party_updates: pytree of float arrays ``[n, ...]`` (e.g. each
        party's clipped gradient sum).
      scale: fixed-point units per 1.0; ``n * (max_abs * scale + 1) < 2^31``
        is checked before encoding.
      round_masks: from :func:`prepare_round` for the same ``n``.
      max_abs: public bound on every ``|update|`` coordinate (required inside
        ``jit``; values beyond it are clamped). ``None``: use the data's max.
      rounding_key: ``jax.random`` key for unbiased stochastic rounding;
        ``None`` rounds to nearest.

    Returns:
      float pytree shaped like one party's update: ``sum_{u in survivors} x_u``
      within ``quantization_error_bound(n, scale)`` per coordinate.
    """
    flat, spec = flatten_parties(per_party_updates)
    n = flat.shape[0]
    if round_masks.party_keys.shape[0] != n:
        raise ValueError(
            f"Expected round_masks for {n} parties, got {round_masks.party_keys.shape[0]}."
        )
    if max_abs is None:
        if isinstance(flat, jax.core.Tracer):
            raise ValueError("Expected max_abs to be given when secure_sum runs inside jit.")
        max_abs = float(jnp.max(jnp.abs(flat), initial=0.0))
    # One encode of the [n, d] block: each party's values get their own rounding draws.
    encoded = encode(flat, scale, key=rounding_key, max_abs=max_abs, num_parties=n)
    masked = jax.vmap(protocol.masked_input)(
        encoded, round_masks.party_keys, round_masks.party_nonces, round_masks.party_weights
    )
    arrived = masked * round_masks.survivor_weights[:, None]
    total = protocol.aggregate_masked(
        arrived, round_masks.unmask_keys, round_masks.unmask_nonces, round_masks.unmask_weights
    )
    return unflatten_party(decode(total, scale), spec)

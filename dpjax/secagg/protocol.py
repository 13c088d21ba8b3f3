"""SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020), one function per role.

Each ``party_*`` function takes only what that party holds (its own secrets
and the messages addressed to it); ``aggregator_*`` functions take only what
the server receives. A simulation calls them in order, in one process:

0. keys:    ``party_keypair`` (X25519) or a trusted dealer hands out pair seeds.
1. share:   ``party_share_keys`` draws a fresh self-mask seed ``b_u`` and
            Shamir-shares ``b_u`` and its pairwise secret (private key, or the
            dealt pair seeds) ``threshold``-of-``(k+1)`` among its neighbours
            and itself. (In a deployment these messages are encrypted and
            authenticated; the simulation assumes the aggregator does not
            read them.)
2. mask:    ``masked_input`` = ``x_u + PRG(b_u) + sum_v +-PRG(s_uv)``  (jnp).
            ``+`` when ``u < v``, ``-`` when ``u > v``: pair masks cancel in the sum.
3. unmask:  each responder reveals, per owner, the share of ``b_u`` if ``u``
            survived and the share of the pairwise secret if ``u`` dropped, never
            both (``party_unmask_response``); ``aggregator_unmask_plan``
            reconstructs them and ``aggregate_masked`` removes the masks.

Guarantee (honest-but-curious aggregator, colluding with fewer than
``threshold`` parties of any neighbourhood): the aggregator learns the sum
mod 2^32 of the survivors' encoded inputs and who dropped, and nothing else;
each masked input alone is uniformly distributed (one-time pad by PRG(b_u)).
With too few responders it raises ``ValueError`` rather than output a sum.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.secagg.chacha import weighted_stream_sum
from dpjax.secagg.keys import KeyAgreement, x25519_keypair, x25519_pair_seed
from dpjax.secagg.randomness import Purpose, fresh_seed, nonce
from dpjax.secagg.shamir import MERSENNE_61, shamir_reconstruct, shamir_share

MINUS_ONE = np.uint32(2**32 - 1)


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    """Public parameters of one aggregation round."""

    graph: np.ndarray  # int[num_parties, k]: sorted neighbours of each party
    threshold: int
    round_index: int = 0
    key_agreement: KeyAgreement = KeyAgreement.X25519
    prime: int = MERSENNE_61

    def __post_init__(self):
        holders = self.graph.shape[1] + 1
        if not 1 <= self.threshold <= holders:
            raise ValueError(
                f"Expected threshold={self.threshold} in [1, k + 1 = {holders}] "
                "(a party's secrets are shared among its k neighbours and itself)."
            )
        if self.prime <= 2**32:
            raise ValueError(f"Expected prime={self.prime} > 2^32 to hold 32-bit seed words.")
        object.__setattr__(self, "key_agreement", KeyAgreement(self.key_agreement))

    @property
    def num_parties(self) -> int:
        return self.graph.shape[0]

    def holders(self, party: int) -> list[int]:
        """Who holds Shamir shares of ``party``'s secrets: its neighbours and itself."""
        return sorted([party, *(int(v) for v in self.graph[party])])


@dataclasses.dataclass(frozen=True)
class ShareBundle:
    """Shamir shares of ``owner``'s secrets addressed to ``holder`` (at x = holder + 1)."""

    owner: int
    holder: int
    self_seed_share: tuple[int, ...]
    pair_secret_share: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PartyState:
    """Private state after round 1 (``pair_seeds[i]`` is shared with ``graph[party][i]``)."""

    party: int
    self_seed: np.ndarray  # uint32[8]
    pair_seeds: np.ndarray  # uint32[k, 8]


@dataclasses.dataclass(frozen=True)
class Reveal:
    """A holder's round-3 answer: its share of ``owner``'s ``secret`` ("self" or "pair")."""

    owner: int
    holder: int
    secret: str
    share: tuple[int, ...]


def party_keypair(rng: np.random.Generator | None) -> tuple[bytes, bytes]:
    """Round 0 (X25519): a fresh ``(private, public)`` masking key pair for this round."""
    return x25519_keypair(rng)


def party_pair_seeds(
    party: int,
    config: RoundConfig,
    *,
    private_key: bytes | None = None,
    public_keys: dict[int, bytes] | None = None,
    dealt: dict[int, np.ndarray] | None = None,
) -> np.ndarray:
    """``uint32[k, 8]``: the seed ``party`` shares with each neighbour, in graph order."""
    neighbours = [int(v) for v in config.graph[party]]
    if config.key_agreement is KeyAgreement.TRUSTED_DEALER:
        return np.stack([dealt[v] for v in neighbours]).reshape(len(neighbours), 8)
    return np.stack(
        [
            x25519_pair_seed(
                private_key, public_keys[v], parties=(party, v), round_index=config.round_index
            )
            for v in neighbours
        ]
    ).reshape(len(neighbours), 8)


def party_share_keys(
    party: int,
    config: RoundConfig,
    pair_seeds: np.ndarray,
    rng: np.random.Generator | None,
    *,
    private_key: bytes | None = None,
) -> tuple[PartyState, list[ShareBundle]]:
    """Round 1: draw ``b_u`` and Shamir-share ``b_u`` and the pairwise secret.

    The pairwise secret is the X25519 private key (8 words) or, with a trusted
    dealer, all ``k`` pair seeds (``8 k`` words).
    """
    self_seed = fresh_seed(rng)
    if config.key_agreement is KeyAgreement.X25519:
        pair_secret = np.frombuffer(private_key, dtype="<u4")
    else:
        pair_secret = pair_seeds.reshape(-1)
    holders = config.holders(party)
    xs = [h + 1 for h in holders]
    share = dict(threshold=config.threshold, xs=xs, prime=config.prime, rng=rng)
    self_shares = shamir_share(self_seed.tolist(), **share)
    pair_shares = shamir_share(pair_secret.tolist(), **share)
    bundles = [
        ShareBundle(party, h, tuple(self_shares[i]), tuple(pair_shares[i]))
        for i, h in enumerate(holders)
    ]
    return PartyState(party, self_seed, np.asarray(pair_seeds, np.uint32)), bundles


def party_mask_plan(state: PartyState, config: RoundConfig) -> tuple[np.ndarray, ...]:
    """``(keys[k+1, 8], nonces[k+1, 3], weights[k+1])`` of the masks ``party`` adds."""
    neighbours = config.graph[state.party]
    keys = np.concatenate([state.self_seed[None], state.pair_seeds])
    nonces = np.stack(
        [nonce(Purpose.SELF_MASK, config.round_index)]
        + [nonce(Purpose.PAIR_MASK, config.round_index)] * len(neighbours)
    )
    signs = np.where(neighbours > state.party, np.uint32(1), MINUS_ONE)
    return keys, nonces, np.concatenate([[np.uint32(1)], signs]).astype(np.uint32)


def masked_input(
    encoded: jax.Array, keys: jax.Array, nonces: jax.Array, weights: jax.Array,
    lane_bits: int = 32,
) -> jax.Array:
    """Round 2 (jnp, jittable): ``encoded + sum_j weights[j] * PRG(keys[j], nonces[j])``.

    ``encoded`` is a flat ``uint32[D]`` vector. ``lane_bits < 32``: the PRG's words are cut
    in lanes (:func:`~dpjax.secagg.chacha.weighted_stream_sum`), for sums kept mod
    ``2^lane_bits`` or a divisor of it.
    """
    return encoded + weighted_stream_sum(keys, nonces, weights, encoded.shape[0], lane_bits)


def party_unmask_response(
    holder: int, inbox: list[ShareBundle], survivors: set[int], dropped: set[int]
) -> list[Reveal]:
    """Round 3: reveal ``b_u`` shares of survivors and pair-secret shares of dropped parties.

    Refuses (``ValueError``) a request naming a party as both, which would
    let the aggregator unmask that party's input.
    """
    if survivors & dropped:
        raise ValueError(
            "Expected survivors and dropped to be disjoint, "
            f"both contain {sorted(survivors & dropped)}."
        )
    reveals = []
    for bundle in inbox:
        if bundle.owner in survivors:
            reveals.append(Reveal(bundle.owner, holder, "self", bundle.self_seed_share))
        elif bundle.owner in dropped:
            reveals.append(Reveal(bundle.owner, holder, "pair", bundle.pair_secret_share))
    return reveals


def _reconstruct_words(
    owner: int, secret: str, reveals: list[Reveal], config: RoundConfig
) -> np.ndarray:
    mine = [r for r in reveals if r.owner == owner and r.secret == secret]
    if len(mine) < config.threshold:
        raise ValueError(
            f"Expected at least threshold={config.threshold} shares of party {owner}'s "
            f"{secret} secret, got {len(mine)}: cannot remove its masks."
        )
    xs = [r.holder + 1 for r in mine]
    words = shamir_reconstruct(
        xs, np.array([r.share for r in mine], dtype=object),
        threshold=config.threshold, prime=config.prime,
    )  # fmt: skip
    return np.array(words, dtype=np.uint32)


def aggregator_unmask_plan(
    config: RoundConfig,
    reveals: list[Reveal],
    survivors: set[int],
    public_keys: dict[int, bytes] | None = None,
) -> tuple[np.ndarray, ...]:
    """Round 3 (aggregator): ``(keys, nonces, weights)`` that remove every leftover mask.

    Self masks of survivors are subtracted; for each dropped party ``d`` and
    surviving neighbour ``v``, the mask ``v`` added for ``d`` is subtracted.
    Raises ``ValueError`` if fewer than ``threshold`` parties responded or any
    needed secret has fewer than ``threshold`` shares.
    """
    responders = {r.holder for r in reveals}
    if len(survivors) < config.threshold or len(responders) < config.threshold:
        raise ValueError(
            f"Expected at least threshold={config.threshold} survivors and responders, got "
            f"{len(survivors)} survivors and {len(responders)} responders."
        )
    if not responders <= survivors:
        raise ValueError(f"Expected responders {sorted(responders - survivors)} to be survivors.")
    keys, nonces, weights = [], [], []
    for u in sorted(survivors):
        keys.append(_reconstruct_words(u, "self", reveals, config))
        nonces.append(nonce(Purpose.SELF_MASK, config.round_index))
        weights.append(MINUS_ONE)
    for d in sorted(set(range(config.num_parties)) - survivors):
        secret = _reconstruct_words(d, "pair", reveals, config)
        for i, v in enumerate(int(v) for v in config.graph[d]):
            if v not in survivors:
                continue
            if config.key_agreement is KeyAgreement.X25519:
                seed = x25519_pair_seed(
                    secret.astype("<u4").tobytes(), public_keys[v],
                    parties=(d, v), round_index=config.round_index,
                )  # fmt: skip
            else:
                seed = secret.reshape(-1, 8)[i]
            keys.append(seed)
            nonces.append(nonce(Purpose.PAIR_MASK, config.round_index))
            # v added +PRG(s_vd) if v < d, else -PRG(s_vd); take it back.
            weights.append(MINUS_ONE if v < d else np.uint32(1))
    return (
        np.stack(keys).astype(np.uint32),
        np.stack(nonces).astype(np.uint32),
        np.array(weights, dtype=np.uint32),
    )


def aggregate_masked(
    masked_inputs: jax.Array, keys: jax.Array, nonces: jax.Array, weights: jax.Array,
    lane_bits: int = 32,
) -> jax.Array:
    """Aggregator (jnp, jittable): ``sum_u masked_inputs[u] + sum_j weights[j] * PRG(...)``,
    the PRG cut in lanes of ``lane_bits`` as the parties cut it (:func:`masked_input`)."""
    total = jnp.sum(masked_inputs, axis=0, dtype=jnp.uint32)
    return total + weighted_stream_sum(keys, nonces, weights, total.shape[0], lane_bits)

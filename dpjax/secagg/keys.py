"""Pairwise mask seeds: X25519 key agreement + HKDF, or a trusted dealer.

- ``"x25519"`` (default): each party draws an X25519 key pair per round and
  publishes the public key; parties ``u < v`` both compute the shared secret
  and derive ``s_uv = HKDF-SHA256(shared, info = tag || round || u || v)``.
  Only ``u`` and ``v`` (or whoever reconstructs one of their private keys
  from ``threshold`` Shamir shares) can compute ``s_uv``. Needs the
  ``cryptography`` package.
- ``"trusted_dealer"``: a dealer draws each ``s_uv`` and hands it to ``u`` and
  ``v`` only. The dealer learns every mask, so this only models a setting
  where that party is trusted; each party must then Shamir-share all its
  ``k`` pair seeds instead of one private key.
"""

from __future__ import annotations

import enum
import struct

import numpy as np

from dpjax.secagg.chacha import bytes_to_words
from dpjax.secagg.randomness import random_bytes

_PAIR_INFO = b"dpjax-secagg/pair-mask-seed/v1"


class KeyAgreement(enum.StrEnum):
    """How the two parties of a pair come to share a mask seed."""

    X25519 = "x25519"
    TRUSTED_DEALER = "trusted_dealer"


def _x25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import x25519
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError(
            "Expected the `cryptography` package for key_agreement='x25519' "
            "(pip install cryptography), or use key_agreement='trusted_dealer'."
        ) from err
    return x25519


def x25519_keypair(rng: np.random.Generator | None) -> tuple[bytes, bytes]:
    """``(private_key, public_key)`` as 32 raw bytes each; OS randomness if ``rng is None``."""
    x25519 = _x25519()
    private = x25519.X25519PrivateKey.from_private_bytes(random_bytes(32, rng))
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def x25519_pair_seed(
    own_private: bytes, peer_public: bytes, *, parties: tuple[int, int], round_index: int
) -> np.ndarray:
    """``s_uv`` as ``uint32[8]``: HKDF-SHA256 of the X25519 shared secret.

    The info string binds the seed to the (unordered) pair and the round, so
    a seed is never reused across pairs or rounds even if keys were.
    """
    x25519 = _x25519()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = x25519.X25519PrivateKey.from_private_bytes(own_private).exchange(
        x25519.X25519PublicKey.from_public_bytes(peer_public)
    )
    low, high = sorted(parties)
    info = _PAIR_INFO + struct.pack("<QII", round_index, low, high)
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    return bytes_to_words(seed)


def dealer_pair_seeds(
    graph: np.ndarray, rng: np.random.Generator | None
) -> dict[tuple[int, int], np.ndarray]:
    """A fresh ``uint32[8]`` seed for every edge ``(u, v)``, ``u < v``, of ``graph``."""
    edges = sorted({(min(u, int(v)), max(u, int(v))) for u in range(len(graph)) for v in graph[u]})
    return {edge: bytes_to_words(random_bytes(32, rng)) for edge in edges}

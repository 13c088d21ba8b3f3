"""Additive n-of-n secret sharing over Z_2^32.

Guarantee: for a uniformly random key, any ``num_parties - 1`` of the shares
are uniform on Z_2^32 and independent of the secret; all ``num_parties``
together give the secret back exactly (``reconstruct``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import dpjax._validate as _validate
from dpjax.secagg.chacha import chacha20_stream
from dpjax.secagg.randomness import Purpose, nonce, simulation_seed


def _share_key(key: jax.Array) -> jax.Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return simulation_seed(key)
    if key.shape != (8,) or key.dtype != jnp.uint32:
        raise ValueError(
            "Expected key to be a uint32[8] ChaCha20 seed (e.g. secagg.fresh_seed()) or a typed "
            f"jax.random.key (simulation), got dtype={key.dtype} shape={key.shape}."
        )
    return key


def share(x: jax.Array, num_parties: int, key: jax.Array) -> jax.Array:
    """Additive shares of the ``uint32`` array ``x``: ``uint32[num_parties, *x.shape]``.

    Shares ``0 .. num_parties - 2`` are the ChaCha20 stream of ``key``
    (nonce ``(SHARE, 0, 0)``); the last share is ``x`` minus their sum mod
    2^32, so the shares sum to ``x`` mod 2^32.

    ``key`` is either a 256-bit ChaCha20 seed ``uint32[8]`` (secure mode:
    draw it with :func:`dpjax.secagg.fresh_seed`, i.e. ``os.urandom``) or a
    typed ``jax.random.key`` (simulation mode: the seed is drawn with
    Threefry). Use each key for one call only: two secrets shared with the
    same key have identical first ``num_parties - 1`` shares, so the
    difference of their last shares reveals the difference of the secrets.
    """
    _validate.positive_int("num_parties", num_parties)
    x = jnp.asarray(x)
    if x.dtype != jnp.uint32:
        raise ValueError(f"Expected x.dtype={x.dtype} to be uint32 (encode floats first).")
    seed = _share_key(jnp.asarray(key))
    num_random = (num_parties - 1) * x.size
    stream = chacha20_stream(seed, jnp.asarray(nonce(Purpose.SHARE, 0)), num_random)
    random_shares = stream.reshape(num_parties - 1, *x.shape)
    last = x - jnp.sum(random_shares, axis=0, dtype=jnp.uint32)
    return jnp.concatenate([random_shares, last[None]], axis=0)


def reconstruct(shares: jax.Array) -> jax.Array:
    """The secret: sum of ``shares`` over the leading axis, mod 2^32."""
    shares = jnp.asarray(shares)
    if shares.dtype != jnp.uint32 or shares.ndim < 1:
        raise ValueError(
            f"Expected shares to be uint32 with a leading party axis, got dtype={shares.dtype} "
            f"shape={shares.shape}."
        )
    return jnp.sum(shares, axis=0, dtype=jnp.uint32)

"""Where secagg's randomness comes from, and how PRG inputs are kept distinct.

Two explicit modes (:class:`Mode`):

- ``"secure"``: every seed, secret key and Shamir coefficient is drawn from
  the operating system (``os.urandom`` / ``secrets``). Passing a ``seed`` is
  refused, so a secure run can never be replayed by accident.
- ``"simulation"``: everything is derived from an integer ``seed`` (numpy's
  PCG64 on the host, or Threefry via :func:`simulation_seed`) so that tests
  and experiments are reproducible. Anyone who knows the seed knows every
  mask: use it only to study accuracy and cost, never to protect data.

Domain separation: a ChaCha20 key is only ever used with the nonce
``(purpose, round_index)`` (the 64-bit round index in the last two words) of
its single purpose (:class:`Purpose`), and
keys are fresh per round, so no ``(key, nonce, counter)`` triple is reused
for two different masks or shares.
"""

from __future__ import annotations

import enum
import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.secagg.chacha import bytes_to_words


class Mode(enum.StrEnum):
    """Where host randomness comes from; affects the security guarantee."""

    SECURE = "secure"
    SIMULATION = "simulation"


class Purpose(enum.IntEnum):
    """First nonce word: what a ChaCha20 stream is used for."""

    SHARE = 1
    SELF_MASK = 2
    PAIR_MASK = 3


def host_rng(mode: Mode | str, seed: int | None, *stream: int) -> np.random.Generator | None:
    """``None`` (use the OS) in secure mode; a PCG64 generator in simulation mode.

    ``stream`` (e.g. ``round_index, party``) is mixed into the simulation seed
    so that different rounds and parties get independent generators.
    """
    mode = Mode(mode)
    if mode is Mode.SECURE:
        if seed is not None:
            raise ValueError(f"Expected seed={seed} to be None in mode='secure'.")
        return None
    if seed is None or isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Expected seed={seed!r} to be an integer >= 0 in mode='simulation'.")
    return np.random.default_rng([seed, *stream])


def random_bytes(num_bytes: int, rng: np.random.Generator | None) -> bytes:
    """``num_bytes`` uniform bytes: ``os.urandom`` if ``rng is None``."""
    return os.urandom(num_bytes) if rng is None else rng.bytes(num_bytes)


def random_below(bound: int, count: int, rng: np.random.Generator | None) -> list[int]:
    """``count`` independent uniform integers in ``[0, bound)`` (exactly uniform)."""
    if rng is None:
        return [secrets.randbelow(bound) for _ in range(count)]
    return [int(v) for v in rng.integers(0, bound, size=count, dtype=np.int64)]


def fresh_seed(rng: np.random.Generator | None = None) -> np.ndarray:
    """A 256-bit ChaCha20 key as ``uint32[8]``; from ``os.urandom`` unless ``rng`` is given."""
    return bytes_to_words(random_bytes(32, rng))


def simulation_seed(key: jax.Array) -> jax.Array:
    """A 256-bit ChaCha20 key drawn with ``jax.random`` (simulation mode only).

    Jittable, so a whole simulated protocol can run inside ``jit``; the key is
    exactly as secret as ``key`` is (usually not at all).
    """
    return jax.random.bits(key, (8,), jnp.uint32)


def nonce(purpose: Purpose, round_index: int) -> np.ndarray:
    """The ChaCha20 nonce ``uint32[3]``: ``purpose``, then the 64-bit ``round_index``."""
    if not 0 <= round_index < 2**64:
        raise ValueError(f"Expected round_index={round_index} in [0, 2^64).")
    low, high = round_index & 0xFFFFFFFF, round_index >> 32
    return np.array([int(Purpose(purpose)), low, high], dtype=np.uint32)

"""Where a run's randomness comes from: one 256-bit secret, one generator.

Every random draw the privacy guarantee depends on -- the Gaussian noise of each
step, the examples the sampler picks, the stochastic rounding of SecAgg -- comes
from ChaCha20 (RFC 8439) keyed with the run's :class:`Secret`. The nonce selects
the use: ``(stream, index, sub_index)``, e.g. ``(Stream.NOISE, step, 0)``, so no
``(key, nonce, counter)`` triple is ever used twice. The same function runs on
the device (``dpjax.secagg.chacha``, jnp) and on the host (the ``cryptography``
package's C implementation, for the sampler); both give the same words.

Two modes (:class:`Randomness`), one generator:

- ``secure`` (the default of ``dpjax-train``): the secret is 32 bytes from the
  operating system (``os.urandom``), drawn when a run starts, kept in its
  checkpoint (so a resume is bit-exact) and written nowhere else. Guessing it
  means guessing 256 bits, so knowing the config, the seed and every other
  example does not let anyone replay the noise or the batches.
- ``seeded``: the secret is derived from the public ``train.seed`` by HKDF-SHA256,
  so runs are reproducible -- and anyone who knows the seed can replay the run and
  subtract its noise. For experiments and tests only.

Library users who pass an ordinary JAX key to :func:`dpjax.privatize` own that
key: a guessable key (e.g. ``PRNGKey(0)``) voids the guarantee.
"""

from __future__ import annotations

import enum
import hashlib
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dpjax.choices import Randomness
from dpjax.secagg.chacha import WORDS_PER_BLOCK, bytes_to_words, chacha20_stream

SECRET_BYTES = 32
_SEEDED_INFO = b"dpjax seeded-mode run secret v1"
_MAX_BLOCKS = 2**32  # a ChaCha20 block counter is 32 bits
_SEGMENT_WORDS = 2**16  # noise drawn per run of leaves of about this many values (256 KiB)


class Stream(enum.IntEnum):
    """First nonce word: what a stream of the run's secret is used for.

    Values are far from ``dpjax.secagg.randomness.Purpose`` (1-3), whose keys are
    fresh per round anyway.
    """

    NOISE = 0x100
    SAMPLING = 0x101
    ROUNDING = 0x102
    AUDIT = 0x103
    ROTATION = 0x104  # distributed DP: the round's shared (public) rotation
    PARTY_NOISE = 0x105  # distributed DP: each party's own noise key (sub-index = party)
    PARTY_ROUNDING = 0x106  # distributed DP: each party's rounding (sub-index = party)


@flax.struct.dataclass
class Secret:
    """A run's 256-bit ChaCha20 key as ``uint32[8]``: private data, like the examples.

    Whoever holds it can regenerate the noise of every step and subtract it. It
    lives in the ``TrainState`` (hence in checkpoints, written owner-only) and in
    no other output.
    """

    words: jax.Array

    def __repr__(self) -> str:  # never print the words by accident (logs, tracebacks)
        return "Secret(<256 bits, not shown>)"


@flax.struct.dataclass
class StreamKey:
    """One ChaCha20 stream: the secret's key words and a nonce ``uint32[3]``."""

    key: jax.Array
    nonce: jax.Array

    def __repr__(self) -> str:
        return "StreamKey(<not shown>)"


def fresh_secret() -> Secret:
    """A secret from the operating system's entropy (``os.urandom``)."""
    return Secret(jnp.asarray(bytes_to_words(os.urandom(SECRET_BYTES))))


def seeded_secret(seed: int) -> Secret:
    """The secret of ``seeded`` mode: HKDF-SHA256 of the (public) integer ``seed``.

    Reproducible by design, hence replayable by anyone who knows ``seed``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"Expected seed={seed!r} to be an integer >= 0.")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=_SEEDED_INFO)
    material = int(seed).to_bytes(max(8, (int(seed).bit_length() + 7) // 8), "little")
    return Secret(jnp.asarray(bytes_to_words(hkdf.derive(material))))


def run_secret(randomness: Randomness | str, seed: int) -> Secret:
    """The secret of a run: fresh in ``secure`` mode, derived from ``seed`` in ``seeded``."""
    if Randomness(randomness) is Randomness.SECURE:
        return fresh_secret()
    return seeded_secret(seed)


def stream_key(secret: Secret, stream: Stream, index, sub_index=0) -> StreamKey:
    """The stream ``(stream, index, sub_index)`` of ``secret``; jittable (``index`` may be
    a traced int, e.g. the step). ``index`` and ``sub_index`` must be in [0, 2^32)."""
    nonce = jnp.stack([
        jnp.asarray(int(Stream(stream)), jnp.uint32),
        jnp.asarray(index).astype(jnp.uint32),
        jnp.asarray(sub_index).astype(jnp.uint32),
    ])
    return StreamKey(jnp.asarray(secret.words, jnp.uint32), nonce)


def bits_to_normal(bits: jax.Array) -> jax.Array:
    """Standard normal float32 values from uniform ``uint32`` words (inverse CDF).

    The top 23 bits make a uniform float in [-1, 1) (as ``jax.random.normal``
    does), clamped above -1, and ``sqrt(2) * erfinv`` maps it to N(0, 1).
    """
    one_to_two = jax.lax.bitcast_convert_type(
        (bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32
    )
    u = one_to_two * jnp.float32(2.0) - jnp.float32(3.0)
    u = jnp.maximum(u, jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0)))
    return jnp.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)


def normal_like(tree, key: StreamKey):
    """A pytree of independent N(0, 1) float32 values shaped like ``tree``'s leaves.

    The leaves, flattened in order, read consecutive words of the one stream
    ``key`` (one word per coordinate), so every coordinate gets its own word.
    Jittable. The stream is generated in segments at leaf boundaries
    (:func:`_segments`: each large leaf alone, small neighbours together) from
    the block that holds a segment's first word: the same words as one pass
    over the whole stream, but the keystream and ``erf_inv``'s temporaries are
    those of one segment, not of all parameters at once, while few segments
    keep the compiled program small.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return tree
    sizes = [int(np.prod(np.shape(leaf))) for leaf in leaves]
    if sum(sizes) > _MAX_BLOCKS * WORDS_PER_BLOCK:
        raise ValueError(f"Expected at most 2^36 values from one stream; got {sum(sizes)}.")
    out = []
    for start, stop in _segments(sizes):
        offset, n = sum(sizes[:start]), sum(sizes[start:stop])
        skip = offset % WORDS_PER_BLOCK  # words of the first block before this segment's
        words = chacha20_stream(key.key, key.nonce, skip + n,
                                counter0=offset // WORDS_PER_BLOCK)[skip:]
        z = bits_to_normal(words)
        cuts = np.cumsum(sizes[start:stop])[:-1]
        parts = jnp.split(z, cuts) if len(cuts) else [z]
        out += [part.reshape(np.shape(leaf))
                for part, leaf in zip(parts, leaves[start:stop], strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _segments(sizes: list[int], words: int = _SEGMENT_WORDS) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: consecutive leaves cut into runs of at least ``words``
    values (the last may be shorter); a leaf of ``words`` values or more is a run alone."""
    runs, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if size >= words and i > start:
            runs.append((start, i))
            start, total = i, 0
        total += size
        if total >= words:
            runs.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        runs.append((start, len(sizes)))
    return runs


def derived_key(key: StreamKey) -> jax.Array:
    """A fresh 256-bit ChaCha20 key (``uint32[8]``): the first 8 words of the stream.

    A key derivation by the PRF: as hard to guess as the secret, and independent
    across ``(stream, index, sub_index)``. Jittable.
    """
    return chacha20_stream(key.key, key.nonce, 8)


def jax_key(key: StreamKey) -> jax.Array:
    """A ``jax.random`` key (``uint32[2]``) from the first two words of the stream.

    Only for draws whose secrecy the guarantee does not need (stochastic
    rounding, whose analysis holds for any rounding draws): 64 bits of a JAX key
    could be searched, 256 bits of the secret cannot.
    """
    return chacha20_stream(key.key, key.nonce, 2)


def host_words(key: StreamKey, num_words: int, counter0: int = 0) -> np.ndarray:
    """``uint32[num_words]`` of the stream ``key`` on the host (C ChaCha20): the same
    words as ``dpjax.secagg.chacha20_stream(key.key, key.nonce, num_words, counter0)``."""
    num_blocks = -(-num_words // WORDS_PER_BLOCK)
    if counter0 < 0 or counter0 + num_blocks > _MAX_BLOCKS:
        raise ValueError(
            f"Expected counter0={counter0} >= 0 and counter0 + blocks={num_blocks} <= 2^32."
        )
    key_bytes = np.asarray(key.key, np.uint32).astype("<u4").tobytes()
    nonce = np.asarray(key.nonce, np.uint32).astype("<u4").tobytes()
    cipher = Cipher(algorithms.ChaCha20(key_bytes, counter0.to_bytes(4, "little") + nonce),
                    mode=None)
    stream = cipher.encryptor().update(bytes(4 * num_words))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def host_uniform(key: StreamKey, num: int) -> np.ndarray:
    """``float64[num]`` uniform on [0, 1) with 53 random bits each (two words per value)."""
    words = host_words(key, 2 * num).astype(np.uint64)
    combined = (words[0::2] << np.uint64(32)) | words[1::2]
    return (combined >> np.uint64(11)).astype(np.float64) * 2.0**-53


def host_secret_words(secret: Secret) -> np.ndarray:
    """The secret's words as a host array (one local copy of a replicated array)."""
    words = secret.words
    if isinstance(words, jax.Array) and not words.is_fully_addressable:
        words = words.addressable_data(0)
    return np.asarray(words, np.uint32)


def broadcast_secret(secret: Secret) -> Secret:
    """Process 0's secret on every process (multi-host runs draw it once)."""
    if jax.process_count() == 1:
        return secret
    from jax.experimental import multihost_utils  # noqa: PLC0415

    words = np.asarray(multihost_utils.broadcast_one_to_all(host_secret_words(secret)),
                       np.uint32)
    # Every process must hold the same secret, or each would draw its own batches and noise
    # for "replicated" parameters. A digest (not the secret) is compared across processes.
    digest = np.frombuffer(hashlib.sha256(words.tobytes()).digest(), np.uint32)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if not np.all(digests == digests[0]):
        raise RuntimeError("Expected every process to hold process 0's run secret after the "
                           "broadcast; they differ.")
    return Secret(jnp.asarray(words))

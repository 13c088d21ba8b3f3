"""ChaCha20 (RFC 8439) as ``jnp`` operations on ``uint32`` words.

The block function is written with ``uint32`` add, xor and rotate only, so it
is jittable, vmappable and runs on any backend. Streams are computed in
chunks of ``_CHUNK_BLOCKS`` blocks (``lax.map``) so that the 16 state words
of a chunk stay in cache across the 20 rounds; that chunking is what makes
the stream faster than ``jax.random.bits`` on CPU (see docs/secagg.md).

Guarantee: for a uniformly random 256-bit key, the words produced for
distinct ``(key, nonce, counter)`` triples are a pseudorandom function of the
triple (the standard ChaCha20 assumption). Callers must never reuse a
``(key, nonce, counter)`` triple for two different purposes; the SecAgg code
gets this from :mod:`dpjax.secagg.randomness` (fresh keys per round, purpose
and round in the nonce).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# "expand 32-byte k" as four little-endian words (RFC 8439, section 2.3).
SIGMA = np.array([0x61707865, 0x3320646E, 0x79622D32, 0x6B206574], dtype=np.uint32)
WORDS_PER_BLOCK = 16
_CHUNK_BLOCKS = 8192  # 16 words x 8192 blocks x 4 bytes = 512 KiB of state: fits L2.
_COLUMN_AND_DIAGONAL_ROUNDS = (
    (0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
    (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14),
)  # fmt: skip


def _rotl(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _quarter_round(s: list, a: int, b: int, c: int, d: int) -> None:
    s[a] = s[a] + s[b]
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = s[c] + s[d]
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = s[a] + s[b]
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = s[c] + s[d]
    s[b] = _rotl(s[b] ^ s[c], 7)


def _double_round(_: int, state: tuple) -> tuple:
    s = list(state)
    for a, b, c, d in _COLUMN_AND_DIAGONAL_ROUNDS:
        _quarter_round(s, a, b, c, d)
    return tuple(s)


def _as_words(name: str, value: jax.Array, num_words: int) -> jax.Array:
    value = jnp.asarray(value)
    if value.shape != (num_words,) or value.dtype != jnp.uint32:
        raise ValueError(
            f"Expected {name} to be a uint32 array of shape ({num_words},), "
            f"got dtype={value.dtype} shape={value.shape}."
        )
    return value


def _block_words(key: jax.Array, counter: jax.Array, nonce: jax.Array) -> list:
    """The 16 output words of each block, each shaped like ``counter``."""
    shape = counter.shape
    init = (
        [jnp.full(shape, c, jnp.uint32) for c in SIGMA]
        + [jnp.broadcast_to(key[i], shape) for i in range(8)]
        + [counter]
        + [jnp.broadcast_to(nonce[i], shape) for i in range(3)]
    )
    state = lax.fori_loop(0, 10, _double_round, tuple(init))
    return [x + y for x, y in zip(state, init, strict=True)]


def chacha20_block(key: jax.Array, counter: jax.Array | int, nonce: jax.Array) -> jax.Array:
    """ChaCha20 block function of RFC 8439, section 2.3.

    Args:
      key: ``uint32[8]``, the 256-bit key as little-endian words.
      counter: ``uint32`` block counter; any shape (blocks are computed for
        every entry at once).
      nonce: ``uint32[3]``, the 96-bit nonce as little-endian words.

    Returns:
      ``uint32[*counter.shape, 16]``: the serialized block as little-endian
      words (``words.view("<u1")`` gives the RFC's bytes).
    """
    key = _as_words("key", key, 8)
    nonce = _as_words("nonce", nonce, 3)
    counter = jnp.asarray(counter, dtype=jnp.uint32)
    return jnp.stack(_block_words(key, counter, nonce), axis=-1)


def _check_counter_range(counter0: int, num_blocks: int) -> None:
    if counter0 < 0 or counter0 + num_blocks > 2**32:
        raise ValueError(
            f"Expected counter0={counter0} >= 0 and counter0 + num_blocks={num_blocks} <= 2^32 "
            "(a ChaCha20 counter must not wrap: that would reuse keystream)."
        )


def _chunked_counters(counter0: int, num_words: int) -> jax.Array:
    num_blocks = -(-num_words // WORDS_PER_BLOCK)
    _check_counter_range(counter0, num_blocks)
    chunk = min(_CHUNK_BLOCKS, num_blocks)
    num_chunks = -(-num_blocks // chunk)
    # Padding blocks past the last real one are computed and discarded.
    offsets = jnp.arange(num_chunks * chunk, dtype=jnp.uint32).reshape(num_chunks, chunk)
    return offsets + np.uint32(counter0)


def _map_chunks(fn, counters: jax.Array) -> jax.Array:
    # A single chunk needs no loop; skipping it makes small streams compile faster.
    if counters.shape[0] == 1:
        return fn(counters[0])[None]
    return lax.map(fn, counters)


def chacha20_stream(
    key: jax.Array, nonce: jax.Array, num_words: int, counter0: int = 0
) -> jax.Array:
    """The ChaCha20 keystream: blocks ``counter0, counter0 + 1, ...`` concatenated.

    Returns ``uint32[num_words]`` (``num_words`` is static). Raises
    ``ValueError`` if the counter would wrap past 2^32 blocks.
    """
    key = _as_words("key", key, 8)
    nonce = _as_words("nonce", nonce, 3)
    if num_words == 0:
        return jnp.zeros((0,), jnp.uint32)
    counters = _chunked_counters(counter0, num_words)
    # Stacking on axis 0 then transposing is faster on CPU than stacking on -1.
    blocks = _map_chunks(lambda c: jnp.stack(_block_words(key, c, nonce)).T, counters)
    return blocks.reshape(-1)[:num_words]


def weighted_stream_sum(
    keys: jax.Array, nonces: jax.Array, weights: jax.Array, num_words: int, lane_bits: int = 32
) -> jax.Array:
    """``sum_j weights[j] * chacha20_stream(keys[j], nonces[j], num_words)`` mod 2^32.

    ``keys``: ``uint32[m, 8]``, ``nonces``: ``uint32[m, 3]``, ``weights``:
    ``uint32[m]`` (use ``2^32 - 1`` for -1). This is how masks are added and
    removed: each chunk of every stream is accumulated while still in cache,
    so the cost is that of generating the ``m`` streams.

    ``lane_bits`` 16 or 8 (for sums kept only mod ``2^lane_bits`` or a divisor of it):
    each keystream word is cut into ``32 / lane_bits`` lanes, low bits first, and lane
    ``k`` of word ``i`` is value ``i * 32 / lane_bits + k`` of the ``num_words`` values
    returned (so only ``num_words * lane_bits / 32`` words are generated). Lanes are
    split before they are weighted and summed, so no carry crosses from one value into
    another: entry ``t`` is correct mod ``2^lane_bits`` (its higher bits are not
    meaningful). Every value still comes from its own bits of the keystream.
    """
    keys = jnp.asarray(keys, jnp.uint32)
    nonces = jnp.asarray(nonces, jnp.uint32)
    weights = jnp.asarray(weights, jnp.uint32)
    if keys.ndim != 2 or keys.shape[1] != 8 or nonces.shape != (keys.shape[0], 3):
        raise ValueError(
            f"Expected keys of shape (m, 8) and nonces of shape (m, 3), "
            f"got keys.shape={keys.shape} nonces.shape={nonces.shape}."
        )
    if weights.shape != (keys.shape[0],):
        raise ValueError(f"Expected weights.shape={weights.shape} == ({keys.shape[0]},).")
    if lane_bits not in (8, 16, 32):
        raise ValueError(f"Expected lane_bits={lane_bits!r} to be 8, 16 or 32.")
    if num_words == 0:
        return jnp.zeros((0,), jnp.uint32)
    lanes = 32 // lane_bits
    counters = _chunked_counters(0, -(-num_words // lanes))

    def split(words: jax.Array) -> jax.Array:  # [16, chunk] -> [16, chunk, lanes]
        if lanes == 1:
            return words
        low = np.uint32((1 << lane_bits) - 1)
        return jnp.stack([(words >> np.uint32(lane_bits * k)) & low for k in range(lanes)],
                         axis=-1)

    def chunk_sum(c: jax.Array) -> jax.Array:
        def add_stream(j: int, acc: jax.Array) -> jax.Array:
            return acc + weights[j] * split(jnp.stack(_block_words(keys[j], c, nonces[j])))

        zeros = jnp.zeros((WORDS_PER_BLOCK, *c.shape, *([lanes] if lanes > 1 else [])),
                          jnp.uint32)
        return jnp.swapaxes(lax.fori_loop(0, keys.shape[0], add_stream, zeros), 0, 1)

    return _map_chunks(chunk_sum, counters).reshape(-1)[:num_words]


def stream_nonce(stream: int, index) -> jax.Array:
    """The nonce ``(stream, index, 0)`` of the discrete samplers' stream ``stream``."""
    return jnp.stack([jnp.uint32(stream), jnp.asarray(index, jnp.uint32), jnp.uint32(0)])


def stream_words(key256: jax.Array, stream: int, index, shape: tuple[int, ...]) -> jax.Array:
    """``uint32`` words of ``shape`` from the ChaCha20 stream of nonce ``(stream, index, 0)``
    of a 256-bit key: the discrete samplers' randomness, one stream per use."""
    return chacha20_stream(key256, stream_nonce(stream, index),
                           int(np.prod(shape))).reshape(shape)


def bytes_to_words(data: bytes) -> np.ndarray:
    """Little-endian ``uint32`` words of ``data`` (length a multiple of 4)."""
    if len(data) % 4:
        raise ValueError(f"Expected len(data)={len(data)} to be a multiple of 4.")
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


def words_to_bytes(words: np.ndarray | jax.Array) -> bytes:
    """Inverse of :func:`bytes_to_words`."""
    return np.asarray(words, dtype=np.uint32).astype("<u4").tobytes()

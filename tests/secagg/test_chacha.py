"""ChaCha20 against RFC 8439's vectors and the `cryptography` package."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.secagg import (
    bytes_to_words,
    chacha20_block,
    chacha20_stream,
    weighted_stream_sum,
    words_to_bytes,
)

RFC_KEY = bytes(range(32))  # 00:01:02:...:1f

# RFC 8439 section 2.3.2: block function, counter 1.
BLOCK_NONCE = bytes.fromhex("000000090000004a00000000")
BLOCK_OUT = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
)

# RFC 8439 section 2.4.2: encryption with counter 1.
ENC_NONCE = bytes.fromhex("000000000000004a00000000")
PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
    b"for the future, sunscreen would be it."
)
CIPHERTEXT = bytes.fromhex(
    "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
    "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
    "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
    "5af90bbf74a35be6b40b8eedf2785e42874d"
)


def _keystream_bytes(key: bytes, nonce: bytes, num_bytes: int, counter0: int) -> bytes:
    words = chacha20_stream(
        jnp.asarray(bytes_to_words(key)), jnp.asarray(bytes_to_words(nonce)),
        -(-num_bytes // 4), counter0=counter0,
    )  # fmt: skip
    return words_to_bytes(words)[:num_bytes]


def test_block_matches_rfc8439_section_2_3_2():
    out = chacha20_block(bytes_to_words(RFC_KEY), 1, bytes_to_words(BLOCK_NONCE))
    assert out.dtype == jnp.uint32 and out.shape == (16,)
    assert words_to_bytes(out) == BLOCK_OUT


def test_keystream_encrypts_rfc8439_section_2_4_2_sunscreen():
    stream = _keystream_bytes(RFC_KEY, ENC_NONCE, len(PLAINTEXT), counter0=1)
    assert bytes(p ^ s for p, s in zip(PLAINTEXT, stream, strict=True)) == CIPHERTEXT


def test_block_is_vectorized_over_counters_and_jittable():
    key, nonce = bytes_to_words(RFC_KEY), bytes_to_words(BLOCK_NONCE)
    batched = jax.jit(chacha20_block)(key, jnp.arange(4, dtype=jnp.uint32), nonce)
    one_by_one = jnp.stack([chacha20_block(key, c, nonce) for c in range(4)])
    np.testing.assert_array_equal(batched, one_by_one)
    assert words_to_bytes(batched[1]) == BLOCK_OUT


def test_block_vmaps_over_keys():
    keys = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, (3, 8), dtype=np.uint32))
    nonce = bytes_to_words(BLOCK_NONCE)
    out = jax.vmap(chacha20_block, in_axes=(0, None, None))(keys, 7, nonce)
    for i in range(3):
        np.testing.assert_array_equal(out[i], chacha20_block(keys[i], 7, nonce))


@pytest.mark.parametrize(
    "num_bytes,counter0", [(64, 0), (1000, 5), (8192 * 64 + 200, 2**32 - 9000)]
)
def test_stream_matches_cryptography_chacha20(num_bytes, counter0):
    algorithms = pytest.importorskip("cryptography.hazmat.primitives.ciphers.algorithms")
    from cryptography.hazmat.primitives.ciphers import Cipher

    rng = np.random.default_rng(num_bytes)
    key, nonce = rng.bytes(32), rng.bytes(12)
    # cryptography's 16-byte nonce is the 4-byte little-endian counter || 12-byte nonce.
    full_nonce = counter0.to_bytes(4, "little") + nonce
    reference = Cipher(algorithms.ChaCha20(key, full_nonce), mode=None).encryptor()
    expected = reference.update(bytes(num_bytes))
    assert _keystream_bytes(key, nonce, num_bytes, counter0) == expected


def test_stream_refuses_to_wrap_the_counter():
    key, nonce = jnp.zeros(8, jnp.uint32), jnp.zeros(3, jnp.uint32)
    chacha20_stream(key, nonce, 32, counter0=2**32 - 2)  # exactly the last two blocks
    with pytest.raises(ValueError, match="must not wrap"):
        chacha20_stream(key, nonce, 33, counter0=2**32 - 2)


def test_block_rejects_wrong_key_shape():
    with pytest.raises(ValueError, match="key"):
        chacha20_block(jnp.zeros(7, jnp.uint32), 0, jnp.zeros(3, jnp.uint32))


def test_weighted_stream_sum_is_the_signed_sum_of_streams():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 2**32, (3, 8), dtype=np.uint32)
    nonces = rng.integers(0, 2**32, (3, 3), dtype=np.uint32)
    weights = np.array([1, 2**32 - 1, 5], dtype=np.uint32)
    got = jax.jit(weighted_stream_sum, static_argnums=3)(keys, nonces, weights, 50)
    streams = [np.asarray(chacha20_stream(keys[j], nonces[j], 50)) for j in range(3)]
    expected = streams[0] - streams[1] + np.uint32(5) * streams[2]
    np.testing.assert_array_equal(got, expected)
@pytest.mark.parametrize("lane_bits", [8, 16])
@pytest.mark.parametrize("num_values", [51, 64])
def test_lanes_cut_each_word_low_bits_first_and_are_weighted_without_carries(lane_bits,
                                                                            num_values):
    """Lane ``k`` of keystream word ``i`` is value ``i * lanes + k``, weighted and summed on
    its own (a carry from one lane must not reach the next): checked mod 2^lane_bits
    against numpy on the full streams; 51 values leave the last word partly unused."""
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 2**32, (3, 8), dtype=np.uint32)
    nonces = rng.integers(0, 2**32, (3, 3), dtype=np.uint32)
    weights = np.array([1, 2**32 - 1, 2**32 - 7], dtype=np.uint32)
    got = jax.jit(weighted_stream_sum, static_argnums=(3, 4))(keys, nonces, weights,
                                                             num_values, lane_bits)
    lanes, modulus = 32 // lane_bits, 2**lane_bits
    want = np.zeros(num_values, np.int64)
    for j, w in enumerate((1, -1, -7)):
        words = np.asarray(chacha20_stream(keys[j], nonces[j], -(-num_values // lanes)))
        values = [(int(word) >> (lane_bits * k)) % modulus for word in words
                  for k in range(lanes)]  # fmt: skip
        want += w * np.array(values[:num_values], np.int64)
    np.testing.assert_array_equal(np.asarray(got) % modulus, want % modulus)


def test_lane_bits_must_be_8_16_or_32():
    keys, nonces = np.zeros((1, 8), np.uint32), np.zeros((1, 3), np.uint32)
    with pytest.raises(ValueError, match="lane_bits=12"):
        weighted_stream_sum(keys, nonces, np.ones(1, np.uint32), 4, lane_bits=12)



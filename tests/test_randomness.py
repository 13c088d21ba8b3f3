"""The run's secret and its one generator (ChaCha20 on the host and on the device)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import dpjax
from dpjax import randomness
from dpjax.randomness import Secret, Stream, StreamKey, stream_key
from dpjax.secagg import chacha20_stream


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("num_words, counter0", [(1, 0), (16, 0), (37, 5), (5000, 2**20)])
def test_host_words_equal_the_jnp_chacha20_stream(num_words, counter0):
    key = stream_key(randomness.fresh_secret(), Stream.SAMPLING, 123456, 7)
    host = randomness.host_words(key, num_words, counter0)
    device = np.asarray(chacha20_stream(key.key, key.nonce, num_words, counter0))
    np.testing.assert_array_equal(host, device)


def test_host_words_refuse_a_counter_that_would_wrap():
    key = stream_key(randomness.seeded_secret(0), Stream.NOISE, 0)
    with pytest.raises(ValueError, match="counter0"):
        randomness.host_words(key, 32, 2**32 - 1)


def test_seeded_secrets_are_reproducible_and_distinct_fresh_secrets_are_never_equal():
    a, b = randomness.seeded_secret(5), randomness.seeded_secret(5)
    np.testing.assert_array_equal(a.words, b.words)
    assert not np.array_equal(a.words, randomness.seeded_secret(6).words)
    # the seed is not the secret: 256 bits that do not contain it
    assert np.asarray(a.words).dtype == np.uint32 and np.asarray(a.words).shape == (8,)
    fresh = [tuple(np.asarray(randomness.fresh_secret().words)) for _ in range(50)]
    assert len(set(fresh)) == 50
    assert randomness.run_secret("seeded", 5).words.tolist() == a.words.tolist()
    with pytest.raises(ValueError, match="seed=-1"):
        randomness.seeded_secret(-1)


def test_secrets_and_stream_keys_never_print_their_words():
    secret = randomness.fresh_secret()
    words = [str(int(w)) for w in np.asarray(secret.words)]
    for text in (repr(secret), str(secret), repr(stream_key(secret, Stream.NOISE, 1))):
        assert "not shown" in text
        assert not any(w in text for w in words)


def test_stream_normals_have_unit_variance_zero_mean_and_gaussian_tails():
    n = 1_200_000
    z = np.asarray(randomness.normal_like(jnp.zeros(n), stream_key(
        randomness.seeded_secret(1), Stream.NOISE, 0)), np.float64)
    se = 1 / np.sqrt(n)
    assert abs(z.mean()) < 4 * se
    assert abs(z.var() - 1) < 4 * np.sqrt(2) * se
    # P(|Z| > 3) = 0.0027: binomial standard error sqrt(p (1-p) / n) = 4.7e-5
    p3 = 2 * stats.norm.sf(3)
    assert abs(np.mean(np.abs(z) > 3) - p3) < 4 * np.sqrt(p3 * (1 - p3) / n)
    # Kolmogorov-Smirnov against N(0, 1) at 1e-3 significance (one fixed stream)
    assert stats.kstest(z[:200_000], "norm").pvalue > 1e-3


def test_each_leaf_and_each_step_reads_its_own_words():
    secret = randomness.seeded_secret(2)
    tree = {"a": jnp.zeros((300, 100)), "b": jnp.zeros(30_000)}
    step0 = randomness.normal_like(tree, stream_key(secret, Stream.NOISE, 0))
    step1 = randomness.normal_like(tree, stream_key(secret, Stream.NOISE, 1))
    again = randomness.normal_like(tree, stream_key(secret, Stream.NOISE, 0))
    np.testing.assert_array_equal(_flat(step0), _flat(again))
    bound = 4 / np.sqrt(30_000)  # correlation of independent N(0,1) vectors: sd 1/sqrt(n)
    assert abs(np.corrcoef(np.ravel(step0["a"]), step0["b"])[0, 1]) < bound
    assert abs(np.corrcoef(_flat(step0), _flat(step1))[0, 1]) < 4 / np.sqrt(60_000)
    sampling = randomness.normal_like(tree, stream_key(secret, Stream.SAMPLING, 0))
    assert abs(np.corrcoef(_flat(step0), _flat(sampling))[0, 1]) < 4 / np.sqrt(60_000)


def test_privatize_with_a_stream_key_adds_sigma_c_noise_over_the_expected_batch():
    sigma, c, b = 1.3, 0.7, 64.0
    key = stream_key(randomness.fresh_secret(), Stream.NOISE, 9)
    zeros = {"a": jnp.zeros((100, 1000)), "b": jnp.zeros(20_000)}
    out = _flat(dpjax.privatize(zeros, key, noise_multiplier=sigma, l2_clip_norm=c,
                                expected_batch_size=b))
    expected = sigma * c / b
    assert abs(out.std() / expected - 1) < 0.02  # relative se of the std: 1/sqrt(2n) = 0.2%
    assert abs(out.mean()) < 4 * expected / np.sqrt(out.size)
    s = {"w": jnp.full((4,), 8.0)}
    noiseless = dpjax.privatize(s, key, noise_multiplier=0.0, l2_clip_norm=1.0,
                                expected_batch_size=4.0)
    np.testing.assert_array_equal(noiseless["w"], 2.0)


def test_the_noise_draw_is_jittable_with_a_traced_step():
    secret = randomness.seeded_secret(3)

    @jax.jit
    def draw(secret, step):
        return randomness.normal_like(jnp.zeros(64), stream_key(secret, Stream.NOISE, step))

    a, b = draw(secret, jnp.int32(4)), draw(secret, jnp.int32(5))
    eager = randomness.normal_like(jnp.zeros(64), stream_key(secret, Stream.NOISE, 4))
    np.testing.assert_array_equal(a, eager)
    assert not np.array_equal(a, b)


def test_a_secret_is_a_pytree_that_survives_jit_and_tree_maps():
    secret = randomness.fresh_secret()
    leaves = jax.tree_util.tree_leaves(secret)
    assert len(leaves) == 1 and leaves[0].shape == (8,)
    same = jax.jit(lambda s: s)(secret)
    assert isinstance(same, Secret)
    np.testing.assert_array_equal(same.words, secret.words)
    assert isinstance(stream_key(secret, Stream.NOISE, 0), StreamKey)


def test_noise_drawn_in_segments_reads_the_words_of_one_pass_over_the_stream():
    # Leaves that start mid-block (sizes not multiples of 16), a leaf larger than a
    # segment (2^16 values) and runs of small leaves: the words must be those of the
    # whole stream from the C implementation (``cryptography``), in leaf order.
    key = stream_key(randomness.seeded_secret(5), Stream.NOISE, 7)
    tree = [jnp.zeros((3,)), jnp.zeros((300, 250)), jnp.zeros((17,)), jnp.zeros((40_000,)),
            jnp.zeros((30_001,)), jnp.zeros((5, 5))]
    assert len(randomness._segments([leaf.size for leaf in tree])) == 4
    got = _flat(jax.jit(randomness.normal_like)(tree, key))
    words = randomness.host_words(key, got.size)
    expected = np.asarray(randomness.bits_to_normal(jnp.asarray(words)), np.float64)
    np.testing.assert_array_equal(got, expected)

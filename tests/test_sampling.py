import numpy as np
import pytest

from dpjax.randomness import Stream, fresh_secret, seeded_secret
from dpjax.sampling import FixedSizeSampler, PoissonSampler, default_physical_batch_size
from dpjax.secagg import chacha20_stream


def _reference_uniforms(secret, step, n):
    """Uniforms of the sampler's stream, from the jnp ChaCha20 (an independent implementation
    of the host cipher the sampler uses): 53 bits from each pair of words."""
    nonce = np.array([int(Stream.SAMPLING), step, 0], np.uint32)
    words = np.asarray(chacha20_stream(secret.words, nonce, 2 * n)).astype(np.uint64)
    return (((words[0::2] << np.uint64(32)) | words[1::2]) >> np.uint64(11)) * 2.0**-53


def test_poisson_inclusion_frequency_is_within_a_binomial_five_sigma_band():
    n, q, steps = 200, 0.1, 2000
    sampler = PoissonSampler(n, q, physical_batch_size=64, seed=1)
    counts = np.zeros(n)
    sizes = []
    for t in range(steps):
        chunks = sampler.sample(t)
        idx = np.concatenate([c.indices[c.mask > 0] for c in chunks])
        assert len(np.unique(idx)) == len(idx)
        counts[idx] += 1
        sizes.append(len(idx))
    band = 5 * np.sqrt(steps * q * (1 - q))
    assert np.all(np.abs(counts - steps * q) <= band)
    assert len(set(sizes)) > 5  # batch sizes vary


def test_batches_are_reproducible_from_seed_and_step():
    a = PoissonSampler(1000, 0.05, seed=3)
    b = PoissonSampler(1000, 0.05, seed=3)
    for t in (0, 5, 99):
        np.testing.assert_array_equal(a.sample(t)[0].indices, b.sample(t)[0].indices)
    assert not np.array_equal(a.sample(1)[0].mask, a.sample(2)[0].mask) or not np.array_equal(
        a.sample(1)[0].indices, a.sample(2)[0].indices
    )
    assert not np.array_equal(
        PoissonSampler(1000, 0.05, seed=4).sample(0)[0].indices, a.sample(0)[0].indices
    )


def test_chunks_share_one_shape_and_overflow_is_split_never_truncated():
    sampler = PoissonSampler(1000, 0.5, physical_batch_size=128, seed=0)
    chunks = sampler.sample(0)
    assert len(chunks) >= 4
    assert {c.indices.shape for c in chunks} == {(128,)}
    real = np.concatenate([c.indices[c.mask > 0] for c in chunks])
    included = _reference_uniforms(seeded_secret(0), 0, 1000) < 0.5
    np.testing.assert_array_equal(np.sort(real), np.flatnonzero(included))
    # padding rows are masked out
    assert all(np.all(c.indices[c.mask == 0] == 0) for c in chunks)


def test_default_physical_size_covers_the_mean_plus_three_sigma():
    p = default_physical_batch_size(60_000, 256 / 60_000)
    assert p % 8 == 0 and 256 + 3 * 16 <= p <= 256 + 3 * 16 + 8


def test_fixed_size_sampler_draws_distinct_examples_each_step():
    sampler = FixedSizeSampler(50, 10, seed=0)
    (chunk,) = sampler.sample(4)
    assert chunk.indices.shape == (10,) and np.all(chunk.mask == 1)
    assert len(np.unique(chunk.indices)) == 10
    assert sampler.sample_rate == pytest.approx(0.2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: PoissonSampler(100, 0.0), r"sample_rate=0.0 in \(0, 1\]"),
        (lambda: PoissonSampler(100, 1.2), "sample_rate=1.2"),
        (lambda: PoissonSampler(0, 0.1), "num_examples=0"),
        (lambda: PoissonSampler(100, 0.1, physical_batch_size=0), "physical_batch_size=0"),
        (lambda: FixedSizeSampler(10, 11), "batch_size=11"),
    ],
)
def test_bad_sampler_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_secret_sampler_draws_other_batches_than_any_seed_and_is_reproducible_from_it():
    secret = fresh_secret()
    a = PoissonSampler(1000, 0.05, seed=None, secret=secret)
    b = PoissonSampler(1000, 0.05, seed=None, secret=secret)
    for t in (0, 7):
        np.testing.assert_array_equal(a.sample(t)[0].indices, b.sample(t)[0].indices)
    seeded = PoissonSampler(1000, 0.05, seed=0)
    assert not np.array_equal(a.sample(0)[0].indices, seeded.sample(0)[0].indices)
    real = a.sample(3)[0]
    expected = np.flatnonzero(_reference_uniforms(secret, 3, 1000) < 0.05)
    np.testing.assert_array_equal(real.indices[real.mask > 0], expected)


def test_fixed_size_batches_are_uniform_subsets():
    # Each of n=20 examples is in a batch of 5 with probability 1/4: over 4000 steps each
    # count is Binomial(4000, 1/4), sd 27.4; all 20 within 5 sd.
    sampler = FixedSizeSampler(20, 5, seed=11)
    counts = np.zeros(20)
    for t in range(4000):
        (chunk,) = sampler.sample(t)
        assert len(np.unique(chunk.indices)) == 5
        counts[chunk.indices] += 1
    assert np.all(np.abs(counts - 1000) <= 5 * np.sqrt(4000 * 0.25 * 0.75))


def test_the_sampler_never_prints_its_secret():
    secret = fresh_secret()
    text = repr(PoissonSampler(100, 0.1, seed=None, secret=secret))
    assert "not shown" in text
    assert str(int(np.asarray(secret.words)[0])) not in text

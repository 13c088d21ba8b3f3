import numpy as np
import pytest

from dpjax.sampling import FixedSizeSampler, PoissonSampler, default_physical_batch_size


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
    included = np.random.default_rng(np.random.SeedSequence([0, 0])).random(1000) < 0.5
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
